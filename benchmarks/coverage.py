"""Coverage of NLSQ standard errors on speckle-level two-time data (issue 9).

Speckle simulations (``hd.simulate(noise="speckle")``: ``c2`` averaged over the pixels of
each q-sector, so pairs that share frames have correlated errors) of the issue's truth
``D0_ref = 3e3, D0_sample = 2e4, v0 = 800, f0 = 0.4, phi0 = 20`` at q = 0.01 1/Å,
dt = 0.1 s, phi = -45, 0, 45, 90, contrast 0.5, fitted from a start 30 % off with
``alpha_ref``, ``alpha_sample``, ``beta`` and ``f1`` fixed at their true 0 (the other
rate offsets, ``f2`` and ``f3`` are fixed by default). For each seed the fit is done once
with ``errors="speckle"``, which keeps the nominal errors alongside.

Prints, per quantity, the scatter of the fitted values over seeds, the mean of each kind
of stderr, the fraction of fits whose ``value -+ stderr`` covers the truth (68 % for
honest Gaussian errors; the binomial spread over the seeds is printed) and the rms of
``(value - truth) / stderr``, and the time the speckle errors add to a fit.

    .venv/bin/python benchmarks/coverage.py [--seeds 40] [--frames 200] [--pixels 1000]
                                            [--counts C]
"""

import argparse
import time

import numpy as np

import heterodyne as hd

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
FIXED = ("alpha_ref", "alpha_sample", "beta", "f1")
PHI = [-45.0, 0.0, 45.0, 90.0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--pixels", type=int, default=1000)
    parser.add_argument("--counts", type=float, default=None, help="mean photons per pixel")
    args = parser.parse_args()
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()}).fix(*FIXED)
    names = list(TRUTH)
    values, speckle, nominal, seconds = [], [], [], []
    for seed in range(args.seeds):
        ds = hd.simulate(
            TRUTH,
            n_frames=args.frames,
            phi=PHI,
            noise="speckle",
            n_pixels=args.pixels,
            counts=args.counts,
            seed=seed,
        )
        start = time.perf_counter()
        result = hd.fit_nlsq(ds, guess, errors="speckle", progress=False)
        seconds.append(time.perf_counter() - start)
        values.append([result.value(n) for n in names])
        speckle.append([result.error(n) for n in names])
        nominal.append([float(result.stderr_nominal[n]) for n in names])
    values, speckle, nominal = map(np.asarray, (values, speckle, nominal))
    truth = np.array(list(TRUTH.values()))
    start = time.perf_counter()
    hd.fit_nlsq(ds, guess, progress=False)
    plain = time.perf_counter() - start

    spread = 100 * np.sqrt(0.68 * 0.32 / args.seeds)
    print(
        f"{args.seeds} seeds, N = {args.frames}, {len(PHI)} angles, {args.pixels} pixels, "
        f"counts {args.counts}; coverage of truth by value -+ stderr "
        f"(68 % expected, +- {spread:.0f} % over the seeds)"
    )
    print(
        f"{'quantity':<11}{'truth':>9}{'mean fit':>11}{'scatter':>10}{'nominal':>10}"
        f"{'speckle':>10}{'cover nom':>11}{'cover spk':>11}{'rms z nom':>11}{'rms z spk':>11}"
    )
    for k, name in enumerate(names):
        error = values[:, k] - truth[k]
        z_nominal, z_speckle = error / nominal[:, k], error / speckle[:, k]
        print(
            f"{name:<11}{truth[k]:>9.4g}{values[:, k].mean():>11.5g}"
            f"{values[:, k].std(ddof=1):>10.3g}{nominal[:, k].mean():>10.3g}"
            f"{speckle[:, k].mean():>10.3g}"
            f"{100 * np.mean(np.abs(z_nominal) < 1):>10.0f}%"
            f"{100 * np.mean(np.abs(z_speckle) < 1):>10.0f}%"
            f"{np.sqrt(np.mean(z_nominal**2)):>11.2f}{np.sqrt(np.mean(z_speckle**2)):>11.2f}"
        )
    print(
        f"fit with errors='speckle': median {np.median(seconds):.2f} s; "
        f"errors='nominal' (last seed): {plain:.2f} s"
    )


if __name__ == "__main__":
    main()
