"""Seeded synthetic two-time Datasets from the model, for tutorials, tests and benchmarks."""

from __future__ import annotations

import numpy as np
import xarray as xr

from heterodyne import checks, model, speckle
from heterodyne.data import from_owned_arrays
from heterodyne.errors import OptionError
from heterodyne.memory import check_memory
from heterodyne.parameters import PHYSICS_NAMES, Parameters

# Peak memory of simulate beyond what exists before it, in bytes per value of the c2 grid
# (check_memory): the grid and the Dataset's copy of it (2 x 8 bytes per value), plus the
# angle-independent integrals of the model and the noise of one angle (2 x 8 bytes per
# value of one matrix), each with a margin of 25 %. Measured as peak RSS: 0.82 GB above
# the import at 3000 frames x 4 angles (2.8 times the grid), 0.38 GB at 3000 x 1 angle.
SIMULATE_MEMORY = {"per_value": 20.0, "per_angle": 20.0}
# Rows of noise drawn at a time.
NOISE_ROWS = 256
# store_sigma doubles the grid part (sigma and its copy). noise="speckle" also holds the
# sums of products it accumulates (8 bytes per value) and one block of pixel intensities
# and their Poisson counts (int64 and float64): bytes per pixel and frame of each angle.
SPECKLE_PER_VALUE = 8.0
SPECKLE_PER_PIXEL = 24.0


def simulate(
    params=None,
    *,
    n_frames: int = 200,
    dt: float = 0.1,
    t_start: float | None = None,
    phi=0.0,
    q=0.01,
    contrast=0.5,
    offset=1.0,
    noise: float | str = 0.0,
    store_sigma: bool = False,
    n_pixels: int | None = None,
    counts: float | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """Simulate a canonical Dataset: the model ``c2`` plus seeded noise.

    The noise is Gaussian and independent per pair (``noise`` a number), or that of real
    two-time data (``noise="speckle"``): ``c2`` computed over the pixels of a q-sector
    from speckle intensities of the reference and sample fields, whose errors are
    correlated along rows and columns (see :mod:`heterodyne.speckle`).

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
        Detector azimuths [deg]; with several q-bins, one sequence for all or one
        sequence per bin (real q-maps have different angles in different bins).
    q : float or sequence
        Wavevector [1/Å]; several give a multi-q Dataset (:mod:`heterodyne.qbins`) whose
        bins share the physics and have independent noise (bin ``k`` seeded by
        ``(seed, k)``).
    contrast, offset : float or sequence
        One value, or one per angle. With ``noise="speckle"`` the contrast is the speckle
        contrast ``beta`` in ``(0, 1]`` of a partially coherent beam, realised with
        ``ceil(1 / contrast)`` coherent modes per pixel (the cost grows with it), and the
        offset must be 1 (the pixel average is normalised).
    noise : float or "speckle"
        A number: standard deviation of the Gaussian noise added to each pair
        ``t1 <= t2``; the lower triangle mirrors it, so the matrix stays symmetric.
        ``"speckle"``: ``c2(i, j) = <I_i I_j> / (<I_i> <I_j>)`` over ``n_pixels``
        independent speckle realisations per angle, diagonal included; its mean is the
        model ``c2`` (``D0 = 2 D`` for Brownian motion, ``v0`` the drift velocity,
        ``phi0`` its direction, offset 1).
    store_sigma : bool
        Store ``sigma = noise`` as the Dataset's uncertainty (needs a number ``noise > 0``).
    n_pixels : int, optional
        Speckle only: pixels per q-sector (default 1000).
    counts : float, optional
        Speckle only: Poisson-count the intensities at this mean photon count per pixel
        and frame (default: no counting), e.g. 0.01 to 10. The diagonal then carries the
        shot-noise spike ``1 / counts``; a frame of an angle that counted no photon at all
        (likely when ``counts * n_pixels`` is below ~5) has NaN pairs, which fits mask.
        The pixels are simulated in blocks (:func:`heterodyne.speckle.simulated_two_time`),
        so 50 000 pixels take no more memory than 2000.
    seed : int
        Seed of the noise; the same seed gives the same Dataset.

    Returns
    -------
    xarray.Dataset
        Canonical Dataset; the true values are in attrs ``true_<name>``
        (``true_contrast`` and ``true_offset`` per angle) and ``attrs["noise"]``; with
        speckle also ``attrs["n_pixels"]`` and, when counted, ``attrs["counts"]``.

    Raises
    ------
    OptionError
        An option has a wrong type or value.
    DataError
        The Dataset would not fit in memory (checked before any work, see
        :func:`heterodyne.memory.check_memory`).

    Examples
    --------
    >>> ds = simulate({"v0": 500.0}, n_frames=100, phi=[0, 45, 90], noise=0.01)
    >>> ds = simulate({"v0": 500.0}, n_frames=100, phi=[0, 45], noise="speckle", n_pixels=500)
    """
    if np.ndim(q) > 0:
        return _simulate_bins(
            params, q, phi, seed=seed, n_frames=n_frames, dt=dt, t_start=t_start,
            contrast=contrast, offset=offset, noise=noise, store_sigma=store_sigma,
            n_pixels=n_pixels, counts=counts,
        )  # fmt: skip
    p = Parameters.coerce(params)
    n_frames = checks.integer(n_frames, "n_frames", minimum=3)
    dt = checks.number(dt, "dt [s]", positive=True)
    t_start = dt if t_start is None else checks.number(t_start, "t_start [s]")
    phi = checks.numbers(phi, "phi [deg]")
    q = checks.number(q, "q [1/Å] (one number: simulate one q-bin at a time)", positive=True)
    seed = checks.seed_value(seed)
    store_sigma = checks.flag(store_sigma, "store_sigma")
    speckled = isinstance(noise, str)
    if speckled:
        n_pixels = 1000 if n_pixels is None else n_pixels
        _check_speckle_options(noise, store_sigma, n_pixels, counts)
    else:
        noise = checks.number(noise, "noise (a number >= 0 or 'speckle')", minimum=0.0)
        if store_sigma and noise <= 0:
            raise OptionError("store_sigma=True needs noise > 0")
        if n_pixels is not None or counts is not None:
            raise OptionError("n_pixels and counts are options of noise='speckle'")
    n_phi = phi.size
    scale = _per_angle("contrast", contrast, n_phi)
    base = _per_angle("offset", offset, n_phi)
    p["contrast"].value, p["offset"].value = scale, base
    p.validate(n_phi)
    if speckled and (np.any(scale <= 0) or np.any(base != 1)):
        raise OptionError(
            f"noise='speckle' needs contrast in (0, 1] and offset 1 (the pixel average is "
            f"normalised); got contrast={scale.tolist()}, offset={base.tolist()}"
        )
    pixels = (
        SPECKLE_PER_VALUE + SPECKLE_PER_PIXEL * min(n_pixels, speckle.PIXEL_BLOCK) / n_frames
        if speckled
        else 0.0
    )
    check_memory(
        (n_phi, n_frames, n_frames),
        per_value=SIMULATE_MEMORY["per_value"] * (2 if store_sigma else 1) + pixels,
        per_angle=SIMULATE_MEMORY["per_angle"],
        what=f"simulate(n_frames={n_frames}) of {n_phi} angle(s)",
        remedy="simulate fewer frames (memory grows as n_frames²)",
    )
    t = t_start + dt * np.arange(n_frames)
    steps = np.diff(t)
    # the spacing data.validate will demand of the Dataset, checked before any model work
    if not (np.all(np.isfinite(t)) and np.all(np.abs(steps - dt) <= 0.5e-6 * dt)):
        raise OptionError(
            f"t_start={t_start:g} s and dt={dt:g} s give frame times that float64 cannot "
            "space evenly; use a t_start closer to dt's scale"
        )
    physics = p.physics_values()
    if speckled:
        c2 = speckle.simulated_two_time(
            physics, scale, t, phi, float(q), n_pixels=n_pixels, counts=counts, seed=seed
        )
    else:
        c2 = model.c2_grid_rows(physics, scale, base, t, phi, float(q))
        if noise > 0:
            rng = np.random.default_rng(seed)
            # Drawn one angle and a block of rows at a time (the same numbers as one draw
            # of c2's shape): the temporaries hold a few rows, not a matrix. Row i adds
            # its draws on and above the diagonal, and mirrors those above it.
            columns = np.arange(n_frames)
            for matrix in c2:
                for start in range(0, n_frames, NOISE_ROWS):
                    stop = min(start + NOISE_ROWS, n_frames)
                    draws = rng.standard_normal((stop - start, n_frames)) * noise
                    offset = columns[None, :] - np.arange(start, stop)[:, None]
                    matrix[start:stop] += np.where(offset >= 0, draws, 0.0)
                    matrix[:, start:stop] += np.where(offset > 0, draws, 0.0).T
    sigma = np.full_like(c2, noise) if store_sigma else None
    # the grids are this function's own: the Dataset takes them without a copy
    ds = from_owned_arrays(
        c2,
        t,
        np.asarray(phi, dtype=np.float64),
        q,
        sigma,
        source=f"heterodyne.simulate(seed={seed})",
    )
    ds.attrs["dt"] = float(dt)
    ds.attrs.update({f"true_{n}": float(p[n].value) for n in PHYSICS_NAMES})
    ds.attrs.update(true_contrast=scale, true_offset=base, seed=int(seed))
    if speckled:
        ds.attrs.update(noise="speckle", n_pixels=int(n_pixels))
        if counts is not None:
            ds.attrs["counts"] = float(counts)
    else:
        ds.attrs["noise"] = float(noise)
    return ds


def _check_speckle_options(noise, store_sigma, n_pixels, counts):
    if noise != "speckle":
        raise OptionError(f"noise must be a number >= 0 or 'speckle'; got {noise!r}")
    if store_sigma:
        raise OptionError("store_sigma=True needs a number noise > 0, not 'speckle'")
    checks.integer(n_pixels, "n_pixels", minimum=2)
    if counts is not None:
        checks.number(counts, "counts (a mean photon count)", positive=True)


def _per_angle(name, value, n_phi):
    values = checks.numbers(value, name)
    if values.size == 1:
        return np.full(n_phi, values[0])
    if values.size != n_phi:
        raise OptionError(f"{name} has {values.size} values; expected 1 or one per angle ({n_phi})")
    return values


def _simulate_bins(params, q, phi, *, seed, **options) -> xr.Dataset:
    """:func:`simulate` of several q-bins, combined (:func:`heterodyne.qbins.combine`);
    ``phi`` one sequence for all bins or one per bin."""
    from heterodyne import qbins

    q = checks.numbers(q, "q [1/Å]")
    seed = checks.seed_value(seed)
    per_bin = isinstance(phi, list | tuple) and any(
        isinstance(a, list | tuple | np.ndarray) for a in phi
    )
    if per_bin and len(phi) != q.size:
        raise OptionError(f"phi gives angles for {len(phi)} q-bins; q has {q.size}")
    angles = list(phi) if per_bin else [phi] * q.size
    # every bin's q and angles checked before the first bin's model is compiled
    if np.any(q <= 0) or np.unique(q).size != q.size:
        raise OptionError(f"q [1/Å] must be distinct numbers > 0; got {q.tolist()}")
    for a in angles:
        checks.numbers(a, "phi [deg]")
    parts = [
        simulate(
            params,
            q=float(value),
            phi=angles[k],
            seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]),
            **options,
        )
        for k, value in enumerate(q)
    ]
    out = qbins.combine(parts, source=f"heterodyne.simulate(seed={seed})")
    out.attrs["seed"] = int(seed)
    return out
