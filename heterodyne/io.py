"""Read two-time correlation files into the canonical Dataset of :mod:`heterodyne.data`.

Three layouts are recognised by the group that holds the matrices:

``aps_u`` (APS-U 8-ID-I two-time pipeline), found by ``xpcs/twotime/correlation_map``
    q and phi grids in ``xpcs/qmap/dynamic_v_list_dim0`` [1/Å] and ``..._dim1`` [deg];
    ``xpcs/twotime/processed_bins`` lists 1-based bin numbers with
    ``bin - 1 = q_index * n_phi + phi_index``; ``correlation_map/c2_00001``,
    ``c2_00002``, ... hold one matrix per processed bin, in that order. Frame spacing:
    ``entry/instrument/detector_1/frame_time``. An optional ``xpcs/twotime/t`` places
    the frames in time: the first frame, and frames dropped by the detector (see Notes
    of :func:`load`).
``aps_legacy`` (APS 8-ID before APS-U), found by ``exchange/C2T_all``
    ``xpcs/dqlist`` and ``xpcs/dphilist`` give the q and phi of each bin; matrix
    ``exchange/C2T_all/c2_NNNNN`` belongs to bin ``NNNNN`` (1-based). Frame spacing:
    ``measurement/instrument/detector/exposure_period``, else
    ``entry/instrument/detector_1/frame_time``.
``netcdf`` (written by :func:`heterodyne.data.to_netcdf`), found by a root variable ``c2``
    Read with xarray (``engine="h5netcdf"``) and returned unchanged but for
    ``attrs["nan_pairs"]`` and ``attrs["dropped_frames"]``, counted again.

Beamline matrices may hold one triangle only (the other zero); they are symmetrised.
Every problem with a file raises :class:`~heterodyne.errors.FileFormatError` naming the
file, the path inside it and what was expected.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import xarray as xr

from heterodyne import checks
from heterodyne.data import check_memory, from_arrays, select, tally_missing, validate
from heterodyne.errors import DataError, FileFormatError, OptionError

logger = logging.getLogger(__name__)

_Q_WARN = 0.01  # warn when the nearest q-bin is further than 1 % from the q asked for
_Q_SAME = 1e-6  # bins whose q agree to this relative tolerance form one q-bin (float32)
_T_RTOL = 1e-3  # tolerance of a stored time vector against frame_time, in units of dt
_MATRIX_NAME = re.compile(r"c2_(\d+)")
# Peak memory of a load beyond what exists before it, in bytes per value of the grid read
# (check_memory): the matrices read into one float64 array and the Dataset's symmetrised
# copy (2 x 8 bytes per value), plus temporaries of one angle at a time (1.5 x 8 bytes per
# value of one matrix), each with a margin of 10 %. Measured by tracemalloc and peak RSS:
# 2.38 times the matrices' float64 size at 1500 frames x 4 angles, 3.45 times at 1 angle,
# 2.32 times at 3000 frames x 4 angles; netCDF files need less (1.28 times at 3000 x 4).
LOAD_MEMORY = {"per_value": 18.0, "per_angle": 13.0}

_LAYOUTS = {
    "aps_u": "xpcs/twotime/correlation_map",
    "aps_legacy": "exchange/C2T_all",
    "netcdf": "c2",
}
# Where each beamline layout lists the q and the phi of its bins.
_LISTS = {
    "aps_u": ("xpcs/qmap/dynamic_v_list_dim0", "xpcs/qmap/dynamic_v_list_dim1"),
    "aps_legacy": ("xpcs/dqlist", "xpcs/dphilist"),
}
_APS_U_FRAME_TIME = ("entry/instrument/detector_1/frame_time",)
_LEGACY_FRAME_TIME = (
    "measurement/instrument/detector/exposure_period",
    "entry/instrument/detector_1/frame_time",
)


class _Bins(NamedTuple):
    """What a beamline file holds, before any matrix is read."""

    layout: str
    q: np.ndarray  # q of each bin [1/Å]
    phi: np.ndarray  # phi of each bin [deg]
    names: list[str]  # path of each bin's matrix inside the file
    n_frames: int
    dt: float
    index: np.ndarray  # 0-based index in the acquisition of each frame of the matrices


def load(
    path: str | os.PathLike,
    *,
    q: float | None = None,
    phi: float | Sequence[float] | None = None,
    frames: slice | None = None,
) -> xr.Dataset:
    """Read one q-bin of a two-time correlation file as a canonical Dataset.

    Parameters
    ----------
    path : str or path-like
        An APS-U or APS legacy HDF5 file, or a netCDF file written by heterodyne.
    q : float, optional
        Wavevector [1/Å]; the nearest q-bin is read. Required when the file holds more
        than one q-bin (:func:`q_values` lists them).
    phi : float or sequence of float, optional
        Angles [deg] to keep, each matched to the nearest angle of the q-bin, in the
        order given. Default: all angles, in increasing order.
    frames : slice, optional
        Contiguous window ``slice(a, b)`` of frame indices (0-based, as stored); the
        frames keep their absolute times.

    Returns
    -------
    xarray.Dataset
        Canonical Dataset (dims ``(phi, t1, t2)``); ``attrs["source"]`` names the
        layout, the file, the q-bin (its index in ``q_values(path)``) and the window.

    Raises
    ------
    FileFormatError
        The file is missing, not HDF5, of an unknown layout or inconsistent; or there are
        several q-bins and no ``q``.
    OptionError
        ``q``, ``phi`` or ``frames`` is invalid.
    DataError
        The matrices to read would not fit in memory (checked before reading, see
        :func:`heterodyne.data.check_memory`); the message gives the memory needed and
        available, and the remedy: a window ``frames``, or frames binned upstream.

    Warns
    -----
    UserWarning
        When the nearest q-bin differs from ``q`` by more than 1 %. The chosen q-bin is
        always logged at INFO level.

    Notes
    -----
    Times (MODEL.md, "Inputs"): the stored frame with 0-based index ``k`` ends at
    ``t_k = (k + 1) * dt``, so a file read whole starts at ``t_start = dt`` and the
    window ``slice(a, b)`` at ``(a + 1) * dt``. For APS-U, an ``xpcs/twotime/t`` vector,
    when present, must have one entry per stored frame, each a whole number ``m`` of
    ``frame_time`` (relative tolerance 1e-3), increasing; it is read as frame start
    times, so ``t[0] = m * dt`` shifts every time by ``m`` frames, and a step of ``k > 1``
    frames means ``k - 1`` frames were dropped: they become NaN rows and columns of the
    uniform grid (masked in fits, counted in ``attrs["dropped_frames"]``). ``frames``
    indexes the stored frames. netCDF files keep their stored times.

    Examples
    --------
    >>> ds = load("sample_0001.h5", q=0.0054, phi=[0, 90], frames=slice(100, 600))
    """
    checks.check_load(path, q=q, phi=phi, frames=frames)
    path = _check_path(path)
    with _open(path) as f:
        layout = _detect(f, path)
        if layout != "netcdf":
            bins = _READERS[layout](f, path)
            q_all, labels = _group_q(bins, path)
            iq = _pick_q(q_all, q, path)
            return _read_bins(
                f, path, bins, np.flatnonzero(labels == iq), iq, q_all[iq], phi, frames
            )
    ds = _read_netcdf(path, frames)
    _pick_q(np.atleast_1d(ds["q"].values), q, path)
    return ds if phi is None else select(ds, phi=phi)


def q_values(path: str | os.PathLike) -> np.ndarray:
    """List the q-bins [1/Å] of a file that hold correlation matrices, increasing.

    ``load(path, q=q_values(path)[k])`` reads q-bin ``k``; the ``source`` attribute of
    the result names that ``k``. Only metadata is read.
    """
    path = _check_path(checks.readable_file(path))
    with _open(path) as f:
        layout = _detect(f, path)
        if layout == "netcdf":
            return _vector(f, "q", path)
        return _group_q(_READERS[layout](f, path), path)[0]


def _check_path(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory; expected an HDF5 or netCDF-4 file")
    if not h5py.is_hdf5(path):
        raise FileFormatError(
            f"{path} is not an HDF5 file; expected an APS-U or APS legacy HDF5 file or a "
            "netCDF-4 file written by heterodyne"
        )
    return path


@contextmanager
def _open(path: Path) -> Iterator[h5py.File]:
    # h5py reports truncation and corruption as OSError/KeyError/RuntimeError, wherever
    # in the file it is met; the user gets the file name instead of an HDF5 traceback.
    try:
        with h5py.File(path, "r") as f:
            yield f
    except (OSError, KeyError, RuntimeError) as err:
        raise FileFormatError(
            f"{path}: cannot be read as HDF5 (truncated or corrupt?): {err}"
        ) from err


def _detect(f: h5py.File, path: Path) -> str:
    for layout, marker in _LAYOUTS.items():
        if marker in f:
            return layout
    looked = ", ".join(f"{marker} ({layout})" for layout, marker in _LAYOUTS.items())
    raise FileFormatError(
        f"{path}: unknown layout, no two-time correlation found; looked "
        f"for {looked}. The file's top level holds {sorted(f.keys())}"
    )


def _dataset(f: h5py.File, inner: str, path: Path) -> h5py.Dataset:
    obj = f.get(inner)
    if obj is None:
        raise FileFormatError(f"{path}: {inner} is missing; expected a dataset there")
    if not isinstance(obj, h5py.Dataset):
        raise FileFormatError(f"{path}: {inner} is a group; expected a dataset")
    return obj


def _read(dset: h5py.Dataset, path: Path, where=()) -> np.ndarray:
    try:
        return dset[where]
    except (OSError, ValueError, TypeError) as err:
        raise FileFormatError(f"{path}: cannot read {dset.name} (truncated file?): {err}") from err


def _vector(f: h5py.File, inner: str, path: Path, *, integer: bool = False) -> np.ndarray:
    """A non-empty, finite 1-D numeric dataset (singleton dimensions dropped)."""
    dset = _dataset(f, inner, path)
    if dset.dtype.kind not in "iuf":
        raise FileFormatError(f"{path}: {inner} has dtype {dset.dtype}; expected numbers")
    if dset.shape is None:
        raise FileFormatError(f"{path}: {inner} has an empty dataspace; expected numbers")
    values = np.asarray(_read(dset, path))
    if sum(size > 1 for size in values.shape) > 1:
        raise FileFormatError(f"{path}: {inner} has shape {values.shape}; expected a vector")
    values = values.ravel().astype(np.float64)
    if values.size == 0:
        raise FileFormatError(f"{path}: {inner} is empty; expected at least one number")
    if not np.all(np.isfinite(values)):
        raise FileFormatError(
            f"{path}: {inner} holds non-finite values: {values}; expected finite numbers"
        )
    if integer:
        if np.any(values != np.round(values)):
            raise FileFormatError(f"{path}: {inner} holds non-integer values; expected bin numbers")
        return values.astype(np.int64)
    return values


def _frame_time(f: h5py.File, path: Path, candidates: tuple[str, ...]) -> float:
    inner = next((c for c in candidates if c in f), None)
    if inner is None:
        raise FileFormatError(f"{path}: no frame spacing found; looked for {', '.join(candidates)}")
    values = _vector(f, inner, path)
    if values.size != 1 or values[0] <= 0:
        raise FileFormatError(f"{path}: {inner} = {values} s; expected one positive frame time")
    return float(values[0])


def _matrices(f: h5py.File, group: str, path: Path) -> tuple[np.ndarray, list[str], int]:
    """Numbers and paths of the ``c2_NNNNN`` matrices of ``group``, by number; and N."""
    obj = f.get(group)
    if obj is None:
        raise FileFormatError(
            f"{path}: {group} is a broken link; expected a group of c2_NNNNN matrices"
        )
    if not isinstance(obj, h5py.Group):
        raise FileFormatError(
            f"{path}: {group} is a dataset; expected a group of c2_NNNNN matrices"
        )
    found = sorted((int(m.group(1)), key) for key in obj if (m := _MATRIX_NAME.fullmatch(key)))
    if not found:
        raise FileFormatError(
            f"{path}: {group} holds no c2_NNNNN correlation matrices "
            f"(it holds {sorted(obj.keys())})"
        )
    shapes = {}
    for _, key in found:
        dset = _dataset(f, f"{group}/{key}", path)
        if dset.dtype.kind != "f":
            raise FileFormatError(
                f"{path}: {group}/{key} has dtype {dset.dtype}; expected "
                "floating-point correlation values"
            )
        if dset.ndim != 2 or dset.shape[0] != dset.shape[1]:
            raise FileFormatError(
                f"{path}: {group}/{key} has shape {dset.shape}; expected a square (N, N) matrix"
            )
        shapes.setdefault(dset.shape, key)
    if len(shapes) > 1:
        listed = ", ".join(f"{key} {shape}" for shape, key in shapes.items())
        raise FileFormatError(
            f"{path}: the matrices in {group} differ in size ({listed}); "
            "expected one frame count for all"
        )
    numbers = np.array([number for number, _ in found])
    return numbers, [f"{group}/{key}" for _, key in found], next(iter(shapes))[0]


def _read_aps_u(f: h5py.File, path: Path) -> _Bins:
    q_list, phi_list = (_vector(f, inner, path) for inner in _LISTS["aps_u"])
    bins = _vector(f, "xpcs/twotime/processed_bins", path, integer=True)
    numbers, names, n_frames = _matrices(f, _LAYOUTS["aps_u"], path)
    if not np.array_equal(numbers, np.arange(1, bins.size + 1)):
        raise FileFormatError(
            f"{path}: {_LAYOUTS['aps_u']} holds {numbers.size} matrices numbered "
            f"{numbers.min()}..{numbers.max()}; expected c2_00001..c2_{bins.size:05d}, one "
            "per entry of xpcs/twotime/processed_bins"
        )
    n_bins = q_list.size * phi_list.size
    past = (bins < 1) | (bins > n_bins)
    if np.any(past):
        raise FileFormatError(
            f"{path}: xpcs/twotime/processed_bins holds {bins[past].tolist()}, past the "
            f"{q_list.size} q x {phi_list.size} phi = {n_bins} bins of xpcs/qmap "
            "(bins are numbered from 1)"
        )
    dt = _frame_time(f, path, _APS_U_FRAME_TIME)
    q, phi = q_list[(bins - 1) // phi_list.size], phi_list[(bins - 1) % phi_list.size]
    return _Bins("aps_u", q, phi, names, n_frames, dt, _frame_index(f, path, n_frames, dt))


def _frame_index(f: h5py.File, path: Path, n_frames: int, dt: float) -> np.ndarray:
    """Index in the acquisition of each stored frame, from the start times
    ``xpcs/twotime/t`` (``t = index * dt``); ``0, 1, ...`` without them."""
    inner = "xpcs/twotime/t"
    if inner not in f:
        return np.arange(n_frames)
    t = _vector(f, inner, path)
    if t.size != n_frames:
        raise FileFormatError(
            f"{path}: {inner} has {t.size} times; the correlation matrices have {n_frames} frames"
        )
    # Time stamps stored in float32 lose absolute precision as t grows.
    tol = _T_RTOL * dt + 4 * np.finfo(_dataset(f, inner, path).dtype).eps * np.abs(t).max()
    index = np.round(t / dt)
    steps = np.diff(index)
    if np.any(np.abs(t - index * dt) > tol) or np.any(steps < 1):
        raise FileFormatError(
            f"{path}: {inner} holds times ({t.min():g} to {t.max():g} s) that are not "
            f"increasing multiples of the frame time; expected a whole number of frames of "
            f"{dt:g} s ({_APS_U_FRAME_TIME[0]}) for each"
        )
    if steps.size and np.median(steps) != 1:
        raise FileFormatError(
            f"{path}: {inner} steps by {np.median(steps):g} frames ({np.median(steps) * dt:g} "
            f"s) between most frames; expected the frame time {dt:g} s of "
            f"{_APS_U_FRAME_TIME[0]}, with gaps only where frames were dropped (frames "
            "averaged or strided by the pipeline?)"
        )
    if index[0] < 0:
        raise FileFormatError(
            f"{path}: {inner} starts at {t[0]:g} s; expected a whole number of frames of "
            f"{dt:g} s, >= 0"
        )
    return index.astype(np.int64)


def _read_legacy(f: h5py.File, path: Path) -> _Bins:
    q_list, phi_list = (_vector(f, inner, path) for inner in _LISTS["aps_legacy"])
    if q_list.size != phi_list.size:
        raise FileFormatError(
            f"{path}: xpcs/dqlist has {q_list.size} entries and "
            f"xpcs/dphilist {phi_list.size}; expected one (q, phi) per bin"
        )
    numbers, names, n_frames = _matrices(f, _LAYOUTS["aps_legacy"], path)
    if numbers.min() < 1 or numbers.max() > q_list.size:
        raise FileFormatError(
            f"{path}: {_LAYOUTS['aps_legacy']} holds matrices for bins "
            f"{numbers.min()}..{numbers.max()}, past the {q_list.size} bins of xpcs/dqlist "
            "(bins are numbered from 1)"
        )
    dt = _frame_time(f, path, _LEGACY_FRAME_TIME)
    return _Bins(
        "aps_legacy",
        q_list[numbers - 1],
        phi_list[numbers - 1],
        names,
        n_frames,
        dt,
        np.arange(n_frames),
    )


_READERS = {"aps_u": _read_aps_u, "aps_legacy": _read_legacy}


def _group_q(bins: _Bins, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Distinct q-bins, increasing, and the q-bin index of each bin."""
    q = bins.q
    if np.any(q <= 0):
        raise FileFormatError(
            f"{path}: {_LISTS[bins.layout][0]} gives the bins q = {q}; expected q > 0 [1/Å]"
        )
    order = np.argsort(q, kind="stable")
    new = np.r_[True, np.diff(q[order]) > _Q_SAME * q[order][1:]]
    labels = np.empty(q.size, dtype=np.int64)
    labels[order] = np.cumsum(new) - 1
    return q[order][new], labels


def _pick_q(q_all: np.ndarray, q, path: Path) -> int:
    if q is None:
        if q_all.size > 1:
            listed = ", ".join(f"{value:.6g}" for value in q_all)
            raise FileFormatError(
                f"{path} holds {q_all.size} q-bins, q = [{listed}] 1/Å; "
                "choose one with load(path, q=...); q_values(path) lists them"
            )
        return 0
    try:
        wanted = float(q)
    except (TypeError, ValueError) as err:
        raise OptionError(f"q must be one number [1/Å]; got {q!r}") from err
    if not np.isfinite(wanted) or wanted <= 0:
        raise OptionError(f"q must be positive and finite [1/Å]; got {q!r}")
    iq = int(np.argmin(np.abs(q_all - wanted)))
    logger.info("%s: q=%g 1/Å reads q-bin %d, q = %g 1/Å", path, wanted, iq, q_all[iq])
    if abs(q_all[iq] - wanted) > _Q_WARN * wanted:
        warnings.warn(
            f"{path}: no q-bin within 1 % of q = {wanted:g} 1/Å; reading the "
            f"nearest, q-bin {iq} at q = {q_all[iq]:g} 1/Å",
            UserWarning,
            stacklevel=3,
        )
    return iq


def _window(frames, n_frames: int) -> tuple[int, int]:
    if frames is None:
        return 0, n_frames
    if not isinstance(frames, slice) or frames.step not in (None, 1):
        raise OptionError(f"frames must be a contiguous slice(a, b); got {frames!r}")
    a, b, _ = frames.indices(n_frames)
    if b - a < 3:
        raise OptionError(
            f"frames={frames} leaves {max(b - a, 0)} of the {n_frames} frames; need >= 3"
        )
    return a, b


def _read_bins(
    f: h5py.File, path: Path, bins: _Bins, members: np.ndarray, iq: int, q: float, phi, frames
) -> xr.Dataset:
    members = members[np.argsort(bins.phi[members], kind="stable")]
    angles = bins.phi[members]
    if np.unique(angles).size != angles.size:
        raise FileFormatError(
            f"{path}: {_LISTS[bins.layout][1]} gives two bins at q = {q:g} 1/Å the same phi "
            f"({angles.tolist()} deg); expected one bin per angle"
        )
    if phi is not None:
        wanted = np.atleast_1d(np.asarray(phi, dtype=np.float64))
        pick = np.argmin(np.abs(angles[None, :] - wanted[:, None]), axis=1)
        if np.unique(pick).size != pick.size:
            raise OptionError(
                f"phi={wanted.tolist()} selects the same angle twice; the "
                f"angles at q = {q:g} 1/Å are {angles.tolist()}"
            )
        members = members[pick]
    a, b = _window(frames, bins.n_frames)
    # the stored frames a..b-1 on the uniform grid of their acquisition; a frame that the
    # detector dropped is a NaN row and column (masked, counted in attrs["dropped_frames"])
    first = int(bins.index[a]) if b > a else 0
    place = bins.index[a:b] - first
    size = int(place.max(initial=-1)) + 1
    shape = (members.size, size, size)
    check_memory(shape, what=f"reading {path} (q-bin {iq})", **LOAD_MEMORY)
    c2 = np.full(shape, np.nan)
    for row, k in enumerate(members):
        c2[row][np.ix_(place, place)] = _read(f[bins.names[k]], path, np.s_[a:b, a:b])
    t = bins.dt * (first + 1 + np.arange(size))
    source = f"{bins.layout}:{path} q-bin {iq}"
    if frames is not None:
        source += f" frames {a}:{b}"
    try:
        ds = from_arrays(c2, t, bins.phi[members], q, source=source)
    except DataError as err:
        names = ", ".join(bins.names[k] for k in members)
        raise FileFormatError(f"{path} ({bins.layout}, q-bin {iq}, {names}): {err}") from err
    ds.attrs["dt"] = bins.dt
    return ds


def _read_netcdf(path: Path, frames) -> xr.Dataset:
    """Read a netCDF file, only the window ``frames`` of it when given."""
    try:
        handle = xr.open_dataset(path, engine="h5netcdf", phony_dims="access")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _not_netcdf(path, err) from err
    with handle:
        lazy = handle
        if frames is not None and {"t1", "t2"} <= set(handle.dims):
            a, b = _window(frames, handle.sizes["t1"])
            lazy = handle.isel(t1=slice(a, b), t2=slice(a, b))
        c2 = lazy.variables.get("c2")
        if c2 is not None and c2.dims == ("phi", "t1", "t2"):
            check_memory(c2.shape, what=f"reading {path}", **LOAD_MEMORY)
        try:
            ds = lazy.load()
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _not_netcdf(path, err) from err
    try:
        validate(ds)
    except DataError as err:
        raise FileFormatError(f"{path} (netcdf): {err}") from err
    # Counted again: a file written by another tool may lack or misstate the counts.
    return tally_missing(ds)


def _not_netcdf(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(
        f"{path}: has a root variable c2 but xarray (h5netcdf) cannot read it as netCDF: {err}"
    )
