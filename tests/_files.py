"""Beamline HDF5 files for the tests, written as their writers write them (FILES.md).

``aps_u`` lays out a boost_corr (APS-U 8-ID-I) result: a pySimpleMask q-map whose
non-empty cells are numbered 1..K (``dynamic_index_mapping``), matrices numbered in the
order of ``processed_bins``, the correlator's ``config`` and ``frame_time``. ``boost_corr``
adds the writer's storage: ``np.triu`` with the raw diagonal, float32, lzf above 8192
values. ``legacy`` lays out xpcs-eigen (``g2_NNNNN`` named by bin) and boost_corr 2023
(numbered 1, 2, ... with ``xpcs/qphi_bin_to_process``). Each returns a ``{inner path:
value}`` mapping that a test may change before ``write_h5`` writes it.
"""

from collections.abc import Collection, Mapping, Sequence

import h5py
import numpy as np

APS_U_Q = "xpcs/qmap/dynamic_v_list_dim0"
APS_U_PHI = "xpcs/qmap/dynamic_v_list_dim1"
APS_U_BINS = "xpcs/twotime/processed_bins"
APS_U_C2 = "xpcs/twotime/correlation_map"
MAPPING = "xpcs/qmap/dynamic_index_mapping"
NUM_PTS = "xpcs/qmap/dynamic_num_pts"
MAP_NAMES = "xpcs/qmap/map_names"
CONFIG = "xpcs/twotime/config"
INTENSITY = "xpcs/spatial_mean/intensity_vs_time"
FRAME_TIME = "entry/instrument/detector_1/frame_time"
LEGACY_Q = "xpcs/dqlist"
LEGACY_PHI = "xpcs/dphilist"
LEGACY_C2 = "exchange/C2T_all"
LEGACY_BINS = "xpcs/qphi_bin_to_process"
EXPOSURE_PERIOD = "measurement/instrument/detector/exposure_period"
LZF_ABOVE = 8192  # boost_corr compresses a matrix with lzf above this many values


def write_h5(path, datasets: Mapping, *, gzip: Collection[str] = (), lzf: Collection[str] = ()):
    """Write ``{inner path: value}``; a value ``{}`` makes an empty group.

    Values may also be ``h5py.Empty`` or a link (``h5py.SoftLink``); the paths in
    ``gzip`` or ``lzf`` that hold non-empty arrays are written chunked and compressed.
    """
    with h5py.File(path, "w") as f:
        for inner, value in datasets.items():
            if isinstance(value, dict):
                f.create_group(inner)
            elif inner in gzip and isinstance(value, np.ndarray) and value.size:
                f.create_dataset(inner, data=value, compression="gzip")
            elif inner in lzf and isinstance(value, np.ndarray) and value.size:
                f.create_dataset(inner, data=value, compression="lzf")
            else:
                f[inner] = value
    return path


def roi_values(shape: tuple[int, int], empty: Collection[tuple[int, int]] = ()) -> dict:
    """pySimpleMask's numbering: ``{(i0, i1): b}``, the non-empty cells of a grid of
    ``shape`` numbered 1..K in flat (dim0-major) order."""
    cells = [(i0, i1) for i0 in range(shape[0]) for i1 in range(shape[1])]
    kept = [cell for cell in cells if cell not in set(empty)]
    return {cell: b for b, cell in enumerate(kept, start=1)}


def aps_u(
    q_list,
    phi_list,
    processed: Sequence[tuple[int, int]],
    matrices,
    frame_time,
    *,
    empty: Collection[tuple[int, int]] = (),
    mapping: bool = True,
    map_names=("q", "phi"),
    config: Mapping[str, int] | None = None,
) -> dict:
    """An APS-U file: ``matrices[k]`` is the correlation of cell ``processed[k] = (q_index,
    phi_index)``; ``empty`` cells hold no pixel. The matrices are stored as given, numbered
    in the order of the sorted roi values (``processed_bins``), as boost_corr does."""
    shape = (np.size(q_list), np.size(phi_list))
    roi = roi_values(shape, empty)
    order = sorted(range(len(processed)), key=lambda k: roi[processed[k]])
    out = {
        APS_U_Q: q_list,
        APS_U_PHI: phi_list,
        NUM_PTS: np.array(shape),
        APS_U_BINS: np.array([roi[processed[k]] for k in order], dtype=np.int64),
        FRAME_TIME: frame_time,
    }
    if map_names is not None:
        out[MAP_NAMES] = np.array([name.encode() for name in map_names])
    if mapping:
        out[MAPPING] = np.array([i0 * shape[1] + i1 for i0, i1 in roi], dtype=np.int64)
    for name, value in (config or {}).items():
        out[f"{CONFIG}/{name}"] = np.int64(value)
    for number, k in enumerate(order, start=1):
        if k < len(matrices):
            out[f"{APS_U_C2}/c2_{number:05d}"] = matrices[k]
    return out


def boost_corr(q_list, phi_list, processed, matrices, frame_time, **options) -> tuple[dict, list]:
    """:func:`aps_u` with the matrices stored as boost_corr stores them: upper triangle
    with the diagonal, float32; returns the mapping and the paths to write with lzf."""
    stored = [np.triu(np.asarray(m)).astype(np.float32) for m in matrices]
    files = aps_u(q_list, phi_list, processed, stored, frame_time, **options)
    lzf = [key for key, value in files.items() if key.startswith(APS_U_C2 + "/")]
    return files, [key for key in lzf if np.size(files[key]) > LZF_ABOVE]


def legacy(
    q,
    phi,
    matrices: Mapping[int, np.ndarray],
    frame_time,
    frame_time_path=EXPOSURE_PERIOD,
    *,
    prefix: str = "g2",
    sequential: bool = False,
):
    """An APS legacy file: ``q[k]``, ``phi[k]`` of bin ``k + 1``; ``matrices[bin]``.

    xpcs-eigen names each matrix by its bin; ``sequential=True`` writes boost_corr 2023's
    layout: matrices numbered 1, 2, ... and their bins in ``xpcs/qphi_bin_to_process``
    (shape (n, 1), uint64, as written there).
    """
    out = {LEGACY_Q: q, LEGACY_PHI: phi, frame_time_path: frame_time}
    for k, (number, matrix) in enumerate(matrices.items(), start=1):
        out[f"{LEGACY_C2}/{prefix}_{k if sequential else number:05d}"] = matrix
    if sequential:
        out[LEGACY_BINS] = np.array(list(matrices), dtype=np.uint64)[:, None]
    return out
