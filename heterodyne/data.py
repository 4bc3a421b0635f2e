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
        dropped_frames  frames with no finite pair at any angle (missing from the
                     measurement, or excluded by the user): NaN rows and columns
        time_origin  where the times came from (files read by heterodyne.load)
        excluded_frames  the stored frames excluded by heterodyne.load, e.g. "40:43, 90"

Every coordinate and variable carries ``units`` and ``long_name`` attrs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from heterodyne import checks
from heterodyne.errors import DataError, OptionError
from heterodyne.files import atomic_write

_RTOL_TIME = 1e-6  # relative tolerance on uniform frame spacing (float32 time stamps)
# c2[i, j] and c2[j, i] may differ by this fraction of the angle's largest |c2| off the
# diagonal (a large diagonal spike must not widen it): files whose
# triangles were accumulated separately in float32 differ at ~1e-5, far below any noise.
_RTOL_SYMMETRY = 1e-4
_ROWS = 256  # rows per block of the symmetry check: temporary memory O(_ROWS N), not O(N²)

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


# The convention of every time coordinate (MODEL.md, "Inputs"), stated in reports and plots.
TIME_CONVENTION = "each frame at the end of its exposure (the APS viewer draws k dt from 0)"


def time_origin(ds: xr.Dataset) -> str:
    """Where the times of ``ds`` came from and their convention, in one line."""
    return ds.attrs.get("time_origin", f"as given; {TIME_CONVENTION}")


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
    c2 = _real_array(c2, "c2")  # copied by symmetrize: the Dataset owns its data
    phi = np.atleast_1d(_real_array(phi, "phi"))
    t = _real_array(t, "t")
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
        sigma = _real_array(sigma, "sigma")
        sigma = sigma[None] if sigma.ndim == 2 else sigma
        if sigma.shape != c2.shape:
            raise DataError(f"sigma has shape {sigma.shape}; expected the shape of c2 {c2.shape}")
    c2 = symmetrize(c2)
    if sigma is not None:
        sigma = symmetrize(sigma)
    return from_owned_arrays(c2, t, phi, q, sigma, source=source)


def from_owned_arrays(c2, t, phi, q, sigma=None, *, source: str) -> xr.Dataset:
    """The canonical Dataset around arrays it takes over, not copied: ``c2`` (and
    ``sigma``) float64 of shape ``(n_phi, N, N)``, full symmetric matrices that nothing
    else writes to (the simulator's, or :func:`from_arrays`' own copies), ``t`` (N,) and
    ``phi`` (n_phi,) float64. Validated (:func:`validate`; raises ``DataError``) and its
    missing pairs counted."""
    q_value = _real_array(q, "q")
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
    return tally_missing(ds)


def _real_array(value, name: str) -> np.ndarray:
    """``value`` as a float64 array; complex, text or ragged input raises ``DataError``
    (a cast would silently drop an imaginary part)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise DataError(f"{name} is not an array of numbers ({err})") from None
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"{name} has dtype {array.dtype}; expected real numbers"
            + (" (complex values: give the real correlation)" if array.dtype.kind == "c" else "")
        )
    return array.astype(np.float64, copy=False)


def symmetrize(matrix: np.ndarray) -> np.ndarray:
    """Fill a one-triangle matrix (the other triangle all zero) by symmetry.

    Beamline files store only the upper triangle; a full matrix is returned as a copy.
    A triangle of zeros and NaN only counts as empty; when both are, no value off the
    diagonal is known, and a NaN in either triangle is set in both.
    """
    out = np.array(matrix, copy=True)
    if out.ndim >= 2 and out.shape[-1] == out.shape[-2] >= 2:
        below = np.tri(out.shape[-1], k=-1, dtype=bool)
        for index in np.ndindex(out.shape[:-2]):
            fill_triangle(out[index], below)
    return out


def fill_triangle(m: np.ndarray, below: np.ndarray) -> None:
    """Fill one square matrix by symmetry, in place, as :func:`symmetrize` does.

    For readers that fill a preallocated stack one angle at a time (no second copy of
    the stack); ``below`` masks the lower triangle, ``np.tri(N, k=-1, dtype=bool)``,
    built once for all angles.
    """
    # a full matrix (both triangles hold values) is left as it is, found so a block of
    # rows at a time; m[below] and m.T[below] list the two values of each pair (i, j) in
    # the same order; one angle at a time and a boolean mask keep the temporaries of a
    # matrix given as one triangle to half a matrix.
    lower_zero, upper_zero = _empty_triangle(m, below), _empty_triangle(m.T, below)
    if not (lower_zero or upper_zero):
        return
    lower, upper = m[below], m.T[below]
    if lower_zero and not upper_zero:
        m[below] = upper
    elif upper_zero and not lower_zero:
        m.T[below] = lower
    elif upper_zero and lower_zero:
        # An all-NaN stored triangle beside a zero one is missing data, not zeros.
        missing = np.isnan(lower) | np.isnan(upper)
        m[below] = np.where(missing, np.nan, lower)
        m.T[below] = np.where(missing, np.nan, upper)


def _empty_triangle(m: np.ndarray, below: np.ndarray) -> bool:
    """Whether the triangle of ``m`` that ``below`` masks holds only zeros and NaN, read
    ``_ROWS`` rows at a time (it stops at the first block with a value)."""
    for start in range(0, m.shape[0], _ROWS):
        rows, mask = m[start : start + _ROWS], below[start : start + _ROWS]
        values = rows[mask]
        if not np.all((values == 0) | np.isnan(values)):
            return False
    return True


def validate(ds: xr.Dataset) -> xr.Dataset:
    """Check that ``ds`` has the canonical form; return it unchanged or raise ``DataError``.

    Checks: a Dataset with variable ``c2`` over ``(phi, t1, t2)``, square in time,
    ``t1 == t2`` increasing and uniformly spaced with ``dt`` matching, ``q > 0`` and
    finite, finite ``phi``, no angle whose pairs are all NaN, ``sigma`` (when present)
    positive where finite, and ``c2`` symmetric: ``c2[i, j] == c2[j, i]`` (NaN equal to
    NaN) within ``1e-4`` of the angle's largest ``|c2|`` off the diagonal.
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
    if "q" in ds.dims:
        raise DataError(
            f"this Dataset holds {ds.sizes['q']} q-bins (dims {tuple(ds['c2'].dims)}) and this "
            "function takes one: pick it with hd.select(ds, q=...). hd.fit_nlsq fits all "
            "the bins together"
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
    for name in ("t1", "t2"):
        times = np.asarray(ds[name].values, dtype=np.float64)
        if not np.all(np.isfinite(times)):
            k = int(np.argmin(np.isfinite(times)))
            raise DataError(
                f"{name} holds non-finite times: {name}[{k}] = {float(times[k])!r} s. Times are "
                "t_i = t_start + i dt: a frame time (dt; frame_time in a beamline file) that "
                "is NaN, infinite or too large gives these"
            )
    if not np.array_equal(t, np.asarray(ds["t2"].values, dtype=np.float64)):
        raise DataError("coordinates t1 and t2 differ; they must be the same frame times")
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
    # One angle at a time: validation must not need a copy of the whole grid.
    values = c2.values
    empty = [k for k in range(n_phi) if not _any_pair(values[k])]
    if empty:
        raise DataError(
            f"c2 is all NaN/inf for phi = {phi[empty].tolist()} deg; drop those "
            "angles (ds.drop_sel(phi=...))"
        )
    for k in range(n_phi):
        pair = _first_asymmetric(values[k])
        if pair is not None:
            i, j = pair
            raise DataError(
                f"c2 is not symmetric: at phi = {phi[k]:g} deg, c2[{i}, {j}] = "
                f"{float(values[k, i, j])!r} but c2[{j}, {i}] = {float(values[k, j, i])!r} "
                "(frame indices t1, t2). A canonical Dataset holds the full symmetric matrix; "
                "heterodyne.from_arrays fills a matrix given as one triangle (the other zero)"
            )
    if "sigma" in ds.data_vars:
        sigma = ds["sigma"]
        if sigma.dims != c2.dims or sigma.shape != c2.shape:
            raise DataError(
                f"sigma has dims {sigma.dims} {sigma.shape}; expected those of c2 "
                f"{c2.dims} {c2.shape}"
            )
        for matrix in sigma.values:
            if any(
                np.triu(np.isfinite(rows) & (rows <= 0), 1).any() for rows in _upper_rows(matrix)
            ):
                raise DataError("sigma must be > 0 where finite")
    return ds


def _upper_rows(matrix: np.ndarray):
    """``matrix`` in blocks of ``_ROWS`` rows, each from its first row's diagonal on (a
    view): ``np.triu(block, 1)`` keeps its pairs ``t1 < t2``. Memory ``O(_ROWS N)``."""
    for start in range(0, matrix.shape[0], _ROWS):
        yield matrix[start : start + _ROWS, start:]


def _any_pair(matrix: np.ndarray) -> bool:
    """Whether ``matrix`` holds a finite value above its diagonal (it stops at the first
    block of rows with one)."""
    return any(np.triu(np.isfinite(rows), 1).any() for rows in _upper_rows(matrix))


def _first_asymmetric(matrix: np.ndarray) -> tuple[int, int] | None:
    """The first pair ``(i, j)``, ``i < j`` in row order, where ``matrix`` is not symmetric
    (:func:`validate`); ``None`` when it is.

    Compared in tiles of ``_ROWS x _ROWS`` (a tile above the diagonal against the
    transpose of its mirror, both read along their rows); most matrices are exactly
    symmetric (from_arrays fills a triangle by copying): only the tiles that are not are
    compared within the tolerance."""
    edges = range(0, matrix.shape[0], _ROWS)
    unequal = [
        (a, b)
        for a in edges
        for b in edges
        if b >= a and not np.array_equal(*_mirrored(matrix, a, b))
    ]
    if not unequal:
        return None
    scale = max(_off_diagonal_scale(a, matrix[a : a + _ROWS]) for a in edges)
    for row in sorted({a for a, _ in unequal}):
        found = []
        for a, b in unequal:
            if a != row:
                continue
            rows, columns = _mirrored(matrix, a, b)
            with np.errstate(invalid="ignore"):  # inf - inf; inf == inf is caught by ==
                same = (rows == columns) | (np.abs(rows - columns) <= _RTOL_SYMMETRY * scale)
            same |= np.isnan(rows) & np.isnan(columns)
            if not same.all():
                i, j = np.argwhere(~same)[0]
                found.append((int(a + i), int(b + j)))
        if found:
            # the first in row order lies above the diagonal: had (j, i) with j > i come
            # first, (i, j) would have been met in an earlier row
            return min(found)
    return None


def _mirrored(matrix: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The tile of ``matrix`` at rows ``a`` and columns ``b`` (``_ROWS`` each), and the
    transpose of its mirror tile."""
    return matrix[a : a + _ROWS, b : b + _ROWS], matrix[b : b + _ROWS, a : a + _ROWS].T


def _off_diagonal_scale(start: int, rows: np.ndarray) -> float:
    """Largest finite ``|c2|`` off the diagonal in the block of ``rows`` from row
    ``start``: the diagonal (the speckle and shot-noise spike) may be far larger than any
    pair, and must not loosen the symmetry tolerance."""
    magnitude = np.where(np.isfinite(rows), np.abs(rows), 0.0)
    k = np.arange(rows.shape[0])
    magnitude[k, start + k] = 0.0
    return float(magnitude.max(initial=0.0))


def _number(value) -> float:
    """``value`` as a float; NaN when it is not one number (an attribute read from a file)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def tally_missing(ds: xr.Dataset) -> xr.Dataset:
    """Set ``attrs["nan_pairs"]`` (:func:`count_nan_pairs`) and ``attrs["dropped_frames"]``
    (:func:`count_dropped_frames`) of ``ds``, in place, and return it."""
    ds.attrs["nan_pairs"] = count_nan_pairs(ds)
    ds.attrs["dropped_frames"] = count_dropped_frames(ds)
    return ds


def count_dropped_frames(ds: xr.Dataset) -> int:
    """Number of frames whose ``c2`` with every other frame is non-finite at every angle:
    frames missing from the measurement, whose pairs are masked."""
    n = ds.sizes["t1"]
    kept = np.zeros(n, dtype=bool)
    for matrix in ds["c2"].values:  # one angle at a time, as count_nan_pairs
        finite = np.isfinite(matrix)
        finite[np.arange(n), np.arange(n)] = False
        kept |= finite.any(axis=1)
    return int(n - kept.sum())


def count_nan_pairs(ds: xr.Dataset) -> int:
    """Number of non-finite ``c2`` (or ``sigma``) values at pairs ``t1 < t2``, all angles."""
    sigma = ds["sigma"].values if "sigma" in ds.data_vars else None
    count = 0
    for k, matrix in enumerate(ds["c2"].values):
        blocks = zip(
            _upper_rows(matrix), _upper_rows(matrix if sigma is None else sigma[k]), strict=True
        )
        for rows, sigma_rows in blocks:
            count += int(np.triu(~(np.isfinite(rows) & np.isfinite(sigma_rows)), 1).sum())
    return count


def select(ds: xr.Dataset, *, q=None, phi=None, frames=None) -> xr.Dataset:
    """Cut a canonical Dataset to some angles and a frame window, or a multi-q Dataset
    (:mod:`heterodyne.qbins`) to some q-bins.

    ``q``: of a multi-q Dataset, one number [1/Å] gives the nearest q-bin as a single-q
    Dataset with its own angles, a list keeps the nearest bins (multi-q);
    ``phi``: one angle or a list [deg], matched to the nearest angle present;
    ``frames``: a ``slice(a, b)`` of frame indices. Times stay absolute.
    """
    if isinstance(ds, xr.Dataset) and "q" in ds.dims:
        from heterodyne import qbins

        return qbins.select(ds, q=q, phi=phi, frames=frames)
    validate(ds)
    if q is not None:
        raise OptionError(
            f"q={q!r}: this Dataset is one q-bin (q = {float(ds['q']):g} 1/Å); q selects "
            "bins of a multi-q Dataset"
        )
    checks.frame_window(frames)
    out = ds
    if phi is not None:
        wanted = checks.numbers(phi, "phi [deg]")
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
    return validate(tally_missing(out.copy()))


def to_netcdf(ds: xr.Dataset, path, *, overwrite: bool = False) -> Path:
    """Save a canonical Dataset as netCDF-4 (h5netcdf, gzip), atomically.

    ``hd.load(path)`` reads it back identical.
    """
    if "q" in ds.dims:
        from heterodyne import qbins

        qbins.validate_multi(ds)
    else:
        validate(ds)
    nt = ds.sizes["t1"]
    encoding = {
        name: {
            "compression": "gzip",
            "compression_opts": 4,
            "shuffle": True,
            "chunksizes": (1,) * (ds[name].ndim - 2) + (nt, nt),
        }
        for name in ("c2", "sigma")
        if name in ds.data_vars
    }
    return atomic_write(
        lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding),
        path,
        overwrite=overwrite,
    )
