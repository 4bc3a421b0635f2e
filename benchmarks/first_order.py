"""Does the first-order pair covariance predict the scatter of the fitted values? (issue 20)

The speckle error model (:mod:`heterodyne.uncertainty`) is first order in ``1 / pixels``.
This benchmark takes it apart on the ``flow`` case of ``benchmarks/coverage.py`` (same
truth, angles, start and fit; ``hd.simulate(noise="speckle", counts=...)``). Each seed is
fitted with ``errors="speckle"``, and ``c2 - model(truth)`` is kept at the fitted pairs.
With the truth's Jacobian ``J`` (physics, and each angle's contrast and offset) and
``A = J^T J``:

- ``Q``, the exact first-order covariance of the pairs, ``Cov(y_ij, y_kl) / P`` of the
  module doc with the joint cumulants of Poisson-counted Gaussian-field speckle with
  equal modes (all terms, no free factor: ``E = 1 / counts``, ``K = contrast |gamma|²``),
  for the same pair and for pairs that share one frame; pairs of four different frames
  covary through the speckle alone (``O(K² / P)``, no counting term), which is left out:
  the benchmark is meant for the shot-dominated regime (``counts`` well below the
  contrast), where that part is negligible;
- the replica covariance of ``c2`` over the seeds against ``Q``, summed over each kind;
- the scatter over the seeds of the fitted values, of the linearised estimates
  ``A^-1 J^T (c2 - model)`` (whose covariance is exactly ``A^-1 J^T Cov(c2) J A^-1``, so
  a difference from the sandwich is a difference of ``Cov(c2)`` from ``Q``, and a
  difference from the fitted values is the fit's non-linearity), the sandwich
  ``sqrt(diag(A^-1 J^T Q J A^-1))`` and the mean of the package's speckle stderr;
- per angle and band of lags, the variance of the partial linearised estimate of each
  quantity of ``--bands`` over its prediction from ``Q``: where an excess sits.

    .venv/bin/python benchmarks/first_order.py [--seeds 60] [--first-seed 0] [--frames 150]
                                               [--pixels 50000] [--counts 0.01]
                                               [--save F.npz]
    .venv/bin/python benchmarks/first_order.py --load A.npz B.npz ...
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from coverage import CASES, PHI, combine

import heterodyne as hd
from heterodyne import model
from heterodyne.parameters import PHYSICS_INDEX, Parameters

TRUTH, FIXED = CASES["flow"]
CONTRAST, Q_BIN, DT = 0.5, 0.01, 0.1
LAG_BANDS = ((1, 3), (4, 10), (11, 30), (31, None))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--pixels", type=int, default=50000)
    parser.add_argument("--counts", type=float, default=0.01)
    parser.add_argument("--bands", nargs="*", default=["D0_sample", "v0", "phi0"])
    parser.add_argument("--save", help="write each seed's outcome to this .npz file")
    parser.add_argument("--load", nargs="+", help="analyse saved runs together")
    args = parser.parse_args()
    outcome = combine(args.load) if args.load else run(args)
    if args.save:
        np.savez(args.save, **outcome)
    analyse(outcome, args.bands)


def run(args) -> dict:
    """Fit each seed; keep the fitted values, both stderr and ``c2`` at the pairs."""
    settings = {k: getattr(args, k) for k in ("frames", "pixels", "counts")}
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()}).fix(*FIXED)
    upper = np.triu_indices(args.frames, 1)
    values, speckle, c2 = [], [], []
    seeds = np.arange(args.first_seed, args.first_seed + args.seeds)
    start = time.perf_counter()
    for seed in seeds:
        ds = hd.simulate(
            TRUTH,
            n_frames=args.frames,
            dt=DT,
            phi=PHI,
            noise="speckle",
            n_pixels=args.pixels,
            counts=args.counts,
            seed=int(seed),
        )
        result = hd.fit_nlsq(ds, guess, errors="speckle", progress=False)
        values.append([result.value(n) for n in TRUTH])
        speckle.append([result.error(n) for n in TRUTH])
        c2.append(ds["c2"].values[:, upper[0], upper[1]])
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return {
        "settings": np.array(json.dumps(settings)),
        "seed": seeds,
        "value": np.asarray(values),
        "speckle": np.asarray(speckle),
        "c2": np.asarray(c2),
    }


def flow_grid(n):
    """The flow case on ``n`` frames: varied names, their physics indices, the physics
    vector, frame times, frame integrals, and the pairs ``i < j`` (two index arrays)."""
    names = list(TRUTH)
    physics = np.asarray(Parameters.coerce(TRUTH).physics_values())
    t = DT + DT * np.arange(n)
    first, second = np.triu_indices(n, 1)
    columns = [PHYSICS_INDEX[name] for name in names]
    return names, columns, physics, t, model.frame_integrals(physics, t), first, second


def truth_jacobian(physics, columns, t, phis, first, second):
    """Jacobian of ``c2`` at the pairs ``(first, second)`` of each angle, stacked by angle,
    with respect to the physics ``columns`` and each angle's contrast and offset, at the
    truth (contrast ``CONTRAST``, offset 1); and ``c2`` there, ``(n_phi, n_pairs)``."""
    n_physics, n_pairs = len(columns), first.size
    jac = np.zeros((len(phis) * n_pairs, n_physics + 2 * len(phis)))
    values = []
    x0 = jnp.array([physics[c] for c in columns] + [CONTRAST, 1.0])
    for angle, phi in enumerate(phis):

        def pairs_model(x, phi=phi):
            full = jnp.asarray(physics).at[jnp.array(columns)].set(x[:n_physics])
            grid = model.c2_grid(full, x[n_physics], x[n_physics + 1], t, jnp.array([phi]), Q_BIN)
            return grid[0][first, second]

        own = np.asarray(jax.jacfwd(pairs_model)(x0))
        rows = slice(angle * n_pairs, (angle + 1) * n_pairs)
        jac[rows, :n_physics] = own[:, :n_physics]
        jac[rows, n_physics + 2 * angle : n_physics + 2 * angle + 2] = own[:, n_physics:]
        values.append(np.asarray(pairs_model(x0)))
    return jac, np.asarray(values)


def cumulants(gamma, shot):
    """Joint cumulants ``k2, k3, k4`` of one pixel's counts over their mean, ``x = n / lambda``,
    as functions of frame-index arrays (repeats allowed).

    Speckle with equal modes (module doc of :mod:`heterodyne.uncertainty`, (A4)):
    ``k_I(a, b) = contrast |g_ab|²``, ``k_I(a, b, c) = 2 contrast² Re(g_ab g_bc g_ca)``,
    ``k_I(a, b, c, d) = 2 contrast³ Re(g_ab g_bc g_cd g_da + g_ab g_bd g_dc g_ca +
    g_ac g_cb g_bd g_da)``. Poisson counting of that rate adds, for each partition of the
    indices into blocks of one frame each, ``shot^(n - blocks)`` times the speckle
    cumulant over the blocks (the mean, 1, for a single block).
    """
    g = gamma

    def same(a, b):
        return (a == b).astype(float)

    def i2(a, b):
        return CONTRAST * np.abs(g[a, b]) ** 2

    def i3(a, b, c):
        return 2 * CONTRAST**2 * (g[a, b] * g[b, c] * g[c, a]).real

    def i4(a, b, c, d):
        cycles = g[a, b] * g[b, c] * g[c, d] * g[d, a] + g[a, b] * g[b, d] * g[d, c] * g[c, a]
        return 2 * CONTRAST**3 * (cycles + g[a, c] * g[c, b] * g[b, d] * g[d, a]).real

    def k2(a, b):
        return i2(a, b) + shot * same(a, b)

    def k3(a, b, c):
        merged = same(a, b) * i2(a, c) + same(a, c) * i2(a, b) + same(b, c) * i2(a, b)
        return i3(a, b, c) + shot * merged + shot**2 * same(a, b) * same(b, c)

    def k4(a, b, c, d):
        pair = (
            same(a, b) * i3(a, c, d)
            + same(a, c) * i3(a, b, d)
            + same(a, d) * i3(a, b, c)
            + same(b, c) * i3(a, b, d)
            + same(b, d) * i3(a, b, c)
            + same(c, d) * i3(a, b, c)
        )
        two = (
            same(a, b) * same(c, d) * i2(a, c)
            + same(a, c) * same(b, d) * i2(a, b)
            + same(a, d) * same(b, c) * i2(a, b)
            + same(a, b) * same(b, c) * i2(a, d)
            + same(a, b) * same(b, d) * i2(a, c)
            + same(a, c) * same(c, d) * i2(a, b)
            + same(b, c) * same(c, d) * i2(a, b)
        )
        everything = same(a, b) * same(b, c) * same(c, d)
        return i4(a, b, c, d) + shot * pair + shot**2 * two + shot**3 * everything

    return k2, k3, k4


def pair_covariance(gamma, shot, pixels):
    """``Q(i, j, k, l) = Cov(y_ij, y_kl) / P`` (module doc of :mod:`heterodyne.uncertainty`)
    for pairs ``i < j``, ``k < l`` given as index arrays."""
    k2, k3, k4 = cumulants(gamma, shot)

    def covariance(i, j, k, l):
        first, second = CONTRAST * np.abs(gamma[i, j]) ** 2, CONTRAST * np.abs(gamma[k, l]) ** 2
        return (
            k4(i, j, k, l)
            + k2(i, k) * k2(j, l)
            + k2(i, l) * k2(j, k)
            - first * (k3(i, k, l) + k3(j, k, l))
            - second * (k3(i, j, k) + k3(i, j, l))
            + first * second * (k2(i, k) + k2(i, l) + k2(j, k) + k2(j, l))
        ) / pixels

    return covariance


def analyse(outcome: dict, shown) -> None:
    settings = json.loads(str(outcome["settings"]))
    n, pixels, counts = settings["frames"], settings["pixels"], settings["counts"]
    shot = 1.0 / counts
    names, columns, physics, t, frames, first, second = flow_grid(n)
    pair_of = np.zeros((n, n), dtype=int)
    pair_of[first, second] = pair_of[second, first] = np.arange(first.size)
    n_quantities = len(names) + 2 * len(PHI)
    seeds, values, c2 = outcome["seed"], outcome["value"], outcome["c2"]
    a_matrix, b_matrix = (
        np.zeros((n_quantities, n_quantities)),
        np.zeros((2, n_quantities, n_quantities)),
    )
    projected = np.zeros((seeds.size, n_quantities))
    angles = []
    print(
        f"flow case, {seeds.size} seeds ({seeds.min()} to {seeds.max()}), N = {n}, "
        f"{len(PHI)} angles, {pixels} pixels, {counts} photons per pixel and frame"
    )
    print("replica covariance over the exact first-order Q, summed over each kind of pair pair:")
    stacked, at_truth = truth_jacobian(physics, columns, t, PHI, first, second)
    for angle, phi in enumerate(PHI):
        jac = stacked[angle * first.size : (angle + 1) * first.size]
        deviation = c2[:, angle] - at_truth[angle][None]
        centred = deviation - deviation.mean(axis=0)
        gamma = np.asarray(
            model.field_correlation(frames, Q_BIN, model.parallel_wavevector(physics, phi, Q_BIN))
        )
        q = pair_covariance(gamma, shot, pixels)
        variance = q(first, second, first, second)
        a_matrix += jac.T @ jac
        b_matrix[0] += jac.T @ (variance[:, None] * jac)
        projected += deviation @ jac
        shared, replica_shared, expected_shared = [], 0.0, 0.0
        for frame in range(n):
            others = np.delete(np.arange(n), frame)
            low, high = np.minimum(frame, others), np.maximum(frame, others)
            block = q(low[:, None], high[:, None], low[None, :], high[None, :])
            np.fill_diagonal(block, 0.0)
            rows = pair_of[frame, others]
            b_matrix[1] += jac[rows].T @ block @ jac[rows]
            replica = centred[:, rows].T @ centred[:, rows] / (seeds.size - 1)
            np.fill_diagonal(replica, 0.0)
            replica_shared += replica.sum()
            expected_shared += block.sum()
            shared.append((rows, block))
        angles.append((jac, deviation, variance, shared))
        same = np.sum(centred**2) / (seeds.size - 1) / variance.sum()
        print(
            f"  phi {phi:>5g}: same pair {same:.3f}, one shared frame "
            f"{replica_shared / expected_shared:.3f} (Q summed: {variance.sum():.4g} and "
            f"{expected_shared:.4g})"
        )
    inverse = np.linalg.inv(a_matrix)
    linear = projected @ inverse.T
    sandwich = inverse @ b_matrix.sum(axis=0) @ inverse
    same_only = inverse @ b_matrix[0] @ inverse
    spread = 1 / np.sqrt(2 * (seeds.size - 1))
    print(
        f"\nscatter over the seeds (relative sd of a scatter: {spread:.2f}) and first-order sd; "
        "ratios to the sandwich"
    )
    print(
        f"{'quantity':<11}{'fitted':>10}{'linear':>10}{'sandwich':>10}{'same only':>11}"
        f"{'speckle':>10}{'fit/sand':>10}{'lin/sand':>10}{'spk/sand':>10}{'corr':>7}"
    )
    truth = np.array(list(TRUTH.values()))
    for k, name in enumerate(names):
        fitted, lin = values[:, k].std(ddof=1), linear[:, k].std(ddof=1)
        sd = np.sqrt(sandwich[k, k])
        stderr = outcome["speckle"][:, k].mean()
        corr = np.corrcoef(values[:, k] - truth[k], linear[:, k])[0, 1]
        print(
            f"{name:<11}{fitted:>10.4g}{lin:>10.4g}{sd:>10.4g}{np.sqrt(same_only[k, k]):>11.4g}"
            f"{stderr:>10.4g}{fitted / sd:>10.2f}{lin / sd:>10.2f}{stderr / sd:>10.2f}{corr:>7.2f}"
        )
    print(
        "fitted, linear: scatter of the fitted values and of A^-1 J^T (c2 - model); "
        "sandwich: first-order sd (same only: without the shared frames); speckle: mean "
        "package stderr; corr: of fitted and linearised errors"
    )
    lags = second - first
    for name in shown:
        k = names.index(name)
        print(
            f"\n{name}: variance of the partial linearised estimate over its first-order one "
            "(share of the predicted variance), by angle and lag band"
        )
        for angle, (jac, deviation, variance, shared) in enumerate(angles):
            w = jac @ inverse[:, k]
            cells, parts, alone = [], [], 0.0
            for band, (low, high) in enumerate((*LAG_BANDS, (1, None))):
                inside = (lags >= low) & (lags <= (high or n))
                predicted = np.sum(w[inside] ** 2 * variance[inside])
                for rows, block in shared:
                    keep = inside[rows]
                    predicted += w[rows][keep] @ block[np.ix_(keep, keep)] @ w[rows][keep]
                part = deviation[:, inside] @ w[inside]
                if band < len(LAG_BANDS):
                    parts.append(part.var(ddof=1))
                    alone += predicted
                    label = f"{low}-{high}" if high else f">={low}"
                else:
                    label = "all"
                    between = (part.var(ddof=1) - sum(parts)) / predicted, 1 - alone / predicted
                share = predicted / sandwich[k, k]
                cells.append(f"{label}: {part.var(ddof=1) / predicted:4.2f} ({share:.2f})")
            print(
                f"  phi {PHI[angle]:>5g}  "
                + "  ".join(cells)
                + f"  between bands: {between[0]:5.2f} (Q: {between[1]:.2f})"
            )
    print(
        "between bands: covariance of the bands' partial estimates, measured and from Q, "
        "over the angle's predicted variance"
    )


if __name__ == "__main__":
    main()
