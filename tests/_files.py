"""Beamline HDF5 files for the tests, built as ``{inner path: value}`` mappings.

``aps_u`` and ``legacy`` lay out the two beamline formats that ``heterodyne.io.load``
reads (its module docstring describes them); a test drops, replaces or adds entries of
the mapping before ``write_h5`` writes it.
"""

from collections.abc import Collection, Mapping, Sequence

import h5py
import numpy as np

APS_U_Q = "xpcs/qmap/dynamic_v_list_dim0"
APS_U_PHI = "xpcs/qmap/dynamic_v_list_dim1"
APS_U_BINS = "xpcs/twotime/processed_bins"
APS_U_C2 = "xpcs/twotime/correlation_map"
APS_U_T = "xpcs/twotime/t"
FRAME_TIME = "entry/instrument/detector_1/frame_time"
LEGACY_Q = "xpcs/dqlist"
LEGACY_PHI = "xpcs/dphilist"
LEGACY_C2 = "exchange/C2T_all"
EXPOSURE_PERIOD = "measurement/instrument/detector/exposure_period"


def write_h5(path, datasets: Mapping, *, gzip: Collection[str] = ()):
    """Write ``{inner path: value}``; a value ``{}`` makes an empty group.

    Values may also be ``h5py.Empty`` or a link (``h5py.SoftLink``); the paths in
    ``gzip`` that hold non-empty arrays are written chunked and compressed.
    """
    with h5py.File(path, "w") as f:
        for inner, value in datasets.items():
            if isinstance(value, dict):
                f.create_group(inner)
            elif inner in gzip and isinstance(value, np.ndarray) and value.size:
                f.create_dataset(inner, data=value, compression="gzip")
            else:
                f[inner] = value
    return path


def aps_u(q_list, phi_list, processed: Sequence[tuple[int, int]], matrices, frame_time) -> dict:
    """An APS-U file: ``matrices[k]`` belongs to bin ``processed[k] = (q_index, phi_index)``."""
    n_phi = np.size(phi_list)
    out = {
        APS_U_Q: q_list,
        APS_U_PHI: phi_list,
        APS_U_BINS: np.array([iq * n_phi + ip + 1 for iq, ip in processed]),
        FRAME_TIME: frame_time,
    }
    for k, matrix in enumerate(matrices):
        out[f"{APS_U_C2}/c2_{k + 1:05d}"] = matrix
    return out


def legacy(q, phi, matrices: Mapping[int, np.ndarray], frame_time, frame_time_path=EXPOSURE_PERIOD):
    """An APS legacy file: ``q[k]``, ``phi[k]`` of bin ``k + 1``; ``matrices[bin]``."""
    out = {LEGACY_Q: q, LEGACY_PHI: phi, frame_time_path: frame_time}
    for number, matrix in matrices.items():
        out[f"{LEGACY_C2}/c2_{number:05d}"] = matrix
    return out
