"""Result objects: one immutable object per fit, saved and reopened without loss.

``NLSQResult`` holds xarray objects only: ``params`` and ``stderr`` (one scalar variable
per physics parameter, ``contrast``/``offset`` along ``phi``), ``covariance`` over the
varied names, the multistart outcomes, the model and residuals, the fitted data and the
parameter settings. ``to_netcdf`` writes them as groups of one netCDF-4 file;
``open_result`` reads any result type back.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import xarray as xr

from heterodyne import checks
from heterodyne.data import time_origin
from heterodyne.errors import FileFormatError
from heterodyne.files import atomic_write
from heterodyne.parameters import (
    PHYSICS_NAMES,
    SCALING_NAMES,
    SPECS,
    UNITS,
    Parameters,
    parse_label,
)

CORRELATION_SHOW = 0.7  # the report lists correlations above this
CORRELATION_LINES = 12  # ... the strongest this many of them
AT_BOUND_RTOL = 1e-6  # a value this close to a bound (relative to the range) is "at bound"


def write_tree(tree: xr.DataTree, path, *, overwrite: bool) -> Path:
    """Write a result's groups to one netCDF-4 file, atomically."""
    return atomic_write(
        lambda tmp: tree.to_netcdf(tmp, engine="h5netcdf"), path, overwrite=overwrite
    )


def identifiability_warnings(p: Parameters) -> list[str]:
    """Degeneracies of the model (MODEL.md, "Fitting conventions") that ``p`` lets vary."""
    out = []

    def varies(*names):
        return all(p[n].vary for n in names)

    def fixed_zero(name):
        return not p[name].vary and float(p[name].value) == 0.0

    for side in ("ref", "sample"):
        if varies(f"D0_{side}", f"D_offset_{side}") and fixed_zero(f"alpha_{side}"):
            out.append(
                f"with alpha_{side} = 0 fixed, D0_{side} and D_offset_{side} are one "
                f"rate: fix one of them"
            )
    if varies("v0", "v_offset") and fixed_zero("beta"):
        out.append("with beta = 0 fixed, v0 and v_offset are one velocity: fix one of them")
    if varies("f0", "f2"):
        out.append("f0 and f2 enter only through f0 exp(-f1 f2): fix one of them")
    if varies("f0", "f3") and fixed_zero("f1"):
        out.append("with f1 = 0 fixed only f0 + f3 is identifiable: fix one of them")
    if p["f2"].vary and fixed_zero("f1"):
        out.append("with f1 = 0 fixed, f2 has no effect: fix it")
    return out


def params_layout(physics: np.ndarray, contrast, offset, phi, q, *, attrs=None) -> xr.Dataset:
    """The ``params``/``stderr`` layout: a scalar per physics parameter, ``contrast`` and
    ``offset`` along ``phi``; units in attrs."""
    n_phi = np.size(phi)
    variables = {
        name: ((), float(physics[k]), {"units": UNITS[name]})
        for k, name in enumerate(PHYSICS_NAMES)
    }
    for name, value in (("contrast", contrast), ("offset", offset)):
        variables[name] = (
            "phi",
            np.broadcast_to(np.asarray(value, float), (n_phi,)).copy(),
            {"units": UNITS[name]},
        )
    coords = {
        "phi": ("phi", np.asarray(phi, float), {"units": "deg"}),
        "q": ((), float(q), {"units": "1/Å"}),
    }
    return xr.Dataset(variables, coords=coords, attrs=dict(attrs or {}))


def settings_dataset(p: Parameters) -> xr.Dataset:
    """The parameter settings (vary, min, max) as a Dataset over ``name``."""
    names = list(PHYSICS_NAMES + SCALING_NAMES)
    return xr.Dataset(
        {
            "vary": ("name", np.array([int(p[n].vary) for n in names])),
            "min": ("name", np.array([p[n].min for n in names], float)),
            "max": ("name", np.array([p[n].max for n in names], float)),
        },
        coords={"name": names},
    )


@dataclass(frozen=True, repr=False)
class NLSQResult:
    """The outcome of :func:`heterodyne.fit_nlsq`.

    Attributes
    ----------
    params, stderr : xarray.Dataset
        Best-fit values and their standard errors (NaN for fixed parameters), of the kind
        ``info["errors"]`` (``fit_nlsq(errors=...)``).
    stderr_nominal : xarray.Dataset
        The nominal least-squares standard errors, which treat the pairs as independent
        (the same as ``stderr`` when ``info["errors"] == "nominal"``).
    covariance : xarray.DataArray
        Covariance of the varied quantities, dims ``(name, name_)``, of the same kind as
        ``stderr``.
    starts : xarray.Dataset
        Every multistart outcome (``x``, ``cost``, ``nfev``, ``success`` by ``start``).
    model : xarray.Dataset
        The model ``c2`` at the best fit on the data's grid.
    residuals : xarray.DataArray
        Weighted residuals ``(model - data) / sigma`` at the fitted pairs (mirrored into
        the lower triangle; NaN on the diagonal and at masked pairs).
    data : xarray.Dataset
        The fitted Dataset.
    settings : xarray.Dataset
        ``vary``, ``min``, ``max`` of every parameter as fitted.
    info : dict
        ``chi2``, ``nfev``, ``success``, ``message``, ``scaling``, ``n_pairs``,
        ``nan_pairs``, ``dropped_frames``, ``errors``; with ``errors="speckle"`` also
        ``speckle_kappa``, ``shot_kappa`` and ``white_variance``, the three scales of the
        error model (:mod:`heterodyne.uncertainty`; results written before the shot
        shape have no ``shot_kappa``).
    """

    params: xr.Dataset
    stderr: xr.Dataset
    stderr_nominal: xr.Dataset
    covariance: xr.DataArray
    starts: xr.Dataset
    model: xr.Dataset
    residuals: xr.DataArray
    data: xr.Dataset
    settings: xr.Dataset
    info: dict = field(default_factory=dict)

    @classmethod
    def from_fit(
        cls,
        *,
        data,
        params,
        z,
        labels,
        covariance,
        nominal,
        errors,
        error_scales,
        model_c2,
        pairs,
        residuals,
        chi2,
        nfev,
        success,
        message,
        starts,
        scaling,
        lower,
        upper,
        notes=None,
    ):
        n_scale = 1 if scaling == "shared" else data.sizes["phi"]
        phi, q = data["phi"].values, float(data["q"].values)
        physics = z[: len(PHYSICS_NAMES)]
        contrast = z[len(PHYSICS_NAMES) : len(PHYSICS_NAMES) + n_scale]
        offset = z[len(PHYSICS_NAMES) + n_scale :]

        def stderr_layout(cov):
            errors = dict(zip(labels, np.sqrt(np.clip(np.diag(cov), 0, None)), strict=True))

            def err_scale(name):
                if scaling == "shared":
                    return errors.get(name, np.nan)
                return np.array([errors.get(f"{name}[{k}]", np.nan) for k in range(n_scale)])

            err_physics = np.array([errors.get(n, np.nan) for n in PHYSICS_NAMES])
            return params_layout(err_physics, err_scale("contrast"), err_scale("offset"), phi, q)

        n_pairs, n_free = pairs.n_pairs, len(labels)
        info = {
            "chi2": chi2,
            "nfev": nfev,
            "success": int(success),
            "message": message,
            "scaling": scaling,
            "n_pairs": n_pairs,
            "n_varied": n_free,
            "nan_pairs": int(data.attrs.get("nan_pairs", 0)),
            "dropped_frames": int(data.attrs.get("dropped_frames", 0)),
            "weighted": int("sigma" in data.data_vars),
            "errors": errors,
            **error_scales,
            **(notes or {}),
        }
        fitted = np.full(data["c2"].shape, np.nan)
        fitted[np.asarray(pairs.angle), np.asarray(pairs.i), np.asarray(pairs.j)] = residuals
        fitted[np.asarray(pairs.angle), np.asarray(pairs.j), np.asarray(pairs.i)] = residuals
        coords = {k: data.coords[k] for k in ("phi", "t1", "t2", "q")}
        return cls(
            params=params_layout(physics, contrast, offset, phi, q),
            stderr=stderr_layout(covariance),
            stderr_nominal=stderr_layout(nominal),
            covariance=xr.DataArray(
                covariance,
                dims=("name", "name_"),
                coords={"name": list(labels), "name_": list(labels)},
                name="covariance",
            ),
            starts=starts,
            model=xr.Dataset(
                {
                    "c2": (
                        ("phi", "t1", "t2"),
                        model_c2,
                        {"long_name": "model two-time correlation"},
                    )
                },
                coords=coords,
            ),
            residuals=xr.DataArray(
                fitted,
                dims=("phi", "t1", "t2"),
                coords=coords,
                name="residuals",
                attrs={"long_name": "weighted residual (model - data)"},
            ),
            data=data,
            settings=settings_dataset(params),
            info=info,
        )

    @property
    def chi2(self) -> float:
        """Sum of squared weighted residuals."""
        return float(self.info["chi2"])

    @property
    def reduced_chi2(self) -> float:
        """``chi2 / (n_pairs - n_varied)``."""
        return self.chi2 / max(self.info["n_pairs"] - self.info["n_varied"], 1)

    @property
    def nfev(self) -> int:
        return int(self.info["nfev"])

    @property
    def success(self) -> bool:
        return bool(self.info["success"])

    @property
    def message(self) -> str:
        return str(self.info["message"])

    @property
    def correlation(self) -> xr.DataArray:
        """Correlation matrix of the varied quantities."""
        sd = np.sqrt(np.diag(self.covariance.values))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = self.covariance.values / np.outer(sd, sd)
        return self.covariance.copy(data=corr).rename("correlation")

    def value(self, label: str) -> float:
        """Best-fit value of a varied quantity by label (``"v0"``, ``"contrast[1]"``)."""
        return _by_label(self.params, label)

    def error(self, label: str) -> float:
        """Standard error of a quantity by label."""
        return _by_label(self.stderr, label)

    def strong_correlations(self, threshold: float = CORRELATION_SHOW):
        """``(a, b, corr)`` for varied pairs with ``|corr| > threshold``, strongest first."""
        corr = self.correlation.values
        names = list(self.covariance["name"].values)
        rows = [
            (names[a], names[b], float(corr[a, b]))
            for a in range(len(names))
            for b in range(a + 1, len(names))
            if abs(corr[a, b]) > threshold
        ]
        return sorted(rows, key=lambda r: -abs(r[2]))

    def at_bounds(self) -> list[str]:
        """Varied quantities whose value sits on a bound."""
        out = []
        for label in self.covariance["name"].values:
            name, _ = parse_label(label)
            lo, hi = (float(self.settings[k].sel(name=name)) for k in ("min", "max"))
            value = self.value(str(label))
            tol = AT_BOUND_RTOL * (hi - lo)
            if value - lo <= tol or hi - value <= tol:
                out.append(str(label))
        return out

    @cached_property
    def verdict(self):
        """The package's judgement of the fit (:func:`heterodyne.verdict.of_fit`):
        ``.status`` is ``"ok"``, ``"check"`` or ``"fail"``, ``.reasons`` say why."""
        from heterodyne import verdict

        return verdict.of_fit(self)

    def warnings(self) -> list[str]:
        """What the user should know beyond the verdict: the parameter settings'
        degeneracies and the kind of errors shown."""
        out = identifiability_warnings(self.parameters())
        if self.info.get("errors") == "nominal":
            out.append(
                "stderr are nominal least-squares errors, which treat the pairs as "
                "independent; two-time pairs share frames, so they are lower bounds "
                '(fit_nlsq(..., errors="speckle") accounts for it)'
            )
        return out

    def parameters(self) -> Parameters:
        """The fitted values as a ``Parameters`` (for a warm start or a refit)."""
        p = Parameters()
        for name in PHYSICS_NAMES + SCALING_NAMES:
            row = self.settings.sel(name=name)
            p[name].vary = bool(row["vary"])
            p[name].min, p[name].max = float(row["min"]), float(row["max"])
            value = self.params[name].values
            p[name].value = float(value) if value.ndim == 0 else value.copy()
        return p

    def _rows(self):
        for name in PHYSICS_NAMES + SCALING_NAMES:
            values = np.atleast_1d(self.params[name].values)
            errors = np.atleast_1d(self.stderr[name].values)
            vary = bool(self.settings["vary"].sel(name=name))
            lo, hi = (float(self.settings[k].sel(name=name)) for k in ("min", "max"))
            shared = self.info["scaling"] == "shared" and name in SCALING_NAMES
            for k in range(1 if shared else values.size):
                label = name if values.size == 1 or shared else f"{name}[{k}]"
                flags = []
                if not vary:
                    flags.append("fixed")
                elif label in self.at_bounds():
                    flags.append("at bound")
                yield label, values[k], errors[k], lo, hi, ", ".join(flags), SPECS[name].unit

    def report(self) -> str:
        """An lmfit-style text report: statistics, parameters, correlations, warnings."""
        info = self.info
        weighting = (
            "absolute, sigma-weighted" if info["weighted"] else ("scaled by the residual variance")
        )
        nominal = info["errors"] == "nominal"
        if nominal:
            errors = [f"    errors            nominal ({weighting})"]
        else:
            kappa = float(info["speckle_kappa"])
            pixels = f" (~ 1/{1 / kappa:.4g} pixels)" if kappa > 0 and not info["weighted"] else ""
            errors = [
                "    errors            speckle: pairs share frames; nominal stderr alongside",
                f"    error model       kappa {kappa:.4g}{pixels}, shot "
                f"{float(info.get('shot_kappa', 0.0)):.4g}, white variance "
                f"{float(info['white_variance']):.4g}",
            ]
        verdict = self.verdict
        lines = [
            f"[[Verdict]] {verdict.status.upper()}",
            *[f"    - {r}" for r in verdict.reasons],
            *[f"    - note: {n}" for n in verdict.notes],
            "[[NLSQ fit]]",
            "    method            scipy least_squares (trf), exact JAX Jacobian",
            *errors,
            f"    scaling           {info['scaling']}",
            f"    q                 {float(self.params['q']):.6g} 1/Å; phi = "
            f"{', '.join(f'{v:g}' for v in self.params['phi'].values)} deg",
            f"    pairs fitted      {info['n_pairs']} (masked non-finite pairs: "
            f"{info['nan_pairs']}; dropped frames: {info.get('dropped_frames', 0)})",
            f"    times             {time_origin(self.data)}",
            f"    varied            {info['n_varied']}",
            f"    chi2              {self.chi2:.6g}",
            f"    reduced chi2      {self.reduced_chi2:.6g}",
            f"    evaluations       {self.nfev}",
            f"    success           {self.success}: {self.message}",
            f"    starts            {self.starts.sizes['start']}",
            "[[Parameters]]",
            f"    {'name':<16}{'value':>13}{'stderr':>12}{'rel.':>9}"
            + ("" if nominal else f"{'nominal':>12}")
            + f"{'min':>11}{'max':>11}  {'flags':<9} unit",
        ]
        for label, value, error, lo, hi, flags, unit in self._rows():
            rel = ""
            if np.isfinite(error) and value:
                rel = f"{100 * error / abs(value):.2f}%" if error < 1e3 * abs(value) else ">1e5%"
            err = f"{error:.4g}" if np.isfinite(error) else "-"
            row = f"    {label:<16}{value:>13.6g}{err:>12}{rel:>9}"
            if not nominal:
                least = _by_label(self.stderr_nominal, label)
                row += f"{least:>12.4g}" if np.isfinite(least) else f"{'-':>12}"
            lines.append(f"{row}{lo:>11.4g}{hi:>11.4g}  {flags:<9} {unit}")
        correlations = self.strong_correlations()
        if correlations:
            lines.append(f"[[Correlations]] (|corr| > {CORRELATION_SHOW})")
            lines += [f"    C({a}, {b}) = {c:+.4f}" for a, b, c in correlations[:CORRELATION_LINES]]
            if len(correlations) > CORRELATION_LINES:
                lines.append(
                    f"    ... and {len(correlations) - CORRELATION_LINES} more "
                    "(result.strong_correlations())"
                )
        warns = self.warnings()
        if warns:
            lines.append("[[Warnings]]")
            lines += [f"    - {w}" for w in warns]
        return "\n".join(lines)

    def __repr__(self):
        return f"<NLSQResult success={self.success} reduced_chi2={self.reduced_chi2:.4g}>"

    def _repr_html_(self):
        nominal = self.info["errors"] == "nominal"

        def number(x):
            return f"{x:.4g}" if np.isfinite(x) else "-"

        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{value:.6g}</td><td>{number(error)}</td>"
            + ("" if nominal else f"<td>{number(_by_label(self.stderr_nominal, label))}</td>")
            + f"<td>{lo:.4g}</td><td>{hi:.4g}</td>"
            f"<td>{flags}</td><td>{html.escape(unit)}</td></tr>"
            for label, value, error, lo, hi, flags, unit in self._rows()
        )
        warns = "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings())
        return (
            verdict_html(self.verdict)
            + f"<b>NLSQ fit</b>: success={self.success}, reduced χ²={self.reduced_chi2:.4g}, "
            f"{self.info['n_pairs']} pairs, {self.nfev} evaluations, errors "
            f"{self.info['errors']}<table><tr><th>name</th><th>value</th><th>stderr</th>"
            + ("" if nominal else "<th>nominal stderr</th>")
            + f"<th>min</th><th>max</th><th>flags</th><th>unit</th></tr>{rows}</table>"
            + (f"<ul>{warns}</ul>" if warns else "")
        )

    def plot(self):
        """Data | model | residual per angle and the one-time projection
        (:func:`heterodyne.plot.fit`)."""
        from heterodyne import plot

        return plot.fit(self)

    def to_netcdf(self, path, *, overwrite: bool = False):
        """Write the whole result to one netCDF-4 file (groups); ``hd.open_result``
        reads it back."""
        tree = xr.DataTree.from_dict(
            {
                "/": xr.Dataset(attrs={"result_type": "NLSQResult", **self.info}),
                "/params": self.params,
                "/stderr": self.stderr,
                "/stderr_nominal": self.stderr_nominal,
                "/covariance": self.covariance.to_dataset(),
                "/starts": self.starts,
                "/model": self.model,
                "/residuals": self.residuals.to_dataset(),
                "/data": self.data,
                "/settings": self.settings,
            }
        )
        return write_tree(tree, path, overwrite=overwrite)

    @classmethod
    def _from_tree(cls, tree):
        group = {name: tree[name].to_dataset() for name in tree.children}
        return cls(
            params=group["params"],
            stderr=group["stderr"],
            # files written before errors= existed hold nominal errors only
            stderr_nominal=group.get("stderr_nominal", group["stderr"]),
            covariance=group["covariance"]["covariance"],
            starts=group["starts"],
            model=group["model"],
            residuals=group["residuals"]["residuals"],
            data=group["data"],
            settings=group["settings"],
            info={k: v for k, v in tree.attrs.items() if k != "result_type"},
        )


RESULT_TYPES = {"NLSQResult": NLSQResult}


def open_result(path):
    """Read a result written by ``.to_netcdf`` (``NLSQResult`` or ``CMCResult``)."""
    path = checks.readable_file(path)
    try:
        tree = xr.open_datatree(path, engine="h5netcdf").load()
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path}: cannot be read as a heterodyne result ({err})") from err
    kind = tree.attrs.get("result_type")
    if kind not in RESULT_TYPES:
        raise FileFormatError(
            f"{path}: attribute result_type is {kind!r}; expected one of "
            f"{sorted(RESULT_TYPES)} (is this a data file? use hd.load)"
        )
    try:
        return RESULT_TYPES[kind]._from_tree(tree)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise FileFormatError(
            f"{path}: a {kind} file without all its parts ({type(err).__name__}: {err}); "
            "it was not written whole by .to_netcdf"
        ) from err


VERDICT_COLOURS = {"ok": "#1a7f37", "check": "#9a6700", "fail": "#cf222e"}


def verdict_html(verdict) -> str:
    """A verdict as an HTML block: the status in its colour, then the reasons."""
    items = [html.escape(r) for r in verdict.reasons]
    items += [f"note: {html.escape(n)}" for n in verdict.notes]
    return (
        f"<div class='hd-verdict'><b style='color:{VERDICT_COLOURS[verdict.status]}'>"
        f"Verdict: {verdict.status.upper()}</b>"
        + (f"<ul>{''.join(f'<li>{i}</li>' for i in items)}</ul>" if items else "")
        + "</div>"
    )


def _by_label(ds: xr.Dataset, label: str) -> float:
    """The value of ``ds`` at a label (:func:`~heterodyne.parameters.parse_label`): the
    entry of angle ``k`` of a per-angle variable, or a scalar."""
    name, angle = parse_label(label)
    values = np.atleast_1d(ds[name].values)
    return float(values[0 if angle is None else angle])


# The groups of CMCResult.posterior (an arviz.InferenceData), in the order they are written.
CMC_POSTERIOR_GROUPS = ("posterior", "sample_stats", "observed_data", "shard_posterior")
_LIKELIHOOD_WORDS = {"rows": "whole rows", "pairs": "pair by pair"}
# Written when present: the combined draws before the errors="speckle" correction.
CMC_OPTIONAL_GROUPS = ("uncorrected_posterior",)
# A log-space parameter whose 94 % HDI starts below this multiple of its floor is
# reported as consistent with 0.
FLOOR_NOTE = 10.0


@dataclass(frozen=True, repr=False)
class CMCResult:
    """The outcome of :func:`heterodyne.fit_cmc`.

    Attributes
    ----------
    posterior : arviz.InferenceData
        ``posterior``: the combined draws ``(chain, draw)``, one variable per varied
        parameter (``contrast``, ``offset`` and a sampled ``noise`` along ``phi``);
        ``sample_stats``: NUTS statistics of every shard ``(shard, chain, draw)``
        (``energy``, ``diverging``, ``n_steps``, ``acceptance_rate``, ``step_size``,
        ``lp``; the combined draws come from no sampler of their own);
        ``observed_data``: the fitted Dataset; ``shard_posterior``: each shard's draws
        ``(shard, chain, draw)``; with ``errors="speckle"``, ``uncorrected_posterior``:
        the combined draws before the correction for correlated errors.
    diagnostics : xarray.Dataset
        ``rhat``, ``ess_bulk``, ``ess_tail`` by ``(shard, parameter)``, ``bfmi`` by
        ``(shard, chain)``, ``divergences``, ``divergent_fraction``, ``n_pairs`` and
        ``seconds`` by shard; the thresholds in attrs
        (:mod:`heterodyne.diagnostics`).
    prior : xarray.Dataset
        Each sampled quantity's space (log or linear), prior kind, bounds (physical
        units), centre and width (sampled space) and log-space floor; ``attrs["power"]``
        is the ``1/S`` of the shard priors.
    start : xarray.Dataset
        Start values, and the values of the fixed parameters (``params`` layout).
    settings : xarray.Dataset
        ``vary``, ``min``, ``max`` of every parameter as fitted.
    info : dict
        Shards, chains, warmup, samples, seed, chain method, executor, pair counts,
        prior and likelihood choices, wall time, versions.
    """

    posterior: object
    diagnostics: xr.Dataset
    prior: xr.Dataset
    start: xr.Dataset
    settings: xr.Dataset
    info: dict = field(default_factory=dict)

    @property
    def data(self) -> xr.Dataset:
        """The fitted Dataset."""
        return self.posterior.observed_data

    @property
    def params(self) -> xr.Dataset:
        """Posterior means, fixed parameters at their values (``NLSQResult.params``
        layout)."""
        return self._layout(self.posterior.posterior.mean(("chain", "draw")), fixed=True)

    @property
    def stderr(self) -> xr.Dataset:
        """Posterior standard deviations (NaN for fixed parameters)."""
        draws = self.posterior.posterior
        return self._layout(draws.std(("chain", "draw"), ddof=1), fixed=False)

    def _layout(self, stat: xr.Dataset, *, fixed: bool) -> xr.Dataset:
        start = self.start

        def pick(name):
            if name in stat:
                return stat[name].values
            return start[name].values if fixed else np.full(start[name].shape, np.nan)

        physics = np.array([float(pick(n)) for n in PHYSICS_NAMES])
        out = params_layout(
            physics, pick("contrast"), pick("offset"), start["phi"].values, float(start["q"])
        )
        if "noise" in stat:
            out["noise"] = ("phi", stat["noise"].values, {"units": ""})
        return out

    def value(self, label: str) -> float:
        """Posterior mean of a quantity by label (``"v0"``, ``"contrast[1]"``)."""
        return _by_label(self.params, label)

    def error(self, label: str) -> float:
        """Posterior standard deviation of a quantity by label."""
        return _by_label(self.stderr, label)

    def hdi(self, prob: float = 0.94) -> xr.Dataset:
        """Highest-density interval of each sampled quantity, along ``hdi`` = (lower,
        higher)."""
        from heterodyne import diagnostics

        return diagnostics.hdi(self.posterior.posterior, prob)

    @property
    def converged(self) -> bool:
        """True when every shard passes every diagnostic threshold."""
        from heterodyne import diagnostics

        return not diagnostics.failures(self.diagnostics)

    def failures(self) -> dict[int, list[str]]:
        """The failed diagnostic figures by shard (empty when converged)."""
        from heterodyne import diagnostics

        return diagnostics.failures(self.diagnostics)

    def parameters(self) -> Parameters:
        """The posterior means as a ``Parameters`` (for a refit or a plot)."""
        p = Parameters()
        params = self.params
        for name in PHYSICS_NAMES + SCALING_NAMES:
            row = self.settings.sel(name=name)
            p[name].vary = bool(row["vary"])
            p[name].min, p[name].max = float(row["min"]), float(row["max"])
            value = params[name].values
            p[name].value = float(value) if value.ndim == 0 else value.copy()
        return p

    def warnings(self) -> list[str]:
        """Everything the user should know before trusting the numbers."""
        out = [
            f"shard {s} failed {len(found)} diagnostic figure(s): {'; '.join(found[:3])}"
            + (f"; and {len(found) - 3} more (result.failures())" if len(found) > 3 else "")
            + "; it is combined with the others, so the combined posterior is not to be "
            "trusted: rerun with more warmup/samples or better start values "
            "(init=hd.fit_nlsq(...))"
            for s, found in self.failures().items()
        ]
        floors = self.prior["floor"]
        if np.any(np.isfinite(floors.values)):
            lower = self.hdi().sel(hdi="lower")
            for label, floor in zip(floors["parameter"].values, floors.values, strict=True):
                name, _ = parse_label(label)
                if (
                    np.isfinite(floor)
                    and name in lower
                    and _by_label(lower, label) < FLOOR_NOTE * floor
                ):
                    out.append(
                        f"{label}'s posterior reaches its log-space floor {floor:.3g} "
                        f"{UNITS.get(name, '')}: the data are consistent with {name} = 0; "
                        f"fix {name} = 0 if that is the physics"
                    )
        out += identifiability_warnings(self.parameters())
        if self.info.get("errors", "nominal") == "nominal":
            out.append(
                "the likelihood treats the pairs as independent; two-time pairs share frames, "
                "so on real data the posterior is narrower than the truth warrants "
                '(fit_cmc(..., errors="speckle") corrects it)'
            )
        return out

    def _rows(self):
        """``(label, mean, sd, hdi lower, hdi higher, worst R-hat, least ESS bulk, least
        ESS tail, unit)`` for every sampled quantity."""
        params, stderr, hdi = self.params, self.stderr, self.hdi()
        figures = self.diagnostics
        for label in figures["parameter"].values:
            label = str(label)
            name, _ = parse_label(label)
            by = figures.sel(parameter=label)
            yield (
                label,
                _by_label(params, label),
                _by_label(stderr, label),
                _by_label(hdi.sel(hdi="lower"), label),
                _by_label(hdi.sel(hdi="higher"), label),
                float(by["rhat"].max()),
                float(by["ess_bulk"].min()),
                float(by["ess_tail"].min()),
                UNITS.get(name, ""),
            )

    def _verdict(self) -> str:
        failed = self.failures()
        d = self.diagnostics.attrs
        limits = (
            f"R-hat < {d['threshold_rhat_max']:g}, ESS >= {d['threshold_ess_per_chain_min']:g}"
            f"/chain, BFMI >= {d['threshold_bfmi_min']:g}, divergences <= "
            f"{100 * d['threshold_divergence_max']:g} %"
        )
        if not failed:
            return f"converged: all {self.info['shards']} shards pass {limits}"
        return (
            f"NOT converged: shard(s) {', '.join(map(str, failed))} of {self.info['shards']} "
            f"fail {limits}"
        )

    def _errors_line(self) -> str:
        if self.info.get("errors", "nominal") == "nominal":
            return "nominal: pairs taken as independent"
        return (
            "speckle: draws corrected to the speckle covariance of the pairs "
            f"(kappa {self.info['speckle_kappa']:.3g}, shot "
            f"{self.info.get('shot_kappa', 0.0):.3g}, white variance "
            f"{self.info['white_variance']:.3g}); uncorrected draws in "
            "posterior.uncorrected_posterior"
        )

    def report(self) -> str:
        """Text report: settings, per-parameter mean, sd, 94 % HDI, R-hat and ESS, the
        per-shard figures, the verdict and the warnings."""
        info = self.info
        likelihood = (
            "Gaussian on the NLSQ residuals, sigma from the data"
            if info["weighted"]
            else "Gaussian on the NLSQ residuals, noise level per angle sampled"
        )
        prior = (
            f"NLSQ-centred truncated normal, {info['prior_width']:g} x stderr wide"
            if info["prior"] == "nlsq"
            else "uniform on the parameter table's bounds"
        )
        logs = [
            str(p)
            for p, s in zip(self.prior["parameter"].values, self.prior["space"].values, strict=True)
            if s == "log"
        ]
        lines = [
            "[[CMC fit]]",
            "    method            consensus Monte Carlo: NUTS (numpyro) per shard, "
            f"{info['combination']}",
            f"    shards            {info['shards']} ({info['shards_rule']}); {info['n_pairs']} "
            f"pairs; {info['shard_size']} entries evaluated per shard "
            f"({_LIKELIHOOD_WORDS[info.get('likelihood', 'pairs')]}, padded)",
            f"    masked            {info.get('nan_pairs', 0)} non-finite pairs; dropped frames: "
            f"{info.get('dropped_frames', 0)}",
            f"    times             {time_origin(self.data)}",
            f"    chains            {info['chains']} per shard ({info['chain_method']}, "
            f"{info['devices']} device), {info['warmup']} warmup + {info['samples']} draws; "
            f"mass matrix {info.get('mass_matrix', 'dense, adapted')}",
            f"    executor          {info['executor']}",
            f"    seed              {info['seed']}",
            f"    scaling           {info['scaling']}",
            f"    likelihood        {likelihood}",
            f"    errors            {self._errors_line()}",
            f"    priors            {prior}; tempered to the power {self.prior.attrs['power']:.4g} "
            "per shard",
            f"    log space         {', '.join(logs) or '-'}",
            f"    wall time         {info['wall_seconds']:.1f} s",
            f"    verdict           {self._verdict()}",
            "[[Parameters]] (mean, sd, 94 % HDI; R-hat worst and ESS least over shards)",
            f"    {'name':<14}{'mean':>12}{'sd':>11}{'hdi 3%':>12}{'hdi 97%':>12}"
            f"{'R-hat':>8}{'ESS bulk':>10}{'ESS tail':>10}  unit",
        ]
        for label, mean, sd, lo, hi, rhat, bulk, tail, unit in self._rows():
            lines.append(
                f"    {label:<14}{mean:>12.6g}{sd:>11.4g}{lo:>12.6g}{hi:>12.6g}"
                f"{rhat:>8.4f}{bulk:>10.0f}{tail:>10.0f}  {unit}"
            )
        lines.append("[[Shards]]")
        lines.append(
            f"    {'shard':>5}{'pairs':>9}{'seconds':>9}{'divergent':>10}{'min BFMI':>10}"
            f"{'max R-hat':>10}{'min ESS':>9}"
        )
        for s in self.diagnostics["shard"].values:
            d = self.diagnostics.sel(shard=s)
            lines.append(
                f"    {int(s):>5}{int(d['n_pairs']):>9}{float(d['seconds']):>9.1f}"
                f"{int(d['divergences']):>10}{float(d['bfmi'].min()):>10.3f}"
                f"{float(d['rhat'].max()):>10.4f}{float(d['ess_bulk'].min()):>9.0f}"
            )
        warns = self.warnings()
        if warns:
            lines.append("[[Warnings]]")
            lines += [f"    - {w}" for w in warns]
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"<CMCResult converged={self.converged} shards={self.info['shards']} "
            f"chains={self.info['chains']} draws={self.info['samples']}>"
        )

    def _repr_html_(self):
        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{mean:.6g}</td><td>{sd:.4g}</td>"
            f"<td>{lo:.6g}</td><td>{hi:.6g}</td><td>{rhat:.4f}</td><td>{bulk:.0f}</td>"
            f"<td>{tail:.0f}</td><td>{html.escape(unit)}</td></tr>"
            for label, mean, sd, lo, hi, rhat, bulk, tail, unit in self._rows()
        )
        warns = "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings())
        return (
            f"<b>CMC fit</b>: {html.escape(self._verdict())}; {self.info['shards']} shards x "
            f"{self.info['chains']} chains x {self.info['samples']} draws, "
            f"{self.info['n_pairs']} pairs<table><tr><th>name</th><th>mean</th><th>sd</th>"
            "<th>hdi 3%</th><th>hdi 97%</th><th>R-hat</th><th>ESS bulk</th>"
            f"<th>ESS tail</th><th>unit</th></tr>{rows}</table>"
            + (f"<ul>{warns}</ul>" if warns else "")
        )

    def plot(self):
        """Posterior views (:func:`heterodyne.plot.posterior`)."""
        from heterodyne import plot

        return plot.posterior(self)

    def to_netcdf(self, path, *, overwrite: bool = False):
        """Write the whole result to one netCDF-4 file (the InferenceData groups and the
        diagnostics, prior, start and settings as groups); ``hd.open_result`` reads it
        back."""
        from heterodyne import diagnostics

        present = diagnostics.groups(self.posterior)
        groups = {
            f"/{g}": self.posterior[g]
            for g in CMC_POSTERIOR_GROUPS + CMC_OPTIONAL_GROUPS
            if g in present
        }
        tree = xr.DataTree.from_dict(
            {
                "/": xr.Dataset(attrs={"result_type": "CMCResult", **self.info}),
                **groups,
                "/diagnostics": self.diagnostics,
                "/prior": self.prior,
                "/start": self.start,
                "/settings": self.settings,
            }
        )
        return write_tree(tree, path, overwrite=overwrite)

    @classmethod
    def _from_tree(cls, tree):
        from heterodyne import diagnostics

        group = {name: tree[name].to_dataset() for name in tree.children}
        return cls(
            posterior=diagnostics.inference_data(
                **{g: group[g] for g in CMC_POSTERIOR_GROUPS + CMC_OPTIONAL_GROUPS if g in group}
            ),
            diagnostics=group["diagnostics"],
            prior=group["prior"],
            start=group["start"],
            settings=group["settings"],
            info={k: v for k, v in tree.attrs.items() if k != "result_type"},
        )


RESULT_TYPES["CMCResult"] = CMCResult
