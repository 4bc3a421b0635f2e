"""Which terms of the speckle pair covariance the error model needs (issue 20).

Without photon counting, ``errors="speckle"`` models the pair covariance by the Isserlis
shape ``Q_s = K_ik K_jl + K_il K_jk`` times a free scale fitted from residual moments
(:mod:`heterodyne.uncertainty`). The exact first-order covariance of Gaussian-field
speckle with equal modes (module doc there, :func:`first_order.pair_covariance`) adds,
for pairs ``p = (i, j)``, ``q = (k, l)``:

- ``third``: ``- K_ij (k3(i,k,l) + k3(j,k,l)) - K_kl (k3(i,j,k) + k3(i,j,l))
  + K_ij K_kl (K_ik + K_il + K_jk + K_jl)``, ``k3(a,b,c) = 2 c² Re(g_ab g_bc g_ca)``;
- ``cycles``: ``2 c³ Re(g_ij g_jk g_kl g_li + g_ij g_jl g_lk g_ki)`` (product forms over
  the grid);
- ``cross``: ``2 c³ Re(g_ik g_kj g_jl g_li)`` (no product form).

On the ``flow`` case of ``benchmarks/coverage.py`` at a small size (``--frames`` frames,
``--phi`` angles, no counting) this builds each part densely over all pairs, and prints
per quantity the sandwich sd ``sqrt(diag(A^-1 J^T Q J A^-1))`` of several shapes over
that of the exact ``Q``, each shape either at ``1 / P`` or times the scale that the
package's three residual moments (``m0, m1, m2`` of :func:`heterodyne.uncertainty.
pair_moments`, their expectations ``tr(N (I - H) Q (I - H))``) would pick when the data
follow the exact ``Q``. Candidates for ``cross``: left out; bounded by ``c Q_s``
(``|2 Re(a conj b)| <= |a|² + |b|²`` holds in the Loewner order, the matrices
``|a -+ b|²`` being Schur products of positive semi-definite ones); and the product form
``2 c³ Re(g_ik g_jl) |g_ij| |g_kl|`` (early frame with early, late with late), exact for
the same pair and, for a real ``g``, for pairs that share their early or late frame; the
package's speckle shape is the last row.

With ``--sandwich`` it prints only the sandwiches at ``1 / P`` (exact, Isserlis, the
package's shape), summed in blocks of rows: any ``--frames``. With ``--seeds S`` it
prints only the scatter of the linearised estimates over the data of ``hd.simulate``
seeds ``0 .. S - 1`` (no dense covariance: any ``--frames``), per 20 seeds, the spread
that the rows of ``benchmarks/coverage.py`` see. With ``--replicas R`` it simulates
``R`` independent ``c2`` of ``--pixels`` pixels and compares the scatter of the
linearised estimates ``A^-1 J^T (c2 - model)`` with the exact sandwich, so that the
target itself is checked.

    .venv/bin/python benchmarks/speckle_shape.py [--frames 50] [--phi -45 0]
                                                 [--pixels 2000] [--replicas 0]
    .venv/bin/python benchmarks/speckle_shape.py --frames 150 --phi -45 0 45 90 --seeds 600
                                                 [--counts C]
    .venv/bin/python benchmarks/speckle_shape.py --frames 150 --phi -45 0 45 90 --sandwich
"""

import argparse
import time

import numpy as np
from coverage import CASES
from first_order import CONTRAST, Q_BIN, flow_grid, pair_covariance, truth_jacobian

import heterodyne as hd
from heterodyne import model, speckle

TRUTH, FIXED = CASES["flow"]


def parts(gamma, first, second, rows=slice(None)):
    """Dense ``(Q_s, third, cycles, cross, approximation of cross)`` of one angle, per
    pixel, between the pairs ``rows`` of ``(first, second)`` and all of them."""
    c = CONTRAST
    g = gamma
    big_k = c * np.abs(g) ** 2
    i, j = first[rows, None], second[rows, None]
    k, l = first[None, :], second[None, :]

    def k3(a, b, d):
        return 2 * c**2 * (g[a, b] * g[b, d] * g[d, a]).real

    isserlis = big_k[i, k] * big_k[j, l] + big_k[i, l] * big_k[j, k]
    third = (
        -big_k[i, j] * (k3(i, k, l) + k3(j, k, l))
        - big_k[k, l] * (k3(i, j, k) + k3(i, j, l))
        + big_k[i, j] * big_k[k, l] * (big_k[i, k] + big_k[i, l] + big_k[j, k] + big_k[j, l])
    )
    cycles = (
        2
        * c**3
        * (g[i, j] * g[j, k] * g[k, l] * g[l, i] + g[i, j] * g[j, l] * g[l, k] * g[k, i]).real
    )
    cross = 2 * c**3 * (g[i, k] * g[k, j] * g[j, l] * g[l, i]).real
    magnitude = np.abs(g)
    approximation = 2 * c**3 * (g[i, k] * g[j, l]).real * magnitude[i, j] * magnitude[k, l]
    return isserlis, third, cycles, cross, approximation


def neighbours(first, second, n):
    """Matrices ``N1``, ``N2`` of the moments ``m1``, ``m2`` over the pairs of one angle."""
    index = -np.ones((n, n), dtype=int)
    index[first, second] = np.arange(first.size)
    out = np.zeros((2, first.size, first.size))
    for moment, steps in enumerate((((1, 1),), ((0, 1), (1, 0)))):
        for di, dj in steps:
            a, b = first + di, second + dj
            inside = (b < n) & (a < b)
            out[moment, np.arange(first.size)[inside], index[a[inside], b[inside]]] = 1.0
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--phi", type=float, nargs="+", default=[-45.0, 0.0])
    parser.add_argument("--pixels", type=int, default=2000)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, default=0, help="only the scatter of linearised estimates"
    )
    parser.add_argument("--counts", type=float, default=None)
    parser.add_argument(
        "--sandwich", action="store_true", help="only the sandwiches at 1 / P, in row blocks"
    )
    args = parser.parse_args()
    n, phis, pixels = args.frames, args.phi, args.pixels
    names, columns, physics, t, frames, first, second = flow_grid(n)
    n_pairs, n_physics = first.size, len(names)
    jac, truths = truth_jacobian(physics, columns, t, phis, first, second)
    if args.seeds:
        linear_scatter(args, jac, truths, first, second)
        return
    if args.sandwich:
        sandwiches(args, jac, physics, frames, first, second)
        return
    blocks = np.zeros((5, len(phis) * n_pairs, len(phis) * n_pairs))
    near = np.zeros((2, len(phis) * n_pairs, len(phis) * n_pairs))
    for angle, phi in enumerate(phis):
        rows = slice(angle * n_pairs, (angle + 1) * n_pairs)
        gamma = np.asarray(
            model.field_correlation(frames, Q_BIN, model.parallel_wavevector(physics, phi, Q_BIN))
        )
        pieces = parts(gamma, first, second)
        exact = pair_covariance(gamma, 0.0, 1.0)(
            first[:, None], second[:, None], first[None, :], second[None, :]
        )
        gap = np.abs(sum(pieces[:4]) - exact).max() / np.abs(exact).max()
        print(f"phi {phi:g}: parts sum to first_order.pair_covariance within {gap:.1e}")
        for b, piece in enumerate(pieces):
            blocks[b, rows, rows] = piece / pixels
        near[:, rows, rows] = neighbours(first, second, n)
    isserlis, third, cycles, cross, approximation = blocks
    exact = isserlis + third + cycles + cross
    shapes = {
        "Isserlis": isserlis,
        "+third": isserlis + third,
        "+third+cycles": isserlis + third + cycles,
        "+... +c Q_s bound": isserlis + third + cycles + CONTRAST * isserlis,
        "+... +approx cross": isserlis + third + cycles + approximation,
    }
    inverse = np.linalg.inv(jac.T @ jac)
    kept = np.eye(jac.shape[0]) - jac @ inverse @ jac.T

    def moments(q):
        around = kept @ q @ kept
        return np.array([np.trace(around), *(np.sum(m * around.T) for m in near)])

    def sd(q):
        return np.sqrt(np.diag(inverse @ jac.T @ q @ jac @ inverse))

    target = moments(exact)
    reference = sd(exact)
    print(
        f"\nflow case, N = {n}, phi = {phis}, {pixels} pixels, no counting; sandwich sd over "
        "the exact one; scale: what the moments pick, times P"
    )
    header = "".join(f"{name:>11}" for name in names)
    print(f"{'shape':<22}{'scale':>7}{header}")
    print(f"{'exact (sd)':<22}{'1':>7}" + "".join(f"{v:>11.4g}" for v in reference[:n_physics]))
    for label, q in shapes.items():
        expected = moments(q)
        scale = expected @ target / (expected @ expected)
        for factor, tag in ((1.0, "1/P"), (scale, "moments")):
            ratio = np.sqrt(factor) * sd(q) / reference
            print(
                f"{label + ' ' + tag:<22}{factor:>7.3f}"
                + "".join(f"{v:>11.3f}" for v in ratio[:n_physics])
            )
    print(
        "moment ratios (expected under shape / under exact), m0 m1 m2: "
        + "; ".join(
            f"{label}: " + " ".join(f"{v:.3f}" for v in moments(q) / target)
            for label, q in shapes.items()
        )
    )
    for label, q in (("cross", cross), ("approx", approximation), ("c Q_s", CONTRAST * isserlis)):
        lags = np.concatenate([second - first] * len(phis))
        diag = np.diag(q) / np.diag(exact)
        print(
            f"{label} on the same pair over exact: lag 1 {diag[lags == 1].mean():.3f}, "
            f"lag 10 {diag[lags == 10].mean():.3f}, lag {n // 2} {diag[lags == n // 2].mean():.3f}"
        )
    if args.replicas:
        start = time.perf_counter()
        deviation = np.zeros((args.replicas, jac.shape[0]))
        contrast = np.full(len(phis), CONTRAST)
        for r in range(args.replicas):
            c2 = speckle.simulated_two_time(
                physics, contrast, t, np.array(phis), Q_BIN, n_pixels=pixels, seed=1000 + r
            )
            deviation[r] = np.concatenate(
                [c2[a][first, second] - truths[a] for a in range(len(phis))]
            )
        linear = deviation @ jac @ inverse
        spread = 1 / np.sqrt(2 * (args.replicas - 1))
        print(
            f"\n{args.replicas} replicas ({time.perf_counter() - start:.0f} s): scatter of the "
            f"linearised estimates over the exact sandwich sd (relative sd {spread:.2f})"
        )
        print(
            " " * 29
            + "".join(
                f"{v:>11.3f}"
                for v in linear.std(axis=0, ddof=1)[:n_physics] / reference[:n_physics]
            )
        )
        variance = deviation.var(axis=0, ddof=1) / np.diag(exact)
        lags = np.concatenate([second - first] * len(phis))
        print(
            f"same-pair variance over exact: lag 1 {variance[lags == 1].mean():.3f}, "
            f"lags 2-10 {variance[(lags > 1) & (lags <= 10)].mean():.3f}, "
            f"lags > 10 {variance[lags > 10].mean():.3f}"
        )


def sandwiches(args, jac, physics, frames, first, second, block=100) -> None:
    """Sandwich sd of the exact covariance and of the shapes at ``1 / P``, ``J^T Q J``
    summed over blocks of rows of ``Q``: memory ``O(block N²)``, for any ``--frames``."""
    n_pairs = first.size
    products = np.zeros((5, jac.shape[1], jac.shape[1]))
    start = time.perf_counter()
    for angle, phi in enumerate(args.phi):
        gamma = np.asarray(
            model.field_correlation(frames, Q_BIN, model.parallel_wavevector(physics, phi, Q_BIN))
        )
        own = jac[angle * n_pairs : (angle + 1) * n_pairs]
        for low in range(0, n_pairs, block):
            rows = slice(low, min(low + block, n_pairs))
            for b, piece in enumerate(parts(gamma, first, second, rows)):
                products[b] += own[rows].T @ piece @ own / args.pixels
    isserlis, third, cycles, cross, approximation = products
    inverse = np.linalg.inv(jac.T @ jac)

    def sd(b):
        return np.sqrt(np.diag(inverse @ b @ inverse))[: len(TRUTH)]

    reference = sd(isserlis + third + cycles + cross)
    print(
        f"flow case, N = {args.frames}, phi = {args.phi}, {args.pixels} pixels, no counting "
        f"({time.perf_counter() - start:.0f} s): sandwich sd at 1 / P"
    )
    print(f"{'shape':<22}" + "".join(f"{name:>11}" for name in TRUTH))
    print(f"{'exact (sd)':<22}" + "".join(f"{v:>11.4g}" for v in reference))
    for label, b in (
        ("Isserlis", isserlis),
        ("+third+cycles", isserlis + third + cycles),
        ("package's shape", isserlis + third + cycles + approximation),
    ):
        print(f"{label:<22}" + "".join(f"{v:>11.3f}" for v in sd(b) / reference))


def linear_scatter(args, jac, truths, first, second) -> None:
    """Scatter of the linearised estimates ``A^-1 J^T (c2 - model)`` over the data of
    ``hd.simulate`` seeds ``0 .. seeds - 1`` (the fits of ``benchmarks/coverage.py`` are
    linear to a correlation of 0.999 or more on this case), per 20 seeds and over all."""
    inverse = np.linalg.inv(jac.T @ jac)
    estimates = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        ds = hd.simulate(
            TRUTH,
            n_frames=args.frames,
            phi=args.phi,
            noise="speckle",
            n_pixels=args.pixels,
            counts=args.counts,
            seed=seed,
        )
        c2 = ds["c2"].values[:, first, second]
        deviation = (c2 - truths).ravel()
        kept = np.isfinite(deviation)
        estimates.append(inverse @ (jac[kept].T @ deviation[kept]))
    estimates = np.asarray(estimates)[:, : len(TRUTH)]
    print(
        f"flow case, N = {args.frames}, phi = {args.phi}, {args.pixels} pixels, counts "
        f"{args.counts}: sd of the linearised estimates over hd.simulate seeds "
        f"({time.perf_counter() - start:.0f} s)"
    )
    print(f"{'seeds':<12}" + "".join(f"{name:>11}" for name in TRUTH))
    for low in range(0, args.seeds - 19, 20):
        block = estimates[low : low + 20].std(axis=0, ddof=1)
        print(f"{low:>4} - {low + 19:<5}" + "".join(f"{v:>11.4g}" for v in block))
    print(f"{'all':<12}" + "".join(f"{v:>11.4g}" for v in estimates.std(axis=0, ddof=1)))


if __name__ == "__main__":
    main()
