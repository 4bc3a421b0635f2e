"""NLSQ speed and memory: cold (compile included) and warm fit time, nfev, peak memory.

Each configuration runs in a fresh process so that "cold" includes JIT compilation and
the peak resident memory is that configuration's own.

    .venv/bin/python benchmarks/nlsq.py [--frames 200 500 1000] [--angles 1 4]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}


def one(n_frames: int, n_angles: int) -> dict:
    import numpy as np

    import heterodyne as hd

    phi = np.linspace(-60, 60, n_angles) if n_angles > 1 else [0.0]
    ds = hd.simulate(TRUTH, n_frames=n_frames, phi=phi, noise=0.01, seed=0)
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()})
    t0 = time.perf_counter()
    cold = hd.fit_nlsq(ds, guess, progress=False)
    t1 = time.perf_counter()
    warm = hd.fit_nlsq(ds, guess, progress=False)
    t2 = time.perf_counter()
    assert cold.success and warm.success
    return {
        "frames": n_frames,
        "angles": n_angles,
        "pairs": warm.info["n_pairs"],
        "varied": warm.info["n_varied"],
        "cold_s": t1 - t0,
        "warm_s": t2 - t1,
        "nfev": warm.nfev,
        "v0": warm.value("v0"),
        "peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--angles", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print(
        f"{'frames':>6} {'angles':>6} {'pairs':>9} {'varied':>6} {'cold s':>8} "
        f"{'warm s':>8} {'nfev':>5} {'peak MB':>8}"
    )
    for n in args.frames:
        for a in args.angles:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(n), str(a)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{r['frames']:>6} {r['angles']:>6} {r['pairs']:>9} {r['varied']:>6} "
                f"{r['cold_s']:>8.2f} {r['warm_s']:>8.2f} {r['nfev']:>5} "
                f"{r['peak_MB']:>8.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
