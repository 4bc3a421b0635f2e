"""``NLSQResult``: the outcome of a least-squares fit, saved and reopened without loss.

It holds xarray objects only: ``params`` and ``stderr`` (one scalar variable per physics
parameter, ``contrast``/``offset`` along ``phi``), ``covariance`` over the varied names,
the multistart outcomes, the model and residuals, the fitted data and the parameter
settings. ``to_netcdf`` writes them as groups of one netCDF-4 file;
:func:`heterodyne.results.open_result` reads it back.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import xarray as xr

from heterodyne.data import time_origin
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, SPECS, parse_label
from heterodyne.results import (
    AT_BOUND_RTOL,
    RESULT_TYPES,
    FitResult,
    by_label,
    identifiability_warnings,
    params_layout,
    settings_dataset,
    verdict_html,
    write_tree,
)

CORRELATION_SHOW = 0.7  # the report lists correlations above this
CORRELATION_LINES = 12  # ... the strongest this many of them


@dataclass(frozen=True, repr=False)
class NLSQResult(FitResult):
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
        ``speckle_kappa`` and ``white_variance``, the two scales of the error model
        (:mod:`heterodyne.uncertainty`).
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
        n = fitted.shape[-1]
        for row, col in ((pairs.i, pairs.j), (pairs.j, pairs.i)):
            # one flat index, built in place (not three converted index arrays)
            flat = np.asarray(pairs.angle).astype(np.int64)
            flat *= n
            flat += np.asarray(row)
            flat *= n
            flat += np.asarray(col)
            fitted.reshape(-1)[flat] = residuals
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
                f"    error model       kappa {kappa:.4g}{pixels}, white variance "
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
                least = by_label(self.stderr_nominal, label)
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
            + ("" if nominal else f"<td>{number(by_label(self.stderr_nominal, label))}</td>")
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


RESULT_TYPES["NLSQResult"] = NLSQResult
