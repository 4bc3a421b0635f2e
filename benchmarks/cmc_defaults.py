"""CMC at its default settings (issue 16): does it pass its own diagnostics?

Well-posed cases: the demo's sample (D0_ref 3e3, D0_sample 2e4, v0 800, f0 0.4, phi0 20)
at 100 frames x 3 angles with Gaussian noise 0.01, one seed per run, fitted by
``hd.fit_nlsq(ds)`` (defaults) and sampled by ``hd.fit_cmc(ds, nlsq)`` with every other
setting at its default (or ``--warmup``/``--samples`` to compare). Prints, per seed,
whether every shard passes R-hat, bulk/tail ESS, BFMI and divergences, the worst R-hat,
the least ESS per chain, the failing figures and the wall time; then the pass count.

    .venv/bin/python benchmarks/cmc_defaults.py [--seeds 20] [--warmup W] [--samples S] [--chains C]
"""

import argparse
import time

import numpy as np

import heterodyne as hd

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--warmup", type=int, help="default: fit_cmc's")
    parser.add_argument("--samples", type=int, help="default: fit_cmc's")
    parser.add_argument("--chains", type=int, help="default: fit_cmc's")
    args = parser.parse_args()
    settings = {
        k: v
        for k, v in (("warmup", args.warmup), ("samples", args.samples), ("chains", args.chains))
        if v
    }
    passed, times = 0, []
    print(
        f"{'seed':>4} {'shards':>6} {'pass':>5} {'R-hat max':>10} {'ESS/chain min':>14} "
        f"{'s':>6}  failing"
    )
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        ds = hd.simulate(TRUTH, n_frames=args.frames, phi=[-45.0, 0.0, 45.0], noise=0.01, seed=seed)
        nlsq = hd.fit_nlsq(ds, progress=False)
        start = time.perf_counter()
        result = hd.fit_cmc(ds, nlsq, seed=seed, progress=False, **settings)
        seconds = time.perf_counter() - start
        times.append(seconds)
        figures = result.diagnostics
        chains = figures.sizes["chain"]
        ess = min(float(figures["ess_bulk"].min()), float(figures["ess_tail"].min())) / chains
        failing = [f for found in result.failures().values() for f in found]
        passed += result.converged
        print(
            f"{seed:>4} {result.info['shards']:>6} {str(result.converged):>5} "
            f"{float(figures['rhat'].max()):>10.4f} {ess:>14.0f} {seconds:>6.1f}  "
            f"{'; '.join(failing[:2])}",
            flush=True,
        )
    info = result.info
    print(
        f"passed {passed} of {args.seeds} at warmup {info['warmup']} + samples "
        f"{info['samples']} x {info['chains']} chains; time per run: median "
        f"{np.median(times):.1f} s (first run includes compilation: {times[0]:.1f} s)"
    )


if __name__ == "__main__":
    main()
