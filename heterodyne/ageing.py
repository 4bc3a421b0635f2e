"""Age-resolved fits: how the rates, the velocity and the fraction change along the diagonal.

A window of ``window`` frames ``[s, s + window)`` is cut from the two-time matrix (its
times stay absolute) and fitted with the time laws frozen: ``alpha_* = beta = 0``,
``D_offset_* = v_offset = 0``, ``f1 = f2 = f3 = 0``, so that its rates are constants::

    J_r(t_a) = D0_ref,   J_s(t_a) = D0_sample,   v(t_a) = v0,   x_s(t_a) = f0

at the window's age ``t_a``, the mean time of its frames [s]. In a short window the laws
are barely determined (MODEL.md, "Fitting conventions": with ``alpha = 0`` ``D0`` and
``D_offset`` are one rate, with ``f1 = 0`` only ``f0 + f3`` is), while these four
effective quantities are. ``phi0``, a direction with no law in time, is held at the value
of a fit of the whole matrix; a quantity that the whole fit held fixed (e.g. a static
reference) is held at its law's value.

The law (of a whole-matrix fit, or given) is read by the same window fit. A window fit
does not return the law's mean over its window: a velocity that changes within the window
spreads the phase of the cross term, which a constant-rate fit reads as a faster decay
(``J_s`` 26 % above its window mean in a 200-frame window of ``v = 50 t^0.5`` Å/s at
``t = 190`` s, q = 0.01 1/Å, noiseless). So each window is fitted twice, to the data and
to the law's model on the same pairs, and the points are compared with the latter
(``<name>_law``): both carry the same window effects, and their difference is the
departure from the law.

:func:`law_check` measures it: ``chi2 = sum ((point - law) / stderr)²`` over the windows
of each quantity, against its distribution with one degree of freedom per window (the law
comes from the whole matrix, not from these points; its own error is neglected). Windows
that overlap (``step < window``) share pairs, so their points are correlated and the
p-value is approximate; ``step = window`` makes them independent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from heterodyne import checks, identity, model
from heterodyne.data import select
from heterodyne.parameters import FRACTION_NAMES, PHYSICS_NAMES, Parameters
from heterodyne.survey import run_tasks, task

# Each effective quantity: the window parameter that carries it, the whole fit's law
# parameters behind it, its unit and its symbol in MODEL.md.
QUANTITIES = {
    "rate_ref": ("D0_ref", ("D0_ref", "alpha_ref", "D_offset_ref"), "Å²/s", "J_r"),
    "rate_sample": ("D0_sample", ("D0_sample", "alpha_sample", "D_offset_sample"), "Å²/s", "J_s"),
    "velocity": ("v0", ("v0", "beta", "v_offset"), "Å/s", "v"),
    "fraction": ("f0", FRACTION_NAMES, "", "x_s"),
}
# The law parameters frozen in a window, at the values that make each rate a constant.
FROZEN = {
    "alpha_ref": 0.0,
    "D_offset_ref": 0.0,
    "alpha_sample": 0.0,
    "D_offset_sample": 0.0,
    "beta": 0.0,
    "v_offset": 0.0,
    "f1": 0.0,
    "f2": 0.0,
    "f3": 0.0,
}
# A quantity violates the law when its chi2 has a p-value below this (3.3 sigma).
LAW_P = 1e-3


def age_scan(
    ds: xr.Dataset,
    *,
    window: int,
    step: int | None = None,
    law=None,
    params=None,
    errors: str = "speckle",
    checkpoint=None,
    executor=None,
    progress: bool = True,
    **fit_options,
) -> xr.Dataset:
    """Fit windows of frames along the diagonal: the effective rates against age.

    Parameters
    ----------
    ds : xarray.Dataset
        Canonical two-time Dataset of one q-bin.
    window : int
        Frames per window (all windows have this size, so one compilation serves all).
    step : int, optional
        Frames between the starts of consecutive windows; default ``window // 2``.
        Windows start at ``0, step, 2 step, ...`` while they fit in the matrix.
    law : NLSQResult or Parameters, optional
        The laws drawn over the points and checked, and the windows' start: a fit of the
        whole of ``ds`` (default ``hd.fit_nlsq(ds, params)``, saved in ``checkpoint``
        when given), or ``Parameters`` (e.g. a theory's or a simulation's truth). A
        quantity whose law parameters are all fixed there is held in the windows.
    params : Parameters or dict, optional
        Start and settings of the whole fit made when ``law`` is not given.
    errors : {"speckle", "nominal"}
        Errors of the window fits (:func:`heterodyne.fit_nlsq`): ``"speckle"`` accounts
        for the pairs that share frames and reduces to the nominal errors for
        independent noise.
    checkpoint : path, optional
        Folder where each window's fit is saved as it ends (:func:`heterodyne.survey`'s
        checkpoints); a rerun reads them back and fits only the rest.
    executor : None, "processes", "dask://HOST:PORT" or concurrent.futures.Executor
        Where the window fits run (:mod:`heterodyne.executors`).
    progress : bool
        Show a progress bar over windows.
    **fit_options
        Passed to each window's :func:`heterodyne.fit_nlsq` (``multistart``, default 0:
        one start, from the whole fit's law; ``scaling``; ``least_squares`` options).

    Returns
    -------
    xarray.Dataset
        Dimension ``age`` (coordinate: the mean time of the window's frames [s]; also
        ``first_frame``, ``t_first``, ``t_last``). ``rate_ref``, ``rate_sample`` [Å²/s],
        ``velocity`` [Å/s], ``fraction``, each with ``<name>_stderr`` (of the kind
        ``errors`` chose), ``<name>_stderr_nominal`` and ``<name>_law`` (the law read by
        the same window fit); ``contrast`` and ``offset`` along ``phi`` with
        their stderr; ``reduced_chi2``, ``success``, ``verdict`` and ``reasons`` of each
        window; attrs ``window``, ``step``, ``errors``, the law's physics as
        ``law_<name>``, ``fitted`` and ``from_checkpoint``. :func:`law_check`,
        :func:`report` and :func:`heterodyne.plot.age` read it.

    Notes
    -----
    In each window ``J(t) = D0 t^alpha + D_offset`` is replaced by a constant ``J(t_a)``,
    ``v`` by ``v(t_a)`` and ``x_s`` by ``x_s(t_a)`` (see the module's notes for what the
    window reads and how the law is compared). Each window follows the labelling
    convention on its own (the reference is the slower component over the window): where
    the two rates cross in time, ``rate_ref`` and ``rate_sample`` (and ``fraction`` with
    ``1 - x_s``) change places, as the law read by the window does.

    Examples
    --------
    >>> scan = hd.age_scan(ds, window=200, step=100)
    >>> print(hd.ageing.report(scan))  # doctest: +SKIP
    >>> hd.plot.age(scan)  # doctest: +SKIP
    """
    window, step = checks.check_age_scan(
        ds, window=window, step=step, law=law, params=params, errors=errors,
        checkpoint=checkpoint, executor=executor, progress=progress, options=fit_options,
    )  # fmt: skip
    if law is None:
        law = _whole_fit(ds, params, checkpoint)
    if not isinstance(law, Parameters):
        law = law.parameters()
    physics = law.physics_values()
    options = {"multistart": 0, **fit_options}
    firsts = np.arange(0, ds.sizes["t1"] - window + 1, step)
    data_tasks, law_tasks = [], []
    for k, first in enumerate(firsts):
        part = select(ds, frames=slice(int(first), int(first) + window))
        start = window_parameters(law, part["t1"].values)
        data_tasks.append(
            task(
                part,
                f"window{k}",
                params=start,
                options={**options, "errors": errors},
                checkpoint=checkpoint,
            )  # fmt: skip
        )
        modelled = law_dataset(part, physics)
        law_tasks.append(
            task(
                modelled,
                f"law{k}",
                params=start,
                options={**options, "errors": "nominal"},
                checkpoint=checkpoint,
            )  # fmt: skip
        )
    summaries, fitted = run_tasks(
        data_tasks + law_tasks, executor, progress=progress, desc="age scan"
    )
    rows = xr.concat(summaries[: len(firsts)], dim="fit", combine_attrs="drop")
    laws = xr.concat(summaries[len(firsts) :], dim="fit", combine_attrs="drop")
    t = ds["t1"].values
    ages = np.array([t[f : f + window].mean() for f in firsts])
    out = xr.Dataset(
        coords={
            "age": ("age", ages, {"units": "s", "long_name": "age (mean time of the window)"}),
            "first_frame": ("age", firsts),
            "t_first": ("age", t[firsts], {"units": "s"}),
            "t_last": ("age", t[firsts + window - 1], {"units": "s"}),
        }
    )
    for name, (param, _, unit, symbol) in QUANTITIES.items():
        attrs = {"units": unit, "long_name": f"{symbol}(t_a)"}
        out[name] = ("age", rows[param].values, attrs)
        out[f"{name}_stderr"] = ("age", rows[f"{param}_stderr"].values, attrs)
        out[f"{name}_stderr_nominal"] = ("age", rows[f"{param}_stderr_nominal"].values, attrs)
        out[f"{name}_law"] = ("age", laws[param].values, attrs)
    for key in ("contrast", "offset"):
        out[key] = rows[key].rename(fit="age").drop_vars(["source", "q"], errors="ignore")
        out[f"{key}_stderr"] = rows[f"{key}_stderr"].rename(fit="age")
    for key in ("reduced_chi2", "success", "verdict", "reasons", "nfev"):
        out[key] = ("age", rows[key].values)
    out = out.drop_vars(["source", "q"], errors="ignore").assign_coords(q=ds["q"])
    out.attrs.update(
        window=window,
        step=step,
        errors=errors,
        fitted=fitted,
        from_checkpoint=len(summaries) - fitted,
        **{f"law_{n}": float(v) for n, v in zip(PHYSICS_NAMES, physics, strict=True)},
    )
    return out


def _whole_fit(ds, params, checkpoint):
    """``hd.fit_nlsq(ds, params)``, read back from (or saved to) ``checkpoint``."""
    from heterodyne.nlsq import fit_nlsq
    from heterodyne.results import open_result

    if checkpoint is None:
        return fit_nlsq(ds, params, progress=False)
    path = Path(checkpoint) / f"whole_{identity.digest(ds, Parameters.coerce(params))[:16]}.nc"
    if path.exists():
        return open_result(path)
    result = fit_nlsq(ds, params, progress=False)
    result.to_netcdf(path, overwrite=True)
    return result


def window_means(physics, t) -> dict[str, float]:
    """The law's mean of each quantity over the frame times ``t`` [s] of a window.

    Rates from the trapezoid integrals of :func:`heterodyne.model.frame_integrals`:
    ``J = (P(t_last) - P(t_first)) / (t_last - t_first)`` [Å²/s], ``v`` likewise from
    ``V`` [Å/s]; ``x_s`` the mean over the frames.
    """
    frames = model.frame_integrals(np.asarray(physics, dtype=float), np.asarray(t, dtype=float))
    span = float(t[-1] - t[0])
    return {
        "rate_ref": float(frames.P_ref[-1] - frames.P_ref[0]) / span,
        "rate_sample": float(frames.P_sample[-1] - frames.P_sample[0]) / span,
        "velocity": float(frames.V[-1] - frames.V[0]) / span,
        "fraction": float(np.mean(frames.x_sample)),
    }


def window_parameters(law: Parameters, t) -> Parameters:
    """Parameters of a window fit: laws frozen (:data:`FROZEN`), each effective quantity
    started at the law's window mean (:func:`window_means`) and varied when any of its law
    parameters varied in ``law``; ``phi0`` held at the law's value; contrast and offset
    estimated from the window's data."""
    means = window_means(law.physics_values(), t)
    p = Parameters(FROZEN).fix(*FROZEN)
    for name, (param, law_names, _, _) in QUANTITIES.items():
        p[param].value = float(np.clip(means[name], p[param].min, p[param].max))
        p[param].vary = any(law[n].vary for n in law_names)
    p["phi0"].value = law["phi0"].value
    p["phi0"].vary = False
    return p


def law_dataset(part: xr.Dataset, physics) -> xr.Dataset:
    """``part`` with its ``c2`` replaced by the model of ``physics`` on the pairs where
    ``part`` has data. Contrast and offset are the MODEL.md defaults (0.5, 1): a window
    fit solves them per angle, and the rates it reads off a noiseless model do not depend
    on them."""
    values = np.asarray(
        model.c2_grid(
            np.asarray(physics, dtype=float),
            0.5,
            1.0,
            part["t1"].values,
            part["phi"].values,
            float(part["q"]),
        )
    )
    out = part.copy()
    out["c2"] = part["c2"].copy(data=np.where(np.isfinite(part["c2"].values), values, np.nan))
    return out


def law_curves(scan: xr.Dataset, t) -> dict[str, np.ndarray]:
    """The law of an :func:`age_scan` (attrs ``law_<name>``) at times ``t`` [s]: ``J_r``,
    ``J_s`` (:func:`heterodyne.model.transport_rate`, Å²/s), ``v``
    (:func:`heterodyne.model.velocity`, Å/s) and ``x_s``
    (:func:`heterodyne.model.sample_fraction`), under the names of :data:`QUANTITIES`."""
    p = {n: scan.attrs[f"law_{n}"] for n in PHYSICS_NAMES}
    t = np.asarray(t, dtype=float)
    return {
        "rate_ref": np.asarray(
            model.transport_rate(t, p["D0_ref"], p["alpha_ref"], p["D_offset_ref"])
        ),
        "rate_sample": np.asarray(
            model.transport_rate(t, p["D0_sample"], p["alpha_sample"], p["D_offset_sample"])
        ),
        "velocity": np.asarray(model.velocity(t, p["v0"], p["beta"], p["v_offset"])),
        "fraction": np.asarray(model.sample_fraction(t, *(p[n] for n in FRACTION_NAMES))),
    }


def law_check(scan: xr.Dataset, *, p_value: float = LAW_P) -> pd.DataFrame:
    """The points of an :func:`age_scan` against the whole fit's law, one row per quantity.

    ``chi2 = sum_k ((x_k - law_k) / stderr_k)²`` over the windows whose fit did not fail
    and whose quantity varied, with one degree of freedom per window; ``p`` is the chance
    of a ``chi2`` at least as large if the law holds, and the quantity is ``violated``
    below ``p_value``. Quantities held in every window are left out.
    """
    from scipy.stats import chi2 as chi2_distribution

    rows = []
    kept = scan["verdict"].values != "fail"
    for name, (_, _, unit, symbol) in QUANTITIES.items():
        error = scan[f"{name}_stderr"].values
        use = kept & np.isfinite(error) & (error > 0)
        if not use.any():
            continue
        z = (scan[name].values[use] - scan[f"{name}_law"].values[use]) / error[use]
        chi2 = float(np.sum(z * z))
        dof = int(use.sum())
        p = float(chi2_distribution.sf(chi2, dof))
        rows.append(
            {
                "quantity": name,
                "symbol": symbol,
                "unit": unit,
                "windows": dof,
                "chi2": chi2,
                "chi2/dof": chi2 / dof,
                "p": p,
                "worst z": float(z[np.argmax(np.abs(z))]),
                "status": "violated" if p < p_value else "follows the law",
            }
        )
    return pd.DataFrame(rows)


def _law_text(scan: xr.Dataset) -> str:
    """The law's physics, written as the three laws of MODEL.md."""
    p = {n: scan.attrs[f"law_{n}"] for n in PHYSICS_NAMES}
    return (
        f"J_r = {p['D0_ref']:.4g} t^{p['alpha_ref']:.3g} + {p['D_offset_ref']:.4g}, "
        f"J_s = {p['D0_sample']:.4g} t^{p['alpha_sample']:.3g} + {p['D_offset_sample']:.4g}, "
        f"v = {p['v0']:.4g} t^{p['beta']:.3g} + {p['v_offset']:.4g}, "
        f"x_s = {p['f0']:.3g} exp({p['f1']:.3g} (t - {p['f2']:.3g})) + {p['f3']:.3g}"
    )


def report(scan: xr.Dataset) -> str:
    """An age scan for a person: the check against the law first (:func:`law_check`),
    then one line per window: age, verdict and ``value ± stderr`` of each quantity; last
    the reasons of the windows whose verdict is not ok."""
    check = law_check(scan)
    violated = check.loc[check["status"] == "violated", "quantity"].tolist()
    statuses = pd.Series(scan["verdict"].values).value_counts()
    lines = [
        "[[Law]] " + (f"VIOLATED by {', '.join(violated)}" if violated else "followed"),
        f"    windows           {scan.sizes['age']} of {scan.attrs['window']} frames, every "
        f"{scan.attrs['step']} frames ({', '.join(f'{n} {s}' for s, n in statuses.items())})",
        f"    errors            {scan.attrs['errors']}",
        "    law               " + _law_text(scan) + ", read by the same window fit",
        "",
        check.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        "",
        "[[Windows]]",
    ]
    table = {"age [s]": [f"{a:.5g}" for a in scan["age"].values]}
    table["verdict"] = [str(v) for v in scan["verdict"].values]
    for name, (_, _, unit, _) in QUANTITIES.items():
        values, errors = scan[name].values, scan[f"{name}_stderr"].values
        header = f"{name} [{unit}]" if unit else name
        table[header] = [
            f"{v:.4g} ± {e:.2g}" if np.isfinite(e) else f"{v:.4g} (held)"
            for v, e in zip(values, errors, strict=True)
        ]
        table[f"{name} law"] = [f"{v:.4g}" for v in scan[f"{name}_law"].values]
    lines.append(pd.DataFrame(table).to_string(index=False))
    judged = [
        f"    t_a = {age:.5g} s, {verdict}: {reasons}"
        for age, verdict, reasons in zip(
            scan["age"].values, scan["verdict"].values, scan["reasons"].values, strict=True
        )
        if verdict != "ok"
    ]
    if judged:
        lines += [
            "",
            "[[Verdicts]] (windows that are not ok; a failed one is left out of the check)",
        ]
        lines += judged
    return "\n".join(lines)
