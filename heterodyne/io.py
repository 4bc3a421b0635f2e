"""Read two-time correlation files into the canonical Dataset of :mod:`heterodyne.data`.

The beamline layouts follow their writers (``FILES.md`` of the project names the writers'
repositories and files); a layout is recognised by the group that holds the matrices:

``aps_u`` (APS-U 8-ID-I, ``boost_corr``), found by ``xpcs/twotime/correlation_map``
    ``c2_00001``, ``c2_00002``, ... hold one upper triangle (with the raw diagonal) per
    entry of ``xpcs/twotime/processed_bins``, in that order. A bin ``b`` (the q-map's roi
    value, 1-based) is the cell ``dynamic_index_mapping[b - 1] = i0 * n1 + i1`` of the
    ``xpcs/qmap`` grid ``dynamic_v_list_dim0`` (q [1/Å]) x ``dynamic_v_list_dim1`` (phi
    [deg]): pySimpleMask numbers only the non-empty cells. Without the mapping, ``b - 1 =
    i0 * n1 + i1`` holds only when every cell is a bin, which a bin ``n0 * n1`` proves;
    otherwise the file is refused. ``xpcs/qmap/map_names`` other than ``(q, phi)`` (GIXPCS
    ``(x, y)`` maps) are refused. Times: ``entry/instrument/detector_1/frame_time`` and
    ``xpcs/twotime/config/{begin,avg,stride}_frame`` (see :func:`load`).
``aps_legacy`` (xpcs-eigen; boost_corr 2023), found by ``exchange/C2T_all``
    Half matrices ``g2_NNNNN`` (or ``c2_NNNNN``); ``xpcs/dqlist`` and ``xpcs/dphilist`` give
    the q and phi of bin ``b`` at column ``b - 1``. xpcs-eigen names a matrix by its bin;
    boost_corr 2023 numbers them 1, 2, ... and lists their bins in
    ``xpcs/qphi_bin_to_process``. Frame period:
    ``measurement/instrument/detector/exposure_period``, else
    ``entry/instrument/detector_1/frame_time``.
``netcdf`` (written by :func:`heterodyne.data.to_netcdf`), found by a root variable ``c2``
    Read with xarray (``engine="h5netcdf"``) and returned unchanged but for
    ``attrs["nan_pairs"]`` and ``attrs["dropped_frames"]``, counted again.

Beamline matrices may hold one triangle only (the other zero); they are symmetrised. A
value of exactly 0 off the diagonal is no correlation (a chunk never written, a virtual
dataset whose source is missing): it is masked as missing, with a warning; a matrix with
no other value is refused. Every problem with a file raises
:class:`~heterodyne.errors.FileFormatError` naming the file, the path inside it and what
was expected.
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

from heterodyne import checks, qbins
from heterodyne.data import (
    TIME_CONVENTION,
    fill_triangle,
    from_arrays,
    select,
    tally_missing,
    validate,
)
from heterodyne.errors import DataError, FileFormatError, OptionError
from heterodyne.memory import check_memory

logger = logging.getLogger(__name__)

_Q_WARN = 0.01  # warn when the nearest q-bin is further than 1 % from the q asked for
_Q_SAME = 1e-6  # bins whose q agree to this relative tolerance form one q-bin (float32)
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
# The names each writer gives its matrices: boost_corr writes c2_, xpcs-eigen and
# boost_corr 2023 g2_ (older heterodyne examples c2_).
_PREFIXES = {"aps_u": ("c2",), "aps_legacy": ("g2", "c2")}
_APS_U_BINS = "xpcs/twotime/processed_bins"
_MAPPING = "xpcs/qmap/dynamic_index_mapping"
_NUM_PTS = "xpcs/qmap/dynamic_num_pts"
_MAP_NAMES = "xpcs/qmap/map_names"
_CONFIG = "xpcs/twotime/config"
_LEGACY_BINS = "xpcs/qphi_bin_to_process"
_INTENSITY = "xpcs/spatial_mean/intensity_vs_time"
_APS_U_FRAME_TIME = ("entry/instrument/detector_1/frame_time",)
_LEGACY_FRAME_TIME = (
    "measurement/instrument/detector/exposure_period",
    "entry/instrument/detector_1/frame_time",
)


class _Clock(NamedTuple):
    """Stored frame ``k`` ends at ``scale * (offset + step * k)`` seconds; ``offset`` is
    None where the file does not place its first frame."""

    scale: float
    offset: float | None
    step: float
    origin: str  # how the file's times were derived, for attrs["time_origin"]

    @property
    def dt(self) -> float:
        return self.scale * self.step


class _Bins(NamedTuple):
    """What a beamline file holds, before any matrix is read."""

    layout: str
    q: np.ndarray  # q of each bin [1/Å]
    phi: np.ndarray  # phi of each bin [deg]
    names: list[str]  # path of each bin's matrix inside the file
    numbers: np.ndarray  # the bin number (roi value) of each matrix, for messages
    n_frames: int
    clock: _Clock


def load(
    path: str | os.PathLike,
    *,
    q: float | Sequence[float] | str | None = None,
    phi: float | Sequence[float] | None = None,
    frames: slice | None = None,
    t_start: float | None = None,
    exclude_frames=None,
) -> xr.Dataset:
    """Read one q-bin, or several, of a two-time correlation file as a canonical Dataset.

    Parameters
    ----------
    path : str or path-like
        An APS-U or APS legacy HDF5 file, or a netCDF file written by heterodyne.
    q : float, sequence of float or "all", optional
        Wavevector [1/Å]; the nearest q-bin is read. A sequence reads the nearest bin to
        each, ``"all"`` every bin, as one multi-q Dataset (dims ``(q, phi, t1, t2)``,
        :mod:`heterodyne.qbins`), which ``hd.fit_nlsq`` fits jointly. Required when the
        file holds more than one q-bin (:func:`q_values` lists them).
    phi : float or sequence of float, optional
        Angles [deg] to keep, each matched to the nearest angle of the q-bin (of each
        q-bin), in the order given. Default: all angles, in increasing order.
    frames : slice, optional
        Contiguous window ``slice(a, b)`` of frame indices (0-based, as stored); the
        frames keep their absolute times.
    t_start : float, optional
        Time [s] of the file's stored frame 0 (e.g. since a shear started); frame ``k``
        is then at ``t_start + k dt``. Default: the file's own times (Notes).
    exclude_frames : sequence of int or boolean array, optional
        Stored frames (indices as for ``frames``, or a mask with one entry per stored
        frame) to leave out, e.g. hit by a beam dump: their rows and columns become NaN,
        masked in fits and counted in ``attrs["dropped_frames"]``;
        ``attrs["excluded_frames"]`` lists them. :func:`intensity` shows where they are.

    Returns
    -------
    xarray.Dataset
        Canonical Dataset (dims ``(phi, t1, t2)``); ``attrs["source"]`` names the
        layout, the file, the q-bin (its index in ``q_values(path)``) and the window;
        ``attrs["time_origin"]`` says where the times came from.

    Raises
    ------
    FileFormatError
        The file is missing, not HDF5, of an unknown layout or inconsistent; a matrix
        holds no data; there are several q-bins and no ``q``; or the file cannot place
        its first frame in time (a negative ``begin_frame``) and no ``t_start`` is given.
    OptionError
        ``q``, ``phi``, ``frames``, ``t_start`` or ``exclude_frames`` is invalid.
    DataError
        The matrices to read would not fit in memory (checked before reading, see
        :func:`heterodyne.memory.check_memory`); the message gives the memory needed and
        available, and the remedy: a window ``frames``, or frames binned upstream.

    Warns
    -----
    UserWarning
        When the nearest q-bin differs from ``q`` by more than 1 %, or a matrix holds
        zeros where pairs should be (masked). The chosen q-bin is logged at INFO level.

    Notes
    -----
    Times (MODEL.md, "Inputs"; FILES.md): a frame sits at the end of its exposure. APS-U:
    stored frame ``k`` is the mean of raw frames ``begin + stride (avg k + j)``,
    ``j < avg``, so ``dt = frame_time * stride * avg`` and
    ``t_k = frame_time (begin + 1 + stride (avg k + (avg - 1) / 2))``, from
    ``xpcs/twotime/config/begin_frame``, ``avg_frame``, ``stride_frame`` (0, 1, 1 when
    absent). A negative ``begin_frame`` counts from the end of a raw series whose length
    the file does not hold: loading then needs ``t_start`` and refuses without it, since
    a time origin off by one frame moves time-dependent rates by many standard errors.
    Legacy files record no first frame: ``t_k = (k + 1) dt``. netCDF files keep their
    stored times. ``t_start`` overrides all of these. The diagonal is read as stored (it
    carries the raw shot noise): fits never use it (MODEL.md, "Fitting conventions").

    Examples
    --------
    >>> ds = load("sample_0001.h5", q=0.0054, phi=[0, 90], frames=slice(100, 600))
    """
    checks.check_load(path, q=q, phi=phi, frames=frames)
    path = _check_path(path)
    start = _check_t_start(t_start)
    with _open(path) as f:
        layout = _detect(f, path)
        if layout != "netcdf":
            bins = _READERS[layout](f, path)
            q_all, labels = _group_q(bins, path)
            excluded = _excluded(exclude_frames, bins.n_frames)
            chosen = _pick_bins(q_all, q, path)
            parts = [
                _read_bins(
                    f,
                    path,
                    bins,
                    np.flatnonzero(labels == iq),
                    (iq, q_all[iq]),
                    phi,
                    frames,
                    start,
                    excluded,
                )
                for iq in chosen
            ]
            if isinstance(q, str) or np.ndim(q) > 0:
                return qbins.combine(parts, source=f"{layout}:{path} q-bins {chosen.tolist()}")
            return parts[0]
    ds = _read_netcdf(path, frames, start, exclude_frames)
    if qbins.is_multi_q(ds):
        if q is None or isinstance(q, str):
            return ds if phi is None else select(ds, phi=phi)
        return select(ds, q=q, phi=phi)
    if isinstance(q, str) or np.ndim(q) > 0:
        wanted = ds["q"].values if isinstance(q, str) else q
        for value in np.atleast_1d(wanted):
            _pick_q(np.atleast_1d(ds["q"].values), value, path)
        return qbins.combine([ds if phi is None else select(ds, phi=phi)])
    _pick_q(np.atleast_1d(ds["q"].values), q, path)
    return ds if phi is None else select(ds, phi=phi)


def _pick_bins(q_all: np.ndarray, q, path: Path) -> np.ndarray:
    """The q-bin indices that ``q`` (one number, a sequence or ``"all"``) reads."""
    if isinstance(q, str):
        return np.arange(q_all.size)
    chosen = np.array(
        [_pick_q(q_all, value, path) for value in np.atleast_1d(q)]
        if np.ndim(q)
        else [_pick_q(q_all, q, path)]
    )
    if np.unique(chosen).size != chosen.size:
        raise OptionError(
            f"q={np.atleast_1d(q).tolist()} reads the same q-bin twice; the file's q-bins "
            f"are {q_all.tolist()} 1/Å"
        )
    return np.sort(chosen)


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


def intensity(path: str | os.PathLike) -> xr.DataArray:
    """The mean intensity of each frame, ``xpcs/spatial_mean/intensity_vs_time`` of an
    APS-U file: beam dumps and spikes show here.

    Returns
    -------
    xarray.DataArray
        Dim ``frame``: the frame indices as the writer stored them (the frames it
        correlated, 0-based: the indices ``load(..., exclude_frames=...)`` takes).

    Raises
    ------
    FileFormatError
        The file has no such dataset, or it is not ``stack([frame_index, intensity])``.
    """
    path = _check_path(path)
    with _open(path) as f:
        dset = _dataset(f, _INTENSITY, path)
        if dset.dtype.kind not in "iuf" or dset.ndim != 2 or dset.shape[0] != 2:
            raise FileFormatError(
                f"{path}: {_INTENSITY} has shape {dset.shape} and dtype {dset.dtype}; "
                "expected numbers stacked as (2, n_frames): frame index, mean intensity"
            )
        index, values = np.asarray(_read(dset, path), dtype=np.float64)
    if not np.all(np.isfinite(index)) or np.any(index != np.round(index)):
        raise FileFormatError(f"{path}: {_INTENSITY}[0] holds non-integer frame indices")
    return xr.DataArray(
        values,
        dims="frame",
        coords={"frame": ("frame", index.astype(np.int64), {"long_name": "stored frame"})},
        name="intensity",
        attrs={"long_name": "mean intensity per pixel", "source": f"{path}:{_INTENSITY}"},
    )


def frame_list(text: str) -> np.ndarray:
    """Frame indices from text such as ``"40:43, 90"`` (ranges ``a:b`` exclude ``b``),
    sorted and unique; an empty text gives none. For ``exclude_frames``."""
    found: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            ends = [int(v) for v in part.split(":")]
        except ValueError:
            raise OptionError(
                f"frames {part!r}: expected an index or a range a:b, e.g. '40:43, 90'"
            ) from None
        if len(ends) > 2 or min(ends) < 0:
            raise OptionError(f"frames {part!r}: expected an index >= 0 or a range a:b")
        found.extend(range(ends[0], ends[-1]) if len(ends) == 2 else ends)
    return np.unique(np.array(found, dtype=np.int64))


def _check_t_start(t_start) -> float | None:
    if t_start is None:
        return None
    try:
        value = float(t_start)
    except (TypeError, ValueError) as err:
        raise OptionError(f"t_start must be one number [s]; got {t_start!r}") from err
    if not np.isfinite(value):
        raise OptionError(f"t_start must be finite [s]; got {t_start!r}")
    return value


def _excluded(exclude_frames, n_frames: int) -> np.ndarray:
    """``exclude_frames`` as a mask over the ``n_frames`` stored frames."""
    mask = np.zeros(n_frames, dtype=bool)
    if exclude_frames is None:
        return mask
    given = np.asarray(exclude_frames)
    if given.dtype == bool:
        if given.shape != (n_frames,):
            raise OptionError(
                f"exclude_frames is a mask of shape {given.shape}; expected ({n_frames},), "
                "one entry per stored frame"
            )
        return given.copy()
    if given.size and (given.ndim > 1 or given.dtype.kind not in "iu"):
        raise OptionError(
            f"exclude_frames must be frame indices or a boolean mask; got {exclude_frames!r}"
        )
    index = given.astype(np.int64).ravel()
    outside = index[(index < 0) | (index >= n_frames)]
    if outside.size:
        raise OptionError(
            f"exclude_frames holds {outside.tolist()}, outside the stored frames 0..{n_frames - 1}"
        )
    mask[index] = True
    return mask


def _ranges(mask: np.ndarray) -> str:
    """The True entries of ``mask`` as ranges ``a:b`` (``b`` excluded) and single indices."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return ", ".join(f"{a}" if b == a + 1 else f"{a}:{b}" for a, b in edges.reshape(-1, 2))


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


def _scalar(f: h5py.File, inner: str, path: Path, *, integer: bool = False) -> float:
    values = _vector(f, inner, path, integer=integer)
    if values.size != 1:
        raise FileFormatError(f"{path}: {inner} holds {values.size} values; expected one")
    return values[0]


def _frame_time(f: h5py.File, path: Path, candidates: tuple[str, ...]) -> float:
    inner = next((c for c in candidates if c in f), None)
    if inner is None:
        raise FileFormatError(f"{path}: no frame spacing found; looked for {', '.join(candidates)}")
    values = _vector(f, inner, path)
    if values.size != 1 or values[0] <= 0:
        raise FileFormatError(f"{path}: {inner} = {values} s; expected one positive frame time")
    return float(values[0])


def _matrices(f: h5py.File, layout: str, path: Path) -> tuple[np.ndarray, list[str], int]:
    """Numbers and paths of the matrices of a layout's group, by number; and N."""
    group = _LAYOUTS[layout]
    wanted = " or ".join(f"{prefix}_NNNNN" for prefix in _PREFIXES[layout])
    obj = f.get(group)
    if obj is None:
        raise FileFormatError(f"{path}: {group} is a broken link; expected a group of {wanted}")
    if not isinstance(obj, h5py.Group):
        raise FileFormatError(f"{path}: {group} is a dataset; expected a group of {wanted}")
    pattern = re.compile(rf"({'|'.join(_PREFIXES[layout])})_(\d+)")
    found = sorted((int(m[2]), m[1], key) for key in obj if (m := pattern.fullmatch(key)))
    if not found:
        raise FileFormatError(
            f"{path}: {group} holds no {wanted} correlation matrices "
            f"(it holds {sorted(obj.keys())})"
        )
    if len({prefix for _, prefix, _ in found}) > 1:
        raise FileFormatError(
            f"{path}: {group} holds both {' and '.join(_PREFIXES[layout])}_NNNNN matrices; "
            "expected one writer's names"
        )
    shapes = {}
    for _, _, key in found:
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
    numbers = np.array([number for number, _, _ in found])
    return numbers, [f"{group}/{key}" for _, _, key in found], next(iter(shapes))[0]


def _check_map_names(f: h5py.File, path: Path) -> None:
    """Refuse a q-map whose axes are not (q, phi), e.g. a GIXPCS (x, y) map."""
    if _MAP_NAMES not in f:
        return  # q-maps written before map_names existed are (q, phi)
    dset = _dataset(f, _MAP_NAMES, path)
    raw = np.atleast_1d(_read(dset, path)).ravel()
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
    if [name.strip().lower() for name in names] != ["q", "phi"]:
        raise FileFormatError(
            f"{path}: {_MAP_NAMES} = {names}: the bins partition the detector by "
            f"{' and '.join(map(repr, names))}, not by (q, phi) (a GIXPCS map?); the model "
            "needs q and the azimuth phi. Correlate on a (q, phi) q-map (pySimpleMask)"
        )


def _cells(f: h5py.File, path: Path, bins: np.ndarray, n0: int, n1: int) -> np.ndarray:
    """The flat (dim0-major) cell ``i0 * n1 + i1`` of each roi value ``bins`` (1-based)."""
    if _NUM_PTS in f:
        pts = _vector(f, _NUM_PTS, path, integer=True)
        if pts.tolist() != [n0, n1]:
            raise FileFormatError(
                f"{path}: {_NUM_PTS} = {pts.tolist()}, but {_LISTS['aps_u'][0]} and "
                f"{_LISTS['aps_u'][1]} hold {n0} and {n1} values; expected the same grid"
            )
    n_cells = n0 * n1
    if _MAPPING in f:
        mapping = _vector(f, _MAPPING, path, integer=True)
        past = (bins < 1) | (bins > mapping.size)
        if np.any(past):
            raise FileFormatError(
                f"{path}: {_APS_U_BINS} holds {bins[past].tolist()}, past the "
                f"{mapping.size} roi values of {_MAPPING} (bins are numbered from 1)"
            )
        cells = mapping[bins - 1]
        off = (cells < 0) | (cells >= n_cells)
        if np.any(off):
            raise FileFormatError(
                f"{path}: {_MAPPING} places bins {bins[off].tolist()} at cells "
                f"{cells[off].tolist()}, outside the {n0} x {n1} = {n_cells} cells of the "
                "q-map (expected 0 .. n0 * n1 - 1)"
            )
        return cells
    past = (bins < 1) | (bins > n_cells)
    if np.any(past):
        raise FileFormatError(
            f"{path}: {_APS_U_BINS} holds {bins[past].tolist()}, past the "
            f"{n0} q x {n1} phi = {n_cells} bins of xpcs/qmap (bins are numbered from 1)"
        )
    # pySimpleMask numbers the non-empty cells 1..K: bin - 1 is the cell only when no cell
    # is empty, i.e. K = n0 * n1, which a processed bin n0 * n1 proves.
    if bins.max() != n_cells:
        raise FileFormatError(
            f"{path}: {_MAPPING} is missing, and the q-map's {n0} x {n1} = {n_cells} cells "
            f"may hold fewer bins (the processed bins reach {bins.max()}): where cells are "
            "empty (beam stop, gaps, masks) a bin number is not its cell, so the (q, phi) of "
            "the bins is unknown. Expected that dataset (written with the q-map by "
            "pySimpleMask); correlate again with a q-map that has it"
        )
    return bins - 1


def _aps_u_clock(f: h5py.File, path: Path) -> _Clock:
    frame_time = _frame_time(f, path, _APS_U_FRAME_TIME)
    config = {}
    for name, default in (("begin_frame", 0), ("avg_frame", 1), ("stride_frame", 1)):
        inner = f"{_CONFIG}/{name}"
        config[name] = int(_scalar(f, inner, path, integer=True)) if inner in f else default
        if name != "begin_frame" and config[name] < 1:
            raise FileFormatError(f"{path}: {inner} = {config[name]}; expected an integer >= 1")
    begin, avg, stride = config["begin_frame"], config["avg_frame"], config["stride_frame"]
    described = (
        f"frame_time {frame_time:g} s, begin_frame {begin}, avg_frame {avg}, stride_frame {stride}"
    )
    if begin < 0:
        return _Clock(frame_time, None, stride * avg, f"unknown: {described}")
    return _Clock(
        frame_time,
        begin + 1 + stride * (avg - 1) / 2,
        stride * avg,
        f"file: {described}; t_k = frame_time (begin + 1 + stride (avg k + (avg - 1) / 2))",
    )


def _read_aps_u(f: h5py.File, path: Path) -> _Bins:
    _check_map_names(f, path)
    q_list, phi_list = (_vector(f, inner, path) for inner in _LISTS["aps_u"])
    bins = _vector(f, _APS_U_BINS, path, integer=True)
    numbers, names, n_frames = _matrices(f, "aps_u", path)
    if not np.array_equal(numbers, np.arange(1, bins.size + 1)):
        raise FileFormatError(
            f"{path}: {_LAYOUTS['aps_u']} holds {numbers.size} matrices numbered "
            f"{numbers.min()}..{numbers.max()}; expected c2_00001..c2_{bins.size:05d}, one "
            f"per entry of {_APS_U_BINS}"
        )
    cells = _cells(f, path, bins, q_list.size, phi_list.size)
    q, phi = q_list[cells // phi_list.size], phi_list[cells % phi_list.size]
    return _Bins("aps_u", q, phi, names, bins, n_frames, _aps_u_clock(f, path))


def _legacy_bins(f: h5py.File, path: Path, numbers: np.ndarray) -> np.ndarray:
    """The bin of each legacy matrix, from its number and ``xpcs/qphi_bin_to_process``."""
    if _LEGACY_BINS not in f:
        return numbers
    listed = _vector(f, _LEGACY_BINS, path, integer=True)
    sequential = np.arange(1, listed.size + 1)
    # boost_corr 2023 numbers its matrices 1..K in the order of the list; xpcs-eigen
    # also stores the list (its input) but names each matrix by its bin.
    if np.array_equal(numbers, sequential) and not np.array_equal(listed, sequential):
        if np.array_equal(np.sort(listed), sequential):
            raise FileFormatError(
                f"{path}: {_LEGACY_BINS} = {listed.tolist()} reorders the matrices' numbers "
                f"1..{listed.size}: matrix k may be bin k (xpcs-eigen) or the k-th listed bin "
                "(boost_corr 2023); expected the list in increasing order"
            )
        return listed
    if np.isin(numbers, listed).all():
        return numbers
    raise FileFormatError(
        f"{path}: {_LAYOUTS['aps_legacy']} holds matrices numbered {numbers.tolist()}; "
        f"expected 1..{listed.size} (one per entry of {_LEGACY_BINS}) or bins it lists "
        f"({listed.tolist()})"
    )


def _read_legacy(f: h5py.File, path: Path) -> _Bins:
    q_list, phi_list = (_vector(f, inner, path) for inner in _LISTS["aps_legacy"])
    if q_list.size != phi_list.size:
        raise FileFormatError(
            f"{path}: xpcs/dqlist has {q_list.size} entries and "
            f"xpcs/dphilist {phi_list.size}; expected one (q, phi) per bin"
        )
    numbers, names, n_frames = _matrices(f, "aps_legacy", path)
    bins = _legacy_bins(f, path, numbers)
    if bins.min() < 1 or bins.max() > q_list.size:
        raise FileFormatError(
            f"{path}: {_LAYOUTS['aps_legacy']} holds matrices for bins "
            f"{bins.min()}..{bins.max()}, past the {q_list.size} bins of xpcs/dqlist "
            "(bins are numbered from 1)"
        )
    dt = _frame_time(f, path, _LEGACY_FRAME_TIME)
    clock = _Clock(dt, 1.0, 1.0, "file: legacy layout, first frame not recorded; t_k = (k + 1) dt")
    return _Bins("aps_legacy", q_list[bins - 1], phi_list[bins - 1], names, bins, n_frames, clock)


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
                "choose one with load(path, q=...), or read all with load(path, q='all') "
                "(command line: --q Q, or --q all for a joint fit); q_values(path) lists them"
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
    f: h5py.File,
    path: Path,
    bins: _Bins,
    members: np.ndarray,
    q_bin: tuple[int, float],
    phi,
    frames,
    t_start: float | None,
    excluded: np.ndarray,
) -> xr.Dataset:
    iq, q = q_bin
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
    t, origin = _times(bins.clock, np.arange(a, b), t_start, path)
    shape = (members.size, b - a, b - a)
    check_memory(shape, what=f"reading {path} (q-bin {iq})", **LOAD_MEMORY)
    c2 = np.empty(shape)
    below = np.tri(b - a, k=-1, dtype=bool)
    off_diagonal = ~np.eye(b - a, dtype=bool)
    for row, k in enumerate(members):
        c2[row] = _read(f[bins.names[k]], path, np.s_[a:b, a:b])
        fill_triangle(c2[row], below)
        _mask_zeros(c2[row], off_diagonal, f"{path}: {bins.names[k]} ({_bin_words(bins, k)})")
    cut = excluded[a:b]
    c2[:, cut, :] = np.nan
    c2[:, :, cut] = np.nan
    source = f"{bins.layout}:{path} q-bin {iq}"
    if frames is not None:
        source += f" frames {a}:{b}"
    try:
        ds = from_arrays(c2, t, bins.phi[members], q, source=source)
    except DataError as err:
        names = ", ".join(bins.names[k] for k in members)
        raise FileFormatError(f"{path} ({bins.layout}, q-bin {iq}, {names}): {err}") from err
    ds.attrs["dt"] = bins.clock.dt
    ds.attrs["time_origin"] = origin
    if excluded.any():
        ds.attrs["excluded_frames"] = _ranges(excluded)
    return ds


def _bin_words(bins: _Bins, k: int) -> str:
    return f"bin {bins.numbers[k]}, q = {bins.q[k]:g} 1/Å, phi = {bins.phi[k]:g} deg"


def _mask_zeros(matrix: np.ndarray, off_diagonal: np.ndarray, where: str) -> None:
    """Set the pairs of a symmetrised matrix that hold exactly 0 to NaN, in place: no
    correlation is 0 (an unwritten chunk, a missing virtual source, a declared but never
    written dataset). Refuse a matrix with nothing else; warn when some are masked."""
    zero = (matrix == 0) & off_diagonal
    if not zero.any():
        return
    n = matrix.shape[0]
    if not np.isfinite(np.where(zero, np.nan, matrix)[off_diagonal]).any():
        raise FileFormatError(
            f"{where} holds no correlation: every pair is 0 (or NaN), as in a dataset "
            "declared but never written or a virtual dataset whose source file is missing. "
            "Expected c2 values near 1; leave this angle out with load(..., phi=[...])"
        )
    count = int(zero.sum()) // 2
    matrix[zero] = np.nan
    warnings.warn(
        f"{where}: {count} of {n * (n - 1) // 2} pairs hold 0, which no correlation takes "
        "(data never written?): masked as missing",
        UserWarning,
        stacklevel=4,
    )


def _times(
    clock: _Clock, k: np.ndarray, t_start: float | None, path: Path
) -> tuple[np.ndarray, str]:
    """Times [s] of the stored frames ``k`` and the description of their origin."""
    convention = f"; {TIME_CONVENTION}"
    if t_start is not None:
        origin = f"user: t_start = {t_start:g} s at stored frame 0, dt = {clock.dt:g} s"
        return t_start + clock.dt * k, origin + convention
    if clock.offset is None:
        raise FileFormatError(
            f"{path}: {_CONFIG}/begin_frame is negative ({clock.origin}): it counts raw "
            "frames from the end of a series whose length the file does not hold, so the "
            "time of the first frame is unknown, and the model's rates depend on absolute "
            "time. Give it: load(path, ..., t_start=T), T the time [s] of stored frame 0 "
            "(e.g. since the experiment or the shear started)"
        )
    return clock.scale * (clock.offset + clock.step * k), clock.origin + convention


def _read_netcdf(path: Path, frames, t_start: float | None, exclude_frames) -> xr.Dataset:
    """Read a netCDF file, only the window ``frames`` of it when given."""
    try:
        handle = xr.open_dataset(path, engine="h5netcdf", phony_dims="access")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _not_netcdf(path, err) from err
    with handle:
        lazy = handle
        n_frames = handle.sizes.get("t1", 0)
        a, b = 0, n_frames
        if frames is not None and {"t1", "t2"} <= set(handle.dims):
            a, b = _window(frames, n_frames)
            lazy = handle.isel(t1=slice(a, b), t2=slice(a, b))
        c2 = lazy.variables.get("c2")
        if c2 is not None and c2.dims == ("phi", "t1", "t2"):
            check_memory(c2.shape, what=f"reading {path}", **LOAD_MEMORY)
        try:
            ds = lazy.load()
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _not_netcdf(path, err) from err
    multi = qbins.is_multi_q(ds)
    try:
        qbins.validate_multi(ds) if multi else validate(ds)
    except DataError as err:
        raise FileFormatError(f"{path} (netcdf): {err}") from err
    excluded = _excluded(exclude_frames, n_frames)
    if t_start is not None or excluded.any():
        ds = ds.copy()
        if t_start is not None:
            dt = float(ds.attrs["dt"])
            t = t_start + dt * np.arange(a, b)
            ds = ds.assign_coords(t1=("t1", t, ds["t1"].attrs), t2=("t2", t, ds["t2"].attrs))
            ds.attrs["time_origin"] = (
                f"user: t_start = {t_start:g} s at stored frame 0, dt = {dt:g} s; {TIME_CONVENTION}"
            )
        if excluded.any():
            cut = xr.DataArray(excluded[a:b], dims="t1")
            keep = ~(cut | cut.rename(t1="t2"))
            for name in ("c2", "sigma"):
                if name in ds.data_vars:
                    ds[name] = ds[name].where(keep).transpose(*handle[name].dims)
            ds.attrs["excluded_frames"] = _ranges(excluded)
    # Counted again: a file written by another tool may lack or misstate the counts.
    return qbins.tally_bins(ds) if multi else tally_missing(ds)


def _not_netcdf(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(
        f"{path}: has a root variable c2 but xarray (h5netcdf) cannot read it as netCDF: {err}"
    )
