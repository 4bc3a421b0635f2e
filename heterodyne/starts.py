"""Starting values from the data, the components' labels, and the velocity a frame rate
can resolve.

A least-squares fit of the heterodyne model finds the minimum nearest its start. The
model has two traps that a start taken from a table falls into (MODEL.md, "Fitting
conventions"): the exchange of the two components, whose symmetry plane (equal rates,
``x_s = 1/2``) has zero gradient along every exchange direction, and the cross term's
oscillation, whose frequency a start must bracket. :func:`candidates` therefore reads
starts off the data, and :func:`exchange` maps a solution onto the labelling convention.

Estimator
---------
The one-time projection ``y_k(tau)`` (the mean of ``c2`` along each diagonal of angle
``k``) is compared with the one-time model (:func:`heterodyne.model.g2`)::

    g(tau) = (1-X)² exp(-G_r tau) + X² exp(-G_s tau)
             + 2 X (1-X) exp(-(G_r + G_s) tau / 2) cos(w_k tau)

with ``G = q² D0`` and ``w_k = q v0 |cos(phi_k - phi0)|``. For a grid of
``(G_r < G_s, X)`` and of frequencies ``w`` up to the resolvable ``pi / dt``, each angle's
``contrast`` and ``offset`` are solved for by weighted linear least squares (weights: the
number of pairs at each lag), so the search is over the non-linear parameters only; each
angle takes its best frequency. ``(v0, phi0)`` then follow from the frequencies by least
squares of ``w_k = q v0 |cos(phi_k - phi0)|`` over a grid of ``phi0``. The best few
distinct candidates, ranked by the joint one-time misfit, are the starts. Time laws
(``alpha``, ``beta``, ``f1``) start at 0: the projection averages over the window.

References
----------
He et al., PNAS 121(31) e2401162121 (2024), the one-time limit of the heterodyne model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import xarray as xr

from heterodyne import compilation, model, shapes
from heterodyne.pairs import fitted_rows
from heterodyne.parameters import (
    ESTIMATED,
    FRACTION_NAMES,
    PHYSICS_INDEX,
    PHYSICS_NAMES,
    Parameters,
)

# Lags used individually; longer lags are averaged in this many log-spaced bins.
LAGS = 160
LAG_BINS = 60
RATES = 10  # decay rates of the grid, log-spaced over the resolvable range
FRACTIONS = (0.2, 0.35, 0.5, 0.65, 0.8)  # sample fractions x_s of the grid
FREQUENCIES = 40  # cross-term frequencies of the coarse grid, 0 .. pi / dt
REFINE = 24  # finer frequencies around each angle's best one
PHI0_STEP = 0.5  # deg, grid of the flow direction
KEPT = 8  # (rates, fraction) pairs whose frequencies are refined
BATCH = 1024  # physics vectors of the one-time model per compiled call
# Pairs per angle of the least-squares line of the starting contrast and offset
# (estimate_scaling): beyond, blocks of rows spread over the record
SCALING_VALUES = 2**21
# A normalised speckle contrast is at most 1 (one coherent mode): a line through the data
# steeper than that is a starting g that hardly varies where the data do (estimate_scaling)
MAX_CONTRAST = 1.0
# Distinct starts differ by this factor in a rate, this much in x_s, or in v0 or phi0.
DISTINCT = {"rate": 1.5, "fraction": 0.1, "velocity": 0.1, "phi0": 10.0}


def resolvable_velocity(ds: xr.Dataset) -> float:
    """``pi / (q dt)`` [Å/s]: the largest speed whose cross-term phase changes by less than
    ``pi`` per frame at every angle (``q |cos(phi - phi0)| v dt < pi``). A faster velocity
    is aliased: it gives the same ``c2`` on the frame grid as a slower one."""
    t = ds["t1"].values
    return float(np.pi / (float(ds["q"]) * (t[1] - t[0])))


def lag_profile(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-time projection: ``(tau (L,), y (n_phi, L), weight (L,))``.

    ``y[k, l]`` is the mean of the finite ``c2`` of angle ``k`` at lag ``tau[l]`` (frames
    ``j - i``); the first :data:`LAGS` lags are kept one by one, longer ones averaged in
    log-spaced bins. ``weight`` counts the pairs behind each value.
    """
    c2 = ds["c2"].values
    t = ds["t1"].values
    n = t.size
    sums = np.zeros((c2.shape[0], n - 1))
    counts = np.zeros((c2.shape[0], n - 1))
    # row by row: row i holds lags 1 .. N - 1 - i in order, read along memory (a diagonal
    # is read one value per row)
    for i in range(n - 1):
        row = c2[:, i, i + 1 :]
        finite = np.isfinite(row)
        sums[:, : n - 1 - i] += np.where(finite, row, 0.0)
        counts[:, : n - 1 - i] += finite
    lags = np.arange(1, n, dtype=float)
    if n - 1 > LAGS + LAG_BINS:
        edges = np.unique(np.geomspace(LAGS + 1, n, LAG_BINS + 1).astype(int))
        groups = [np.array([k]) for k in range(LAGS)] + [
            np.arange(a - 1, b - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        per = np.array([counts[:, g].sum(axis=1) for g in groups]).T
        sums = np.array([sums[:, g].sum(axis=1) for g in groups]).T
        lags = np.array([np.average(lags[g], weights=counts[:, g].sum(0) + 1e-300) for g in groups])
        counts = per
    with np.errstate(invalid="ignore", divide="ignore"):
        y = sums / counts
    weight = counts.sum(axis=0) / c2.shape[0]
    y = np.where(counts > 0, y, 0.0)
    weight = np.where(np.all(counts > 0, axis=0), weight, 0.0)
    return lags * (t[1] - t[0]), y, weight


def _one_time(physics: np.ndarray, tau: np.ndarray, phi: np.ndarray, q: float) -> np.ndarray:
    """:func:`heterodyne.model.g2` (contrast 1, offset 0) of many physics vectors at once:
    ``(M, n_phi, L)``, ``BATCH`` vectors a call (the last batch padded with copies of the
    first vector), so that every grid of starts shares one compiled program."""
    m = physics.shape[0]
    padded = np.concatenate([physics, np.broadcast_to(physics[:1], (-m % BATCH, physics.shape[1]))])
    args = (tau, np.asarray(phi, dtype=np.float64), np.float64(q))
    return np.concatenate(
        [np.asarray(_batched_g2(padded[k : k + BATCH], *args)) for k in range(0, m, BATCH)]
    )[:m]


def batched_g2(physics, tau, phi, q):
    """:func:`heterodyne.model.g2` (contrast 1, offset 0) of the rows of ``physics``."""
    return jax.vmap(model.g2, in_axes=(0, None, None, None, None, None))(
        physics, 1.0, 0.0, tau, phi, q
    )


_batched_g2 = compilation.exported(batched_g2)


def _misfit(g: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted residual sum of squares of ``y_k ~ offset_k + contrast_k g`` with the best
    ``contrast_k > 0`` and ``offset_k`` for each row of ``g (M, L)`` and each angle of
    ``y (n_phi, L)``: ``(M, n_phi)``."""
    sw = w.sum()
    gm = (g @ w) / sw
    ym = (y @ w) / sw
    gg = (g * g) @ w / sw - gm * gm
    gy = (g @ (w * y).T) / sw - gm[:, None] * ym[None, :]
    yy = (y * y) @ w / sw - ym * ym
    with np.errstate(invalid="ignore", divide="ignore"):
        explained = np.where((gy > 0) & (gg[:, None] > 0), gy * gy / gg[:, None], 0.0)
    return sw * (yy[None, :] - explained)


def _vectors(base: np.ndarray, rate_ref, rate_sample, fraction, velocity, phi0, q) -> np.ndarray:
    """Physics vectors ``(M, 14)``: ``base`` with the one-time parameters replaced."""
    m = np.broadcast(rate_ref, rate_sample, fraction, velocity, phi0).shape
    out = np.tile(base, m + (1,))
    out[..., PHYSICS_INDEX["D0_ref"]] = rate_ref / q**2
    out[..., PHYSICS_INDEX["D0_sample"]] = rate_sample / q**2
    out[..., PHYSICS_INDEX["f0"]] = fraction - base[PHYSICS_INDEX["f3"]]
    out[..., PHYSICS_INDEX["f1"]] = 0.0
    out[..., PHYSICS_INDEX["v0"]] = velocity
    out[..., PHYSICS_INDEX["phi0"]] = phi0
    return out.reshape(-1, base.size)


def _flow(frequency: np.ndarray, phi: np.ndarray, q: float, phi0=None, velocity=None):
    """``(v0, phi0)`` from per-angle frequencies ``w_k = q v0 |cos(phi_k - phi0)|``, by
    least squares over a grid of ``phi0`` (or at the given one); ``v0 >= 0``."""
    grid = np.arange(-90.0, 90.0, PHI0_STEP) if phi0 is None else np.array([phi0])
    c = q * np.abs(np.cos(np.deg2rad(phi[None, :] - grid[:, None])))  # (G, n_phi)
    if velocity is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where((c * c).sum(1) > 0, (c @ frequency) / (c * c).sum(1), 0.0)
    else:
        v = np.full(grid.size, float(velocity))
    best = int(np.argmin(((frequency[None, :] - v[:, None] * c) ** 2).sum(1)))
    return max(float(v[best]), 0.0), float(grid[best])


def candidates(ds: xr.Dataset, p: Parameters, n: int, v_max: float) -> list[np.ndarray]:
    """Up to ``n`` distinct starting physics vectors read off the data, best first.

    Parameters that are fixed, or whose value the user gave (``p[name].given``), keep
    their value; the others of ``D0_ref``, ``D0_sample``, ``f0``, ``v0``, ``phi0`` come
    from the one-time estimator of this module's docstring, the time laws start at 0.
    Every start has the reference slower than the sample (the convention of
    :func:`exchange`) unless the user's values say otherwise, and none lies on the
    exchange symmetry plane. ``v0 <= v_max``.
    """
    base = p.physics_values()
    known = {name: float(p[name].value) for name in ESTIMATED if p[name].given or not p[name].vary}
    q = float(ds["q"])
    phi = ds["phi"].values.astype(float)
    tau, y, w = lag_profile(ds)
    # lags padded with weight 0 to a length set by the frames' size class (there are at
    # most N - 1 and LAGS + LAG_BINS): windows of similar length share the compiled code
    size = min(shapes.size_class(ds.sizes["t1"]), shapes.size_class(LAGS + LAG_BINS))
    tau, y, w = shapes.pad_edge(tau, size), shapes.pad_zeros(y, size), shapes.pad_zeros(w, size)
    dt = float(ds["t1"].values[1] - ds["t1"].values[0])
    span = tau.max()
    rates = np.geomspace(0.05 / span, 3.0 / dt, RATES)
    ref, sample = _rate_pairs(rates, known, q)
    fractions = np.array(FRACTIONS)
    if "f0" in known:
        fractions = np.array([np.clip(known["f0"] + base[PHYSICS_INDEX["f3"]], 0.0, 1.0)])
    pair, frac = np.meshgrid(np.arange(ref.size), fractions, indexing="ij")
    pair, frac = pair.ravel(), frac.ravel()
    # Each angle sees w_k = q v0 |cos(phi_k - phi0)| <= q v0.
    frequencies = np.linspace(0.0, q * known.get("v0", v_max), FREQUENCIES)
    # One angle at phi = phi0 evaluates every frequency w = q v0 (cos = 1).
    vectors = _vectors(
        base,
        ref[pair][:, None],
        sample[pair][:, None],
        frac[:, None],
        frequencies[None, :] / q,
        0.0,
        q,
    )
    # a batch at a time: the one-time models of the whole grid are never held at once
    misfit = np.concatenate(
        [
            _misfit(_one_time(vectors[k : k + BATCH], tau, np.zeros(1), q)[:, 0], y, w)
            for k in range(0, len(vectors), BATCH)
        ]
    ).reshape(pair.size, frequencies.size, -1)
    best_frequency = misfit.argmin(axis=1)  # (pairs, n_phi)
    total = misfit.min(axis=1).sum(axis=1)
    kept = np.argsort(total)[:KEPT]
    step = frequencies[1] - frequencies[0]
    found = []
    for m in kept:
        frequency = frequencies[best_frequency[m]]
        if step > 0:
            frequency = _refine(
                base, ref[pair[m]], sample[pair[m]], frac[m], frequency, step, tau, y, w, q
            )
        v0, phi0 = _flow(frequency, phi, q, known.get("phi0"), known.get("v0"))
        found.append(
            _vectors(base, ref[pair[m]], sample[pair[m]], frac[m], min(v0, v_max), phi0, q)[0]
        )
    found = np.array(found)
    for name, value in known.items():
        found[:, PHYSICS_INDEX[name]] = value
    free = tuple(PHYSICS_INDEX[n] for n in ESTIMATED if n not in known)
    refined = [_polish(v, free, tau, y, w, phi, q, v_max) for v in found]
    ranked = [v for _, v in sorted(refined, key=lambda pair: pair[0])]
    out = []
    for vector in ranked:
        if all(_distinct(vector, other, rates[0] / q**2) for other in out):
            out.append(vector)
        if len(out) == n:
            break
    return out


def _rate_pairs(rates: np.ndarray, known: dict, q: float):
    """``(G_r, G_s)`` pairs of the grid with ``G_r < G_s / 2`` or ``G_r = 0``: never equal
    rates (the symmetry plane). Known rates replace the grid."""
    if "D0_ref" in known and "D0_sample" in known:
        return np.array([known["D0_ref"] * q**2]), np.array([known["D0_sample"] * q**2])
    if "D0_ref" in known:
        return np.full(rates.size, known["D0_ref"] * q**2), rates
    if "D0_sample" in known:
        reference = np.concatenate([[0.0], rates])
        return reference, np.full(reference.size, known["D0_sample"] * q**2)
    i, j = np.triu_indices(rates.size, 1)
    ref = np.concatenate([np.zeros(rates.size), rates[i]])
    sample = np.concatenate([rates, rates[j]])
    return ref, sample


def _refine(base, rate_ref, rate_sample, fraction, frequency, step, tau, y, w, q):
    """Each angle's best frequency on a finer grid within one coarse step of it."""
    trial = np.maximum(frequency[:, None] + np.linspace(-step, step, REFINE)[None, :], 0.0)
    vectors = _vectors(base, rate_ref, rate_sample, fraction, trial.ravel() / q, 0.0, q)
    g = _one_time(vectors, tau, np.zeros(1), q)[:, 0].reshape(*trial.shape, -1)
    misfit = np.array([_misfit(g[k], y[k : k + 1], w)[:, 0] for k in range(y.shape[0])])
    return trial[np.arange(y.shape[0]), misfit.argmin(axis=1)]


def _projected(physics, tau, y, root_w, phi, q, xp=jnp):
    """Residuals of the one-time model with each angle's ``contrast`` and ``offset``
    solved for by weighted linear least squares (variable projection): ``(n_phi * L,)``.
    ``xp=np`` evaluates it outside any compiled program (one call: nothing to compile
    beyond :func:`heterodyne.model.g2`)."""
    g = xp.asarray(model.g2(physics, 1.0, 0.0, tau, phi, q))
    w = root_w * root_w
    sw = xp.sum(w)
    gm, ym = g @ w / sw, y @ w / sw
    gc, yc = g - gm[:, None], y - ym[:, None]
    slope = (gc * yc) @ w / xp.maximum((gc * gc) @ w, 1e-300)
    return (root_w * (yc - slope[:, None] * gc)).ravel()


def projected_residual(x, base, tau, y, root_w, phi, q, free: tuple[int, ...]):
    """:func:`_projected` with the ``free`` entries of the physics vector ``base`` set
    to ``x``."""
    return _projected(base.at[np.asarray(free)].set(x), tau, y, root_w, phi, q)


def residual_and_jacobian(x, base, tau, y, root_w, phi, q, free: tuple[int, ...]):
    """:func:`projected_residual` and its Jacobian in ``x``."""
    args = (base, tau, y, root_w, phi, q, free)
    return projected_residual(x, *args), jax.jacfwd(projected_residual)(x, *args)


#: one compiled program per set of free entries (static), kept on disk
_polish_program = compilation.exported(residual_and_jacobian, static_argnums=(7,))


def _polish(vector, free, tau, y, w, phi, q, v_max):
    """``(misfit, vector)``: ``vector`` refined by least squares on the one-time model in
    its ``free`` entries, in the labelling convention (reference slower)."""
    # angles padded to their size class (shapes.angle_class) with no data: their residuals
    # are zero and are cut off, so that every angle subset of a class shares the programs
    n_angles = shapes.angle_class(phi.size)
    data = (tau, shapes.pad_zeros(y, n_angles, 0), np.sqrt(w), shapes.pad_edge(phi, n_angles), q)
    real = y.size
    if not free:
        return float(np.sum(_projected(vector, *data, np)[:real] ** 2)), vector
    args = (vector, *data, free)
    last = {}

    def at(x):
        # least_squares asks for the residuals, then the Jacobian, at one x
        if last.get("x") is None or not np.array_equal(last["x"], x):
            last.update(x=x.copy(), out=[np.asarray(v)[:real] for v in _polish_program(x, *args)])
        return last["out"]

    bounds = {
        PHYSICS_INDEX["D0_ref"]: (0.0, np.inf),
        PHYSICS_INDEX["D0_sample"]: (0.0, np.inf),
        PHYSICS_INDEX["f0"]: (0.0, 1.0),
        PHYSICS_INDEX["v0"]: (0.0, v_max),
        PHYSICS_INDEX["phi0"]: (-90.0, 90.0),
    }
    lower, upper = (np.array([bounds[k][side] for k in free]) for side in (0, 1))
    x0 = np.clip(vector[list(free)], lower, upper)
    fit = scipy.optimize.least_squares(
        lambda x: at(x)[0],
        x0,
        jac=lambda x: at(x)[1],
        bounds=(lower, upper),
        x_scale="jac",
        max_nfev=50,
    )
    out = vector.copy()
    out[list(free)] = fit.x
    i, j = PHYSICS_INDEX["D0_ref"], PHYSICS_INDEX["D0_sample"]
    if out[i] > out[j] and i in free and j in free and PHYSICS_INDEX["f0"] in free:
        out[i], out[j] = out[j], out[i]
        out[PHYSICS_INDEX["f0"]] = 1.0 - out[PHYSICS_INDEX["f0"]]
    return 2.0 * float(fit.cost), out


def _distinct(a: np.ndarray, b: np.ndarray, floor: float) -> bool:
    """Whether two starts differ by more than :data:`DISTINCT`; rates below ``floor``
    [Å²/s] count as equal (too slow to tell apart over the window)."""
    rates = [PHYSICS_INDEX["D0_ref"], PHYSICS_INDEX["D0_sample"]]
    ratio = (np.abs(a[rates]) + floor) / (np.abs(b[rates]) + floor)
    v = PHYSICS_INDEX["v0"]
    return bool(
        np.any(np.abs(np.log(ratio)) > np.log(DISTINCT["rate"]))
        or abs(a[PHYSICS_INDEX["f0"]] - b[PHYSICS_INDEX["f0"]]) > DISTINCT["fraction"]
        or abs(a[v] - b[v]) > DISTINCT["velocity"] * max(abs(a[v]), abs(b[v]), 1e-12)
        or abs((a[PHYSICS_INDEX["phi0"]] - b[PHYSICS_INDEX["phi0"]] + 90) % 180 - 90)
        > DISTINCT["phi0"]
    )


# Parameters of each component that the exchange swaps.
PAIRS = (
    ("D0_ref", "D0_sample"),
    ("alpha_ref", "alpha_sample"),
    ("D_offset_ref", "D_offset_sample"),
)


def transport(physics: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """``(A_r, A_s)``: each component's transport integral over the whole window [Å²],
    the measure by which the reference is the slower component."""
    frames = integrals(physics, t)
    return float(frames.P_ref[-1]), float(frames.P_sample[-1])


def integrals(physics: np.ndarray, t: np.ndarray) -> model.FrameIntegrals:
    """:func:`heterodyne.model.frame_integrals` at the frame times ``t`` as numpy arrays,
    compiled once per size class of ``len(t)``."""
    t = np.asarray(t, float)
    padded = shapes.pad_edge(t, shapes.size_class(t.size))
    frames = _integrals(np.asarray(physics, float), padded)
    return model.FrameIntegrals(*(np.asarray(v)[: t.size] for v in frames))


_integrals = jax.jit(model.frame_integrals)


def fraction(t: np.ndarray, f0, f1, f2, f3) -> np.ndarray:
    """:func:`heterodyne.model.sample_fraction` at the frame times ``t`` (through
    :func:`integrals`, whose compiled program it shares)."""
    physics = np.zeros(len(PHYSICS_NAMES))
    physics[[PHYSICS_INDEX[n] for n in FRACTION_NAMES]] = f0, f1, f2, f3
    return integrals(physics, t).x_sample


def exchange(physics: np.ndarray, p: Parameters, t: np.ndarray):
    """The same solution with the components' labels exchanged, when the reference of
    ``physics`` is the faster component: ``(physics', exact)``, else ``None``.

    The exchange swaps ``D0``, ``alpha`` and ``D_offset`` of the two components and maps
    ``x_s -> 1 - x_s`` (MODEL.md, "Fitting conventions"). With ``f1 = 0`` the fraction is
    the constant ``f0 + f3`` and the map is exact (same ``c2`` to rounding); otherwise the
    fraction law cannot express ``1 - x_s`` exactly and ``physics'`` holds its
    least-squares approximation over ``t``, to be refitted (``exact = False``). ``None``
    also where the parameter settings fix the labels (a swapped pair not both varied or
    fixed at one value), or the mapped fraction leaves its bounds.
    """
    ref, sample = transport(physics, t)
    if not ref > sample:
        return None
    out = np.array(physics, dtype=float)
    for a, b in PAIRS:
        ia, ib = PHYSICS_INDEX[a], PHYSICS_INDEX[b]
        if p[a].vary != p[b].vary or (not p[a].vary and out[ia] != out[ib]):
            return None
        out[ia], out[ib] = out[ib], out[ia]
        for name, k in ((a, ia), (b, ib)):
            if not p[name].min <= out[k] <= p[name].max:
                return None
    f0, f1, f2, f3 = (out[PHYSICS_INDEX[n]] for n in FRACTION_NAMES)
    if f1 == 0.0:
        target = 1.0 - float(np.clip(f0 + f3, 0.0, 1.0))
        name = "f0" if p["f0"].vary else "f3" if p["f3"].vary else None
        if name is None:
            return None
        value = target - (f3 if name == "f0" else f0)
        if not p[name].min <= value <= p[name].max:
            return None
        out[PHYSICS_INDEX[name]] = value
        return out, True
    varied = [n for n in ("f0", "f1", "f3") if p[n].vary]
    if not varied:
        return None
    complement = 1.0 - fraction(t, f0, f1, f2, f3)
    index = [PHYSICS_INDEX[n] for n in varied]

    def misfit(x):
        trial = out.copy()
        trial[index] = x
        law = trial[[PHYSICS_INDEX[n] for n in FRACTION_NAMES]]
        return fraction(t, *law) - complement

    start = out[index].copy()
    if "f0" in varied:
        start[varied.index("f0")] = float(np.mean(complement)) - f3
    if "f1" in varied:
        start[varied.index("f1")] = -f1
    lower = np.array([p[n].min for n in varied])
    upper = np.array([p[n].max for n in varied])
    fitted = scipy.optimize.least_squares(
        misfit, np.clip(start, lower, upper), bounds=(lower, upper)
    )
    out[index] = fitted.x
    return out, False


def estimate_scaling(ds: xr.Dataset, physics: np.ndarray) -> dict[str, np.ndarray]:
    """Per-angle starting ``contrast`` and ``offset`` from the data.

    ``c2 = offset + contrast g`` is linear in both, so given the starting physics (hence
    ``g``) they are solved for by linear least squares over the fitted pairs: of every
    row up to ``SCALING_VALUES`` pairs per angle, beyond of blocks of rows spread evenly
    over the record. Where that gives no contrast in ``(0, MAX_CONTRAST]`` (a starting
    ``g`` far from the data, or one that hardly varies: a line too steep for any
    speckle), the plateau estimate is used instead: offset = median ``c2`` over the
    longest 10 % of lags, contrast = mean ``c2`` one frame off the diagonal minus the
    offset.
    """
    c2 = ds["c2"].values
    n = c2.shape[-1]
    t, phi, q = ds["t1"].values, ds["phi"].values, float(ds["q"])
    contrast, offset = np.full(c2.shape[0], 0.1), np.ones(c2.shape[0])
    far_lag = max(1, int(0.9 * (n - 1)))
    size = min(model.ROW_BLOCK, n)
    first_rows = np.arange(0, n, size)
    wanted = max(1, SCALING_VALUES // (size * n))
    if first_rows.size > wanted:
        first_rows = first_rows[
            np.unique(np.linspace(0, first_rows.size - 1, wanted).round().astype(int))
        ]
    for k in range(c2.shape[0]):
        # the least-squares line through (g, c2) over the fitted pairs, from sums taken a
        # block of rows at a time about the first pair (so a g that does not vary gives
        # exactly zero variance): memory O(N) rows, whatever the size of the grid
        sums, origin = np.zeros(5), None
        grid = model.grid_rows(physics, 1.0, 0.0, t, phi[k : k + 1], q, first_rows)
        for _, start, rows in grid:
            data, weight = fitted_rows(ds, k, start, start + rows.shape[0], np.float64)
            ok = weight > 0
            g, d = rows[ok], data[ok]
            if origin is None and g.size:
                origin = g[0], d[0]
            if g.size:
                g, d = g - origin[0], d - origin[1]
                sums += [g.size, g.sum(), d.sum(), g @ g, g @ d]
        if origin is None:
            continue
        count, sg, sd, sgg, sgd = sums
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = (sgd - sg * sd / count) / (sgg - sg * sg / count)
            base = origin[1] + (sd - scale * sg) / count - scale * origin[0]
        far = np.concatenate([np.diagonal(c2[k], lag) for lag in range(far_lag, n)])
        near = np.diagonal(c2[k], 1)
        far, near = far[np.isfinite(far)], near[np.isfinite(near)]
        if not 0 < scale <= MAX_CONTRAST and far.size and near.size:
            base = np.median(far)
            scale = np.mean(near) - base
        if np.isfinite(base) and np.isfinite(scale) and 0 < scale <= MAX_CONTRAST:
            contrast[k], offset[k] = scale, base
    return {"contrast": contrast, "offset": offset}
