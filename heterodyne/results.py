"""What the result types share: their ``params`` layout, parameter settings, the
model's degeneracies, reading values by label, the verdict's HTML, and their files.

Each result is one immutable object per fit (:class:`heterodyne.nlsq_result.NLSQResult`,
:class:`heterodyne.cmc_result.CMCResult`); ``to_netcdf`` writes it as groups of one
netCDF-4 file and :func:`open_result` reads any result type back.
"""

from __future__ import annotations

import html
import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from heterodyne import checks
from heterodyne.errors import FileFormatError, OptionError
from heterodyne.files import atomic_write
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, UNITS, Parameters

AT_BOUND_RTOL = 1e-6  # a value this close to a bound (relative to the range) is "at bound"
# The result types by the ``result_type`` attribute of their files; each result module
# adds its own.
RESULT_TYPES: dict[str, type] = {}
# The module of each result type, imported by open_result: a fresh process has imported
# none of them.
RESULT_MODULES = {
    "NLSQResult": "heterodyne.nlsq_result",
    "CMCResult": "heterodyne.cmc_result",
    "JointResult": "heterodyne.joint_result",
    "JointCMCResult": "heterodyne.joint_cmc",
}
# The layout of result files, in their ``format`` attribute: 2 keeps per-angle quantities
# on a ``phi`` dimension and the varied ones on a ``(name, phi)`` index; files without
# it (format 1) stored them by label (``contrast[1]``).
RESULT_FORMAT = 2


def write_result(kind: str, info: dict, groups: dict, path, *, overwrite: bool) -> Path:
    """Write a result to one netCDF-4 file, atomically: ``info`` as the root attributes
    (with ``result_type = kind`` and ``format = RESULT_FORMAT``), each Dataset of
    ``groups`` as the group of its name."""
    root = xr.Dataset(attrs={"result_type": kind, "format": RESULT_FORMAT, **info})
    tree = xr.DataTree.from_dict({"/": root, **{f"/{k}": v for k, v in groups.items()}})
    return atomic_write(
        lambda tmp: tree.to_netcdf(tmp, engine="h5netcdf"), path, overwrite=overwrite
    )


def read_groups(tree: xr.DataTree) -> tuple[dict[str, xr.Dataset], dict]:
    """The groups of a result file by name, and its ``info`` (the root attributes less
    those :func:`write_result` adds)."""
    groups = {name: tree[name].to_dataset() for name in tree.children}
    info = {k: v for k, v in tree.attrs.items() if k not in ("result_type", "format")}
    return groups, info


def warning_lines(warns) -> list[str]:
    """The ``[[Warnings]]`` section of a text report (none without warnings)."""
    return ["[[Warnings]]", *(f"    - {w}" for w in warns)] if warns else []


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


class FitResult:
    """What both result types share: reading values, errors and parameter settings
    back from ``params``, ``stderr`` and ``settings``."""

    def value(self, name: str, phi: float | None = None) -> float:
        """Best-fit value (NLSQ) or posterior mean (CMC) of ``name``; ``phi`` [deg] picks
        the angle of a per-angle quantity (``result.value("contrast", phi=60)``)."""
        return pick(self.params, name, phi)

    def error(self, name: str, phi: float | None = None) -> float:
        """Standard error (NLSQ) or posterior standard deviation (CMC) of ``name`` (at
        angle ``phi`` of a per-angle quantity)."""
        return pick(self.stderr, name, phi)

    def parameters(self) -> Parameters:
        """The fitted values (NLSQ) or posterior means (CMC) as a ``Parameters``, with
        the settings as fitted (for a warm start, a refit or a plot)."""
        p = Parameters()
        params = self.params
        for name in PHYSICS_NAMES + SCALING_NAMES:
            row = self.settings.sel(name=name)
            p[name].vary = bool(row["vary"])
            p[name].min, p[name].max = float(row["min"]), float(row["max"])
            value = params[name].values
            p[name].value = float(value) if value.ndim == 0 else value.copy()
        return p


def pick(ds: xr.Dataset, name: str, phi: float | None = None) -> float:
    """One value of a ``params``-layout Dataset: ``ds[name]``, at angle ``phi`` [deg]
    where it has a ``phi`` dimension (a quantity equal at every angle needs none)."""
    if name not in ds.data_vars:
        raise OptionError(f"no quantity {name!r}; the result holds {', '.join(ds.data_vars)}")
    var = ds[name]
    if "phi" not in var.dims:
        if phi is not None:
            raise OptionError(f"{name} is one value for all angles; call without phi")
        return float(var)
    if phi is None:
        values = np.unique(var.values, equal_nan=True)
        if values.size == 1:  # shared scaling, or a fixed (NaN) error
            return float(values[0])
        raise OptionError(
            f"{name} has one value per angle: give phi, one of "
            f"{', '.join(f'{v:g}' for v in var['phi'].values)} deg"
        )
    if not np.any(np.isclose(var["phi"].values, phi)):
        raise OptionError(
            f"phi={phi!r} is not an angle of this result; its angles are "
            f"{', '.join(f'{v:g}' for v in var['phi'].values)} deg"
        )
    return float(var.sel(phi=phi, method="nearest"))


def open_result(path):
    """Read a result written by ``.to_netcdf`` (``NLSQResult`` or ``CMCResult``)."""
    path = checks.readable_file(path)
    try:
        tree = xr.open_datatree(path, engine="h5netcdf").load()
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path}: cannot be read as a heterodyne result ({err})") from err
    kind = tree.attrs.get("result_type")
    if kind in RESULT_MODULES:
        importlib.import_module(RESULT_MODULES[kind])
    if kind not in RESULT_TYPES:
        raise FileFormatError(
            f"{path}: attribute result_type is {kind!r}; expected one of "
            f"{sorted(RESULT_MODULES)} (is this a data file? use hd.load)"
        )
    if int(tree.attrs.get("format", 1)) < RESULT_FORMAT:
        group = "data" if kind == "NLSQResult" else "observed_data"
        raise FileFormatError(
            f"{path}: a {kind} file of an earlier heterodyne, which stored per-angle "
            "quantities by label (contrast[1]); this version keeps them on a phi dimension "
            "and does not read those files. Fit the data again: they are in the file, "
            f"xr.open_dataset(path, group={group!r}, engine='h5netcdf')"
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


def entries(names, phis) -> pd.MultiIndex:
    """The stacked ``(name, phi)`` index of fitted quantities: ``phi`` in degrees for the
    entry of one angle of a per-angle quantity, NaN for a scalar (or shared) one."""
    return pd.MultiIndex.from_arrays(
        [np.asarray(names, dtype=str), np.asarray(phis, dtype=float)], names=("name", "phi")
    )


def entry_label(name: str, phi: float) -> str:
    """Display text of an entry: ``"v0"``, ``"contrast[60°]"`` (reports and tables only)."""
    return str(name) if np.isnan(phi) else f"{name}[{phi:g}°]"


def at_entries(ds: xr.Dataset, index: pd.MultiIndex) -> np.ndarray:
    """The values of ``ds`` (``params`` layout) at each ``(name, phi)`` of ``index``."""
    out = np.empty(len(index))
    for k, (name, phi) in enumerate(index):
        var = ds[name]
        if "phi" in var.dims:
            # a shared (NaN-phi) quantity is the same at every angle
            var = var.isel(phi=0) if np.isnan(phi) else var.sel(phi=phi)
        out[k] = float(var)
    return out


def assign_entries(ds: xr.Dataset, index: pd.MultiIndex, values) -> xr.Dataset:
    """A copy of ``ds`` (``params`` layout) with each ``(name, phi)`` of ``index`` set to
    its value; a NaN-phi entry of a per-angle variable sets every angle."""
    out = ds.copy(deep=True)
    for (name, phi), value in zip(index, np.asarray(values, float), strict=True):
        if "phi" in out[name].dims and not np.isnan(phi):
            out[name].loc[{"phi": phi}] = value
        else:
            out[name][...] = value
    return out


def entry_coords(index: pd.MultiIndex, dim: str = "entry", suffix: str = "") -> dict:
    """The ``(name, phi)`` of ``index`` as coordinates ``name`` and ``phi`` along ``dim``
    (plain coordinates, so that files round-trip exactly; ``phi`` NaN for a scalar)."""
    return {
        f"name{suffix}": (dim, np.asarray(index.get_level_values("name"), dtype=str)),
        f"phi{suffix}": (dim, np.asarray(index.get_level_values("phi"), float), {"units": "deg"}),
    }


def index_of(obj, dim: str = "entry") -> pd.MultiIndex:
    """The ``(name, phi)`` index of ``obj`` along ``dim`` (from :func:`entry_coords`)."""
    suffix = "_" if dim.endswith("_") else ""
    return entries(obj[f"name{suffix}"].values, obj[f"phi{suffix}"].values)


def stacked(values, index: pd.MultiIndex, *, name: str) -> xr.DataArray:
    """A square matrix over the entries of ``index`` as a DataArray with dims
    ``(entry, entry_)``, coordinates ``name``, ``phi`` on the first and ``name_``,
    ``phi_`` on the second."""
    coords = {**entry_coords(index), **entry_coords(index, "entry_", "_")}
    return xr.DataArray(values, dims=("entry", "entry_"), coords=coords, name=name)
