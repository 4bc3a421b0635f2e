"""What the result types share: their ``params`` layout, parameter settings, the
model's degeneracies, reading values by label, the verdict's HTML, and their files.

Each result is one immutable object per fit (:class:`heterodyne.nlsq_result.NLSQResult`,
:class:`heterodyne.cmc_result.CMCResult`); ``to_netcdf`` writes it as groups of one
netCDF-4 file and :func:`open_result` reads any result type back.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import xarray as xr

from heterodyne import checks
from heterodyne.errors import FileFormatError
from heterodyne.files import atomic_write
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, UNITS, Parameters, parse_label

AT_BOUND_RTOL = 1e-6  # a value this close to a bound (relative to the range) is "at bound"
# The result types by the ``result_type`` attribute of their files; each result module
# adds its own.
RESULT_TYPES: dict[str, type] = {}


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


class FitResult:
    """What both result types share: reading values, errors and parameter settings
    back from ``params``, ``stderr`` and ``settings``."""

    def value(self, label: str) -> float:
        """Best-fit value (NLSQ) or posterior mean (CMC) of a quantity by label
        (``"v0"``, ``"contrast[1]"``)."""
        return by_label(self.params, label)

    def error(self, label: str) -> float:
        """Standard error (NLSQ) or posterior standard deviation (CMC) of a quantity by
        label."""
        return by_label(self.stderr, label)

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


def by_label(ds: xr.Dataset, label: str) -> float:
    """The value of ``ds`` at a label (:func:`~heterodyne.parameters.parse_label`): the
    entry of angle ``k`` of a per-angle variable, or a scalar."""
    name, angle = parse_label(label)
    values = np.atleast_1d(ds[name].values)
    return float(values[0 if angle is None else angle])
