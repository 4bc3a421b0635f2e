"""Seeded synthetic two-time Datasets from the model, for tutorials, tests and benchmarks."""

from __future__ import annotations

import numpy as np
import xarray as xr

from heterodyne import model
from heterodyne.data import from_arrays
from heterodyne.errors import OptionError
from heterodyne.parameters import PHYSICS_NAMES, Parameters


def simulate(
    params=None,
    *,
    n_frames: int = 200,
    dt: float = 0.1,
    t_start: float | None = None,
    phi=0.0,
    q: float = 0.01,
    contrast=0.5,
    offset=1.0,
    noise: float = 0.0,
    store_sigma: bool = False,
    seed: int = 0,
) -> xr.Dataset:
    """Simulate a canonical Dataset: the model ``c2`` plus seeded Gaussian noise.

    Parameters
    ----------
    params : Parameters, dict or None
        Physics parameters; names missing from a dict take the MODEL.md defaults.
    n_frames : int
        Number of frames ``N`` (>= 3).
    dt : float
        Frame spacing [s].
    t_start : float, optional
        Time of the first frame [s]; defaults to ``dt`` (frame 1 ends at ``dt``).
    phi : float or sequence
        Detector azimuths [deg].
    q : float
        Wavevector [1/Å].
    contrast, offset : float or sequence
        One value, or one per angle.
    noise : float
        Standard deviation of the Gaussian noise added to each pair ``t1 <= t2``; the
        lower triangle mirrors it, so the matrix stays symmetric.
    store_sigma : bool
        Store ``sigma = noise`` as the Dataset's uncertainty (needs ``noise > 0``).
    seed : int
        Seed of the noise; the same seed gives the same Dataset.

    Returns
    -------
    xarray.Dataset
        Canonical Dataset; the true values are in attrs ``true_<name>``
        (``true_contrast`` and ``true_offset`` per angle) and ``attrs["noise"]``.

    Examples
    --------
    >>> ds = simulate({"v0": 500.0}, n_frames=100, phi=[0, 45, 90], noise=0.01)
    """
    p = Parameters.coerce(params)
    if not isinstance(n_frames, int | np.integer) or n_frames < 3:
        raise OptionError(f"n_frames must be an integer >= 3; got {n_frames!r}")
    if not np.isfinite(dt) or dt <= 0:
        raise OptionError(f"dt must be a positive number of seconds; got {dt!r}")
    if not np.isfinite(noise) or noise < 0:
        raise OptionError(f"noise must be >= 0; got {noise!r}")
    if store_sigma and noise <= 0:
        raise OptionError("store_sigma=True needs noise > 0")
    phi = np.atleast_1d(np.asarray(phi, dtype=np.float64))
    n_phi = phi.size
    scale = _per_angle("contrast", contrast, n_phi)
    base = _per_angle("offset", offset, n_phi)
    p["contrast"].value, p["offset"].value = scale, base
    p.validate(n_phi)
    t = (dt if t_start is None else float(t_start)) + dt * np.arange(n_frames)
    c2 = np.array(model.c2_grid(p.physics_values(), scale, base, t, phi, float(q)))
    if noise > 0:
        rng = np.random.default_rng(seed)
        upper = np.triu(rng.standard_normal(c2.shape) * noise)
        c2 += upper + np.swapaxes(np.triu(upper, 1), 1, 2)
    sigma = np.full_like(c2, noise) if store_sigma else None
    ds = from_arrays(c2, t, phi, q, sigma=sigma, source=f"heterodyne.simulate(seed={seed})")
    ds.attrs["dt"] = float(dt)
    ds.attrs.update({f"true_{n}": float(p[n].value) for n in PHYSICS_NAMES})
    ds.attrs.update(true_contrast=scale, true_offset=base, noise=float(noise), seed=int(seed))
    return ds


def _per_angle(name, value, n_phi):
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if values.size == 1:
        return np.full(n_phi, values[0])
    if values.size != n_phi:
        raise OptionError(f"{name} has {values.size} values; expected 1 or one per angle ({n_phi})")
    return values
