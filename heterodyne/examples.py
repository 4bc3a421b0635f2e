"""Example beamline files: simulated q-bins written in the layouts :func:`heterodyne.load`
reads, for tutorials, tests and trying a pipeline end to end without beamline data."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from heterodyne.errors import OptionError
from heterodyne.files import atomic_write
from heterodyne.simulate import simulate

LAYOUTS = ("aps_u", "aps_legacy")
# A flowing sample against a slowly diffusing reference (the README's demo sample).
EXAMPLE_TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
# An ageing sample (simulate it from t_start = 10 s at q = 0.01 1/Å, dt = 0.1 s): its rate
# and velocity grow as t^0.5, J_s = 500 t^0.5 Å²/s and v = 50 t^0.5 Å/s, against a
# reference that does not age; the age scans of the tests, notebook and benchmark.
AGEING_TRUTH = {
    "D0_ref": 300.0,
    "D0_sample": 500.0,
    "alpha_sample": 0.5,
    "v0": 50.0,
    "beta": 0.5,
    "f0": 0.4,
    "phi0": 20.0,
}


def write_beamline(path, datasets, *, layout: str = "aps_u", overwrite: bool = False) -> Path:
    """Write canonical Datasets (one per q-bin, same angles and times) as a beamline file.

    ``aps_u``: ``xpcs/qmap/dynamic_v_list_dim0/1``, ``xpcs/twotime/processed_bins``
    (``bin - 1 = q_index * n_phi + phi_index``), upper triangles in
    ``xpcs/twotime/correlation_map/c2_00001...``, ``entry/instrument/detector_1/frame_time``.
    ``aps_legacy``: ``xpcs/dqlist``, ``xpcs/dphilist`` of shape (1, n_bins), half matrices
    in ``exchange/C2T_all/c2_NNNNN``, ``measurement/instrument/detector/exposure_period``.
    The first frame of each Dataset must be at ``t = dt`` (frame 0 ends at ``dt``).
    """
    if layout not in LAYOUTS:
        raise OptionError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    first = datasets[0]
    phi = first["phi"].values
    dt = float(first.attrs["dt"])
    for ds in datasets:
        if not (
            np.array_equal(ds["phi"].values, phi)
            and np.array_equal(ds["t1"].values, first["t1"].values)
        ):
            raise OptionError("all q-bins must share the angles and frame times")
    if not np.isclose(first["t1"].values[0], dt):
        raise OptionError(
            f"the first frame must be at t = dt = {dt} s; got {first['t1'].values[0]} s"
        )
    q = np.array([float(ds["q"]) for ds in datasets])
    upper = np.triu(np.ones((first.sizes["t1"],) * 2, dtype=bool))

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            matrices = [
                np.where(upper, ds["c2"].values[k], 0.0) for ds in datasets for k in range(phi.size)
            ]
            if layout == "aps_u":
                f["xpcs/qmap/dynamic_v_list_dim0"] = q
                f["xpcs/qmap/dynamic_v_list_dim1"] = phi
                f["xpcs/twotime/processed_bins"] = np.arange(1, len(matrices) + 1)
                f["entry/instrument/detector_1/frame_time"] = dt
                group = f.create_group("xpcs/twotime/correlation_map")
            else:
                f["xpcs/dqlist"] = np.repeat(q, phi.size)[None, :]
                f["xpcs/dphilist"] = np.tile(phi, q.size)[None, :]
                f["measurement/instrument/detector/exposure_period"] = dt
                group = f.create_group("exchange/C2T_all")
            for k, matrix in enumerate(matrices):
                group.create_dataset(f"c2_{k + 1:05d}", data=matrix, compression="gzip")

    return atomic_write(write, path, overwrite=overwrite)


def example_file(
    path,
    *,
    layout: str = "aps_u",
    q=(0.004, 0.006, 0.008, 0.010, 0.012, 0.014),
    params=None,
    n_frames: int = 100,
    dt: float = 0.1,
    phi=(-45.0, 0.0, 45.0),
    noise: float = 0.01,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Simulate one q-bin per ``q`` [1/Å] with the same physics and write a beamline file.

    The transport rates are the same at every q, so the decay rate grows as ``q²`` and
    the flow phase as ``q``: a survey over the file should recover one ``D0_sample``.
    ``params`` defaults to :data:`EXAMPLE_TRUTH`. Returns the path.
    """
    truth = EXAMPLE_TRUTH if params is None else params
    datasets = [
        simulate(
            truth,
            n_frames=n_frames,
            dt=dt,
            phi=list(phi),
            q=float(q_bin),
            noise=noise,
            seed=seed + k,
        )
        for k, q_bin in enumerate(q)
    ]
    return write_beamline(path, datasets, layout=layout, overwrite=overwrite)
