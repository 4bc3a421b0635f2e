"""Coverage of NLSQ standard errors and CMC intervals on speckle-level two-time data (issue 9).

Speckle simulations (``hd.simulate(noise="speckle")``: ``c2`` averaged over the pixels of
each q-sector, so pairs that share frames have correlated errors) of the issue's truth
``D0_ref = 3e3, D0_sample = 2e4, v0 = 800, f0 = 0.4, phi0 = 20`` at q = 0.01 1/Å,
dt = 0.1 s, phi = -45, 0, 45, 90, contrast 0.5, fitted from a start 30 % off with
``alpha_ref``, ``alpha_sample``, ``beta`` and ``f1`` fixed at their true 0 (the other
rate offsets, ``f2`` and ``f3`` are fixed by default). For each seed the fit is done once
with ``errors="speckle"``, which keeps the nominal errors alongside.

With ``--cmc`` each seed's NLSQ fit also starts a CMC run (``fit_cmc(ds, fit)``, which
takes ``errors="speckle"`` from the fit) and the 68 % central posterior interval (16th to
84th percentile of the draws) is checked against the truth, with the speckle correction
(``posterior``) and without it (``uncorrected_posterior``, the same run's draws before
the correction).

Prints, per quantity, the scatter of the fitted values over seeds, the mean of each kind
of stderr, the fraction of fits whose ``value -+ stderr`` covers the truth (68 % for
honest Gaussian errors; the binomial spread over the seeds is printed) and the rms of
``(value - truth) / stderr``, and the time the speckle errors add to a fit.

    .venv/bin/python benchmarks/coverage.py [--seeds 40] [--frames 200] [--pixels 1000]
                                            [--counts C] [--cmc] [--warmup 300]
                                            [--samples 500]
"""

import argparse
import time
import warnings

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
    parser.add_argument("--cmc", action="store_true", help="also CMC intervals")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()}).fix(*FIXED)
    names = list(TRUTH)
    values, speckle, nominal, seconds = [], [], [], []
    intervals = {"posterior": [], "uncorrected_posterior": []}
    cmc_seconds, unconverged = [], 0
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
        if args.cmc:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                cmc = hd.fit_cmc(
                    ds, result, warmup=args.warmup, samples=args.samples, seed=seed, progress=False
                )
            cmc_seconds.append(time.perf_counter() - start)
            unconverged += not cmc.converged
            for group, found in intervals.items():
                draws = cmc.posterior[group]
                found.append(
                    [draws[n].quantile([0.16, 0.84], dim=("chain", "draw")).values for n in names]
                )
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
    if args.cmc:
        print(
            f"\nCMC ({args.warmup} warmup + {args.samples} draws x 2 chains per shard): coverage "
            "of truth by the 68 % central posterior interval; "
            f"{unconverged} of {args.seeds} runs flagged not converged; median "
            f"{np.median(cmc_seconds):.1f} s per run"
        )
        print(f"{'quantity':<11}{'corrected':>11}{'uncorrected':>13}")
        bounds = {group: np.asarray(found) for group, found in intervals.items()}
        for k, name in enumerate(names):
            covered = {
                group: 100 * np.mean((b[:, k, 0] <= truth[k]) & (truth[k] <= b[:, k, 1]))
                for group, b in bounds.items()
            }
            print(
                f"{name:<11}{covered['posterior']:>10.0f}%"
                f"{covered['uncorrected_posterior']:>12.0f}%"
            )


if __name__ == "__main__":
    main()
