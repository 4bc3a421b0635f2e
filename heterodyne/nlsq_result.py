"""``NLSQResult``: the outcome of a least-squares fit, saved and reopened without loss.

It holds xarray objects only: ``params`` and ``stderr`` (one scalar variable per physics
parameter, ``contrast``/``offset`` along ``phi``), ``covariance`` over the varied ``(name, phi)``,
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
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, SPECS
from heterodyne.results import (
    AT_BOUND_RTOL,
    RESULT_TYPES,
    FitResult,
    at_entries,
    entry_label,
    identifiability_warnings,
    index_of,
    pick,
    read_groups,
    settings_dataset,
    verdict_html,
    write_result,
)

CORRELATION_SHOW = 0.7  # the report lists correlations above this
CORRELATION_LINES = 12  # ... the strongest this many of them
# The groups of a result file: the parts of NLSQResult but info; those that are DataArrays
GROUPS = (
    "params", "stderr", "stderr_nominal", "covariance", "starts", "model", "residuals", "data",
    "settings",
)  # fmt: skip
ARRAY_GROUPS = ("covariance", "residuals")
# ... those computed from params when first read (the data's size each)
LAZY = ("model", "residuals")


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
        Covariance of the varied quantities, dims ``(entry, entry_)``, each a stacked
        ``(name, phi)`` index (``phi`` NaN for a scalar or shared quantity;
        ``covariance.set_xindex(["name", "phi"]).sel(name="contrast")``), of the same kind as
        ``stderr``.
    starts : xarray.Dataset
        Every multistart outcome (``x``, ``cost``, ``nfev``, ``success`` by ``start``).
    model : xarray.Dataset
        The model ``c2`` at the best fit on the data's grid (float32), computed from
        ``params`` when first read.
    residuals : xarray.DataArray
        Weighted residuals ``(model - data) / sigma`` at the fitted pairs (mirrored into
        the lower triangle; NaN on the diagonal and at masked pairs; float32), computed
        when first read.
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
    data: xr.Dataset
    settings: xr.Dataset
    info: dict = field(default_factory=dict)

    @classmethod
    def from_fit(
        cls,
        *,
        objective,
        x,
        covariance,
        nominal,
        errors,
        error_scales,
        chi2,
        nfev,
        success,
        message,
        starts,
        notes=None,
    ):
        """The result of :class:`~heterodyne.objective.Objective` ``objective`` at the
        solver vector ``x``, with the covariance of ``x`` of the kind ``errors`` and the
        nominal one."""
        data, scaling = objective.ds, objective.scaling
        n_pairs, n_free = objective.n_pairs, len(objective.entries)
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
        return cls(
            params=objective.values(x),
            stderr=objective.errors(covariance),
            stderr_nominal=objective.errors(nominal),
            covariance=objective.covariance_array(covariance),
            starts=starts,
            data=data,
            settings=settings_dataset(objective.params),
            info=info,
        )

    @cached_property
    def model(self) -> xr.Dataset:
        """The model ``c2`` at the best fit on the data's grid, float32 (computed from
        ``params`` on first read, one block of rows at a time)."""
        from heterodyne.pairs import STORAGE  # JAX: loaded where a grid is computed

        grid = np.empty(self.data["c2"].shape, dtype=STORAGE)
        for k, start, rows in self._model_rows():
            grid[k, start : start + rows.shape[0]] = rows
        return xr.Dataset(
            {"c2": (("phi", "t1", "t2"), grid, {"long_name": "model two-time correlation"})},
            coords=self._coords(),
        )

    @cached_property
    def residuals(self) -> xr.DataArray:
        """Weighted residuals ``(model - data) / sigma`` on the data's grid, float32: NaN
        where a pair is not fitted, the lower triangle the mirror of the upper (computed
        from ``params`` on first read, one block of rows at a time)."""
        from heterodyne.pairs import residual_grid

        return xr.DataArray(
            residual_grid(self.data, self._model_rows())[0],
            dims=("phi", "t1", "t2"),
            coords=self._coords(),
            name="residuals",
            attrs={"long_name": "weighted residual (model - data)"},
        )

    def _model_rows(self):
        """The model at ``params`` by blocks of rows (:func:`heterodyne.model.grid_rows`,
        MODEL.md: ``c2 = offset + contrast g``): a fit holds no grid of the data's size
        until :attr:`model` or :attr:`residuals` is read."""
        from heterodyne.model import grid_rows

        data, params = self.data, self.params
        return grid_rows(
            np.array([float(params[name]) for name in PHYSICS_NAMES]),
            params["contrast"].values,
            params["offset"].values,
            data["t1"].values.astype(float),
            data["phi"].values.astype(float),
            float(data["q"]),
        )

    def _coords(self) -> dict:
        return {k: self.data.coords[k] for k in ("phi", "t1", "t2", "q")}

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
        names = [entry_label(name, phi) for name, phi in index_of(self.covariance)]
        rows = [
            (names[a], names[b], float(corr[a, b]))
            for a in range(len(names))
            for b in range(a + 1, len(names))
            if abs(corr[a, b]) > threshold
        ]
        return sorted(rows, key=lambda r: -abs(r[2]))

    def bound_mask(self) -> np.ndarray:
        """Whether each varied quantity (the covariance's ``entry``) sits on a bound."""
        index = index_of(self.covariance)
        values = at_entries(self.params, index)
        out = np.zeros(len(index), dtype=bool)
        for k, ((name, _), value) in enumerate(zip(index, values, strict=True)):
            lo, hi = (float(self.settings[b].sel(name=name)) for b in ("min", "max"))
            tol = AT_BOUND_RTOL * (hi - lo)
            out[k] = value - lo <= tol or hi - value <= tol
        return out

    def at_bounds(self) -> list[str]:
        """The display labels of the varied quantities that sit on a bound."""
        index = index_of(self.covariance)
        return [entry_label(*index[k]) for k in np.flatnonzero(self.bound_mask())]

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
        """``(label, value, stderr, nominal stderr, min, max, flags, unit)`` per quantity:
        one row per angle of a per-angle quantity, one for a shared one."""
        bound = self.at_bounds()
        for name in PHYSICS_NAMES + SCALING_NAMES:
            vary = bool(self.settings["vary"].sel(name=name))
            lo, hi = (float(self.settings[k].sel(name=name)) for k in ("min", "max"))
            shared = self.info["scaling"] == "shared" and name in SCALING_NAMES
            angles = self.params["phi"].values if name in SCALING_NAMES and not shared else [None]
            for phi in angles:
                label = entry_label(name, np.nan if phi is None else phi)
                flags = "fixed" if not vary else ("at bound" if label in bound else "")
                figures = (
                    pick(ds, name, phi) for ds in (self.params, self.stderr, self.stderr_nominal)
                )
                yield label, *figures, lo, hi, flags, SPECS[name].unit

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
            f"    {'name':<16}{'value':>13}{'stderr':>12}{'rel.':>10}"
            + ("" if nominal else f"{'nominal':>12}")
            + f"{'min':>11}{'max':>11}  {'flags':<9} unit",
        ]
        for label, value, error, least, lo, hi, flags, unit in self._rows():
            rel = ""
            if np.isfinite(error) and value:
                rel = f"{100 * error / abs(value):.2f}%" if error < 1e3 * abs(value) else ">1e5%"
            err = f"{error:.4g}" if np.isfinite(error) else "-"
            row = f"    {label:<16}{value:>13.6g}{err:>12}{rel:>10}"
            if not nominal:
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
            + ("" if nominal else f"<td>{number(least)}</td>")
            + f"<td>{lo:.4g}</td><td>{hi:.4g}</td>"
            f"<td>{flags}</td><td>{html.escape(unit)}</td></tr>"
            for label, value, error, least, lo, hi, flags, unit in self._rows()
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

    def groups(self) -> dict[str, xr.Dataset]:
        """The parts of the result as the Datasets of its file's groups, by name."""
        return {
            name: getattr(self, name).to_dataset() if name in ARRAY_GROUPS else getattr(self, name)
            for name in GROUPS
        }

    def to_netcdf(self, path, *, overwrite: bool = False):
        """Write the whole result to one netCDF-4 file (groups); ``hd.open_result``
        reads it back."""
        return write_result("NLSQResult", self.info, self.groups(), path, overwrite=overwrite)

    @classmethod
    def _from_tree(cls, tree):
        groups, info = read_groups(tree)
        parts = {
            name: groups[name][name] if name in ARRAY_GROUPS else groups[name] for name in GROUPS
        }
        grids = {name: parts.pop(name) for name in LAZY}
        result = cls(**parts, info=info)
        vars(result).update(grids)  # read back as written, not computed again
        return result


RESULT_TYPES["NLSQResult"] = NLSQResult
