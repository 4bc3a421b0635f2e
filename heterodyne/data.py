"""The canonical two-time Dataset: build it, validate it, cut it, save it.

Canonical form (MODEL.md, "Inputs")::

    <xarray.Dataset>
    Dimensions:  (phi, t1, t2)
    Coordinates:
        phi  (phi)  float64  detector azimuth of each q-sector       [deg]
        t1   (t1)   float64  absolute frame time, t_i = t_start + i dt [s]
        t2   (t2)   float64  identical to t1                          [s]
        q    ()     float64  scattering wavevector magnitude          [1/Å]
    Data variables:
        c2     (phi, t1, t2) float64  two-time correlation, symmetric
        sigma  (phi, t1, t2) float64  optional 1-sigma uncertainty of c2
    Attributes:
        dt           frame spacing [s]
        source       where the data came from
        nan_pairs    number of NaN pairs (t1 < t2) over all angles, masked in fits

Every coordinate and variable carries ``units`` and ``long_name`` attrs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from heterodyne.errors import DataError, FileFormatError, OptionError

_RTOL_TIME = 1e-6  # relative tolerance on uniform frame spacing (float32 time stamps)

COORD_ATTRS = {
    "phi": {"units": "deg", "long_name": "detector azimuth of the q-sector"},
    "t1": {"units": "s", "long_name": "absolute time of the first frame of a pair"},
    "t2": {"units": "s", "long_name": "absolute time of the second frame of a pair"},
    "q": {"units": "1/Å", "long_name": "scattering wavevector magnitude"},
}
VAR_ATTRS = {
    "c2": {"units": "", "long_name": "two-time intensity correlation"},
    "sigma": {"units": "", "long_name": "1-sigma uncertainty of c2"},
}


def from_arrays(c2, t, phi, q, sigma=None, *, source: str = "arrays") -> xr.Dataset:
    """Build and validate the canonical Dataset from plain arrays.

    Parameters
    ----------
    c2 : array, shape (n_phi, N, N) or (N, N)
        Two-time correlation; a 2-D matrix is one angle. It must be symmetric; a matrix
        holding only one triangle (the other zero) is symmetrised.
    t : array, shape (N,)
        Absolute frame times [s], uniformly spaced and increasing.
    phi : float or array, shape (n_phi,)
        Detector azimuth of each angle [deg].
    q : float
        Scattering wavevector magnitude [1/Å], > 0.
    sigma : array like ``c2``, optional
        1-sigma uncertainty of ``c2``; > 0 where finite.
    source : str
        Recorded in ``attrs["source"]``.

    Returns
    -------
    xarray.Dataset
        Dims ``(phi, t1, t2)``; see the module docstring.

    Raises
    ------
    DataError
        Naming the argument, its shape and what was expected.
    """
    c2 = np.asarray(c2, dtype=np.float64)
    phi = np.atleast_1d(np.asarray(phi, dtype=np.float64))
    t = np.asarray(t, dtype=np.float64)
    if c2.ndim == 2:
        c2 = c2[None]
    if c2.ndim != 3:
        raise DataError(f"c2 must have shape (n_phi, N, N) or (N, N); got shape {c2.shape}")
    n_phi, n1, n2 = c2.shape
    if n1 != n2:
        raise DataError(f"c2 is not square in time: shape {c2.shape}; expected (n_phi, N, N)")
    if t.shape != (n1,):
        raise DataError(f"t has shape {t.shape}; expected ({n1},), one time per frame of c2")
    if phi.shape != (n_phi,):
        raise DataError(
            f"phi has {phi.size} angles but c2 has {n_phi} (shape {c2.shape}); "
            "give one angle per matrix"
        )
    if sigma is not None:
        sigma = np.asarray(sigma, dtype=np.float64)
        sigma = sigma[None] if sigma.ndim == 2 else sigma
        if sigma.shape != c2.shape:
            raise DataError(f"sigma has shape {sigma.shape}; expected the shape of c2 {c2.shape}")
    c2 = symmetrize(c2)
    if sigma is not None:
        sigma = symmetrize(sigma)
    q_value = np.asarray(q, dtype=np.float64)
    if q_value.ndim != 0:
        raise DataError(
            f"q must be one number [1/Å]; got shape {q_value.shape}. Build one Dataset per q-bin."
        )
    ds = xr.Dataset(
        {"c2": (("phi", "t1", "t2"), c2, dict(VAR_ATTRS["c2"]))},
        coords={
            "phi": ("phi", phi, dict(COORD_ATTRS["phi"])),
            "t1": ("t1", t, dict(COORD_ATTRS["t1"])),
            "t2": ("t2", t.copy(), dict(COORD_ATTRS["t2"])),
            "q": ((), float(q_value), dict(COORD_ATTRS["q"])),
        },
        attrs={"source": str(source)},
    )
    if sigma is not None:
        ds["sigma"] = (("phi", "t1", "t2"), sigma, dict(VAR_ATTRS["sigma"]))
    if t.size >= 2:
        ds.attrs["dt"] = float((t[-1] - t[0]) / (t.size - 1))
    validate(ds)
    ds.attrs["nan_pairs"] = count_nan_pairs(ds)
    return ds


def symmetrize(matrix: np.ndarray) -> np.ndarray:
    """Fill a one-triangle matrix (the other triangle all zero) by symmetry.

    Beamline files store only the upper triangle; a full matrix is returned unchanged.
    A triangle of zeros and NaN only counts as empty; when both are, no value off the
    diagonal is known, and a NaN in either triangle is set in both.
    """
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2] or matrix.shape[-1] < 2:
        return matrix
    n = matrix.shape[-1]
    lower = np.tril_indices(n, -1)
    upper = np.triu_indices(n, 1)
    out = matrix.copy()
    for index in np.ndindex(matrix.shape[:-2]):
        m = out[index]
        lower_zero = np.all(np.nan_to_num(m[lower], nan=0.0) == 0)
        upper_zero = np.all(np.nan_to_num(m[upper], nan=0.0) == 0)
        if lower_zero and not upper_zero:
            m[lower] = m.T[lower]
        elif upper_zero and not lower_zero:
            m[upper] = m.T[upper]
        elif upper_zero and lower_zero:
            # An all-NaN stored triangle beside a zero one is missing data, not zeros.
            m[np.isnan(m.T)] = np.nan
    return out


def validate(ds: xr.Dataset) -> xr.Dataset:
    """Check that ``ds`` has the canonical form; return it unchanged or raise ``DataError``.

    Checks: a Dataset with variable ``c2`` over ``(phi, t1, t2)``, square in time,
    ``t1 == t2`` increasing and uniformly spaced with ``dt`` matching, ``q > 0`` and
    finite, finite ``phi``, no angle whose pairs are all NaN, ``sigma`` (when present)
    positive where finite.
    """
    if not isinstance(ds, xr.Dataset):
        raise DataError(
            f"expected an xarray.Dataset in heterodyne's form (see heterodyne.from_arrays); "
            f"got {type(ds).__name__}"
        )
    if "c2" not in ds.data_vars:
        raise DataError(
            f"the Dataset has no variable 'c2'; its variables are {sorted(ds.data_vars)}"
        )
    c2 = ds["c2"]
    if c2.dims != ("phi", "t1", "t2"):
        raise DataError(
            f"c2 has dims {c2.dims}; expected ('phi', 't1', 't2'). "
            "Use ds.transpose('phi', 't1', 't2') or heterodyne.from_arrays."
        )
    n_phi, n1, n2 = c2.shape
    if n1 != n2:
        raise DataError(f"c2 is not square in time: t1 has {n1} frames, t2 has {n2}")
    if n1 < 3:
        raise DataError(f"c2 has {n1} frames; at least 3 are needed")
    if n_phi < 1:
        raise DataError("c2 has no angles (phi has length 0)")
    if not np.issubdtype(c2.dtype, np.floating):
        raise DataError(f"c2 has dtype {c2.dtype}; expected floating point")
    for name in ("phi", "t1", "t2", "q"):
        if name not in ds.coords:
            raise DataError(f"the Dataset has no coordinate {name!r}")
        if ds[name].dtype.kind not in "iuf":
            raise DataError(f"coordinate {name!r} has dtype {ds[name].dtype}; expected numbers")
    t = np.asarray(ds["t1"].values, dtype=np.float64)
    if not np.array_equal(t, np.asarray(ds["t2"].values, dtype=np.float64)):
        raise DataError("coordinates t1 and t2 differ; they must be the same frame times")
    if not np.all(np.isfinite(t)):
        raise DataError("t1 holds non-finite times")
    steps = np.diff(t)
    if np.any(steps <= 0):
        raise DataError(
            f"t1 is not increasing (first bad step at index {int(np.argmax(steps <= 0))})"
        )
    dt = float((t[-1] - t[0]) / (t.size - 1))
    if np.max(np.abs(steps - dt)) > _RTOL_TIME * dt:
        raise DataError(
            f"t1 is not uniformly spaced: steps range from {steps.min():g} to "
            f"{steps.max():g} s; the model needs t_i = t_start + i dt"
        )
    if "dt" in ds.attrs and not np.isclose(_number(ds.attrs["dt"]), dt, rtol=_RTOL_TIME):
        raise DataError(
            f"attrs['dt'] = {ds.attrs['dt']!r} s does not match the spacing of t1 ({dt:g} s)"
        )
    q = np.asarray(ds["q"].values)
    if q.ndim != 0:
        raise DataError(
            f"q must be a scalar coordinate; got shape {q.shape}. "
            "Select one q-bin first (ds.sel(q=...))."
        )
    if not np.isfinite(q) or q <= 0:
        raise DataError(f"q must be positive and finite [1/Å]; got {float(q)}")
    phi = np.asarray(ds["phi"].values, dtype=np.float64)
    if not np.all(np.isfinite(phi)):
        raise DataError(f"phi holds non-finite angles: {phi}")
    upper = np.triu_indices(n1, 1)
    finite = np.isfinite(c2.values[:, upper[0], upper[1]])
    empty = np.flatnonzero(~finite.any(axis=1))
    if empty.size:
        raise DataError(
            f"c2 is all NaN/inf for phi = {phi[empty].tolist()} deg; drop those "
            "angles (ds.drop_sel(phi=...))"
        )
    if "sigma" in ds.data_vars:
        sigma = ds["sigma"]
        if sigma.dims != c2.dims or sigma.shape != c2.shape:
            raise DataError(
                f"sigma has dims {sigma.dims} {sigma.shape}; expected those of c2 "
                f"{c2.dims} {c2.shape}"
            )
        values = sigma.values[:, upper[0], upper[1]]
        if np.any(values[np.isfinite(values)] <= 0):
            raise DataError("sigma must be > 0 where finite")
    return ds


def _number(value) -> float:
    """``value`` as a float; NaN when it is not one number (an attribute read from a file)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def count_nan_pairs(ds: xr.Dataset) -> int:
    """Number of non-finite ``c2`` (or ``sigma``) values at pairs ``t1 < t2``, all angles."""
    n = ds.sizes["t1"]
    i, j = np.triu_indices(n, 1)
    bad = ~np.isfinite(ds["c2"].values[:, i, j])
    if "sigma" in ds.data_vars:
        bad |= ~np.isfinite(ds["sigma"].values[:, i, j])
    return int(bad.sum())


def select(ds: xr.Dataset, *, phi=None, frames=None) -> xr.Dataset:
    """Cut a canonical Dataset to some angles and a frame window.

    ``phi``: one angle or a list [deg], matched to the nearest angle present;
    ``frames``: a ``slice(a, b)`` of frame indices. Times stay absolute.
    """
    validate(ds)
    out = ds
    if phi is not None:
        wanted = np.atleast_1d(np.asarray(phi, dtype=np.float64))
        # Positional nearest match: sel(method="nearest") fails on unsorted angles.
        angles = ds["phi"].values
        out = out.isel(phi=np.argmin(np.abs(angles[None, :] - wanted[:, None]), axis=1))
        if len(np.unique(out["phi"].values)) != out.sizes["phi"]:
            raise OptionError(
                f"phi={wanted.tolist()} selects the same angle twice; "
                f"the angles are {ds['phi'].values.tolist()}"
            )
    if frames is not None:
        if not isinstance(frames, slice):
            raise OptionError(f"frames must be a slice(a, b); got {frames!r}")
        if frames.step not in (None, 1):
            raise OptionError("frames must be contiguous (step 1): the model needs uniform dt")
        out = out.isel(t1=frames, t2=frames)
        if out.sizes["t1"] < 3:
            raise OptionError(f"frames={frames} leaves {out.sizes['t1']} frames; need >= 3")
    out = out.copy()
    out.attrs["nan_pairs"] = count_nan_pairs(out)
    return validate(out)


def atomic_write(write, path, *, overwrite: bool = False) -> Path:
    """Run ``write(tmp_path)`` then rename the file to ``path``.

    A process killed mid-write leaves any old file intact and no half-written file under
    ``path``. Refuses to replace an existing file unless ``overwrite=True``.

    ``tmp_path`` is ``.NAME.PID.tmp`` in the folder of ``path``: hidden, ending in
    ``.tmp`` (no ``*.nc`` or ``*.h5`` pattern matches it) and renamed only once complete.
    A process killed by SIGKILL leaves it behind, half written; delete it by hand.
    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def to_netcdf(ds: xr.Dataset, path, *, overwrite: bool = False) -> Path:
    """Save a canonical Dataset as netCDF-4 (h5netcdf, gzip), atomically.

    ``hd.load(path)`` reads it back identical.
    """
    validate(ds)
    nt = ds.sizes["t1"]
    encoding = {
        name: {
            "compression": "gzip",
            "compression_opts": 4,
            "shuffle": True,
            "chunksizes": (1, nt, nt),
        }
        for name in ("c2", "sigma")
        if name in ds.data_vars
    }
    return atomic_write(
        lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding),
        path,
        overwrite=overwrite,
    )
