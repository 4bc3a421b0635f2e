"""NLSQ performance, separable (fast) against blocked-Jacobian (plain) normal equations.

For each configuration and path, in a fresh process (so that "cold" includes JIT
compilation and the peak resident memory is that run's own): cold and warm ``fit_nlsq``
time (their difference is mostly compilation), cost evaluations, the time of one
evaluation of ``(J^T J, J^T r, r^T r)`` and the evaluations per second, the bytes of data
one evaluation reads, and that time against one streaming read of the data
(``n_pairs x 8`` bytes) at the memory bandwidth measured in the same process right after
(a numpy copy of 256 MB: bytes read + written per second), so that both see the same
load. Two floors put that ratio in scale: a compiled call with the same arguments that does
nothing, and a compiled call of the model's per-frame factors without derivatives
(``O(N)``: what any evaluation computes first); ``least x`` is the second against the
streaming read: no evaluation through the model's JAX code gets below it.

    .venv/bin/python benchmarks/performance.py [--frames 200 500 1000 2000]
        [--angles 1 4] [--path fast plain]

The machine load (``os.getloadavg``) is printed before and after: other processes on the
same cores slow every number down.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
PATHS = ("fast", "plain")


def bandwidth(n_bytes: int = 2**28, repeats: int = 5) -> float:
    """Memory bandwidth [bytes/s] of a numpy copy: bytes read plus bytes written."""
    source = np.ones(n_bytes // 8)
    target = np.empty_like(source)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def best_of(call, repeats: int = 20) -> float:
    """The shortest of ``repeats`` wall times [s] of ``call()``, after one call to warm up."""
    call()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def one(n_frames: int, n_angles: int, path: str) -> dict:
    import jax
    import jax.numpy as jnp

    import heterodyne as hd
    from heterodyne import structured
    from heterodyne.parameters import PHYSICS_NAMES

    if path == "plain":
        # the switch of this benchmark: the fast path's rule says "does not apply"
        structured.blocks = lambda pairs, block=None: None
    phi = np.linspace(-60, 60, n_angles) if n_angles > 1 else [0.0]
    ds = hd.simulate(TRUTH, n_frames=n_frames, phi=phi, noise=0.01, seed=0)
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()})
    t0 = time.perf_counter()
    cold = hd.fit_nlsq(ds, guess, progress=False)
    t1 = time.perf_counter()
    warm = hd.fit_nlsq(ds, guess, progress=False)
    t2 = time.perf_counter()
    assert cold.success and warm.success

    problem = hd.Objective.build(ds, guess, fix=(), scaling="per_angle")
    evaluation = best_of(lambda: problem.normal_equations(problem.x0))
    pairs = problem.pairs
    if problem.blocks is None:
        read = [pairs.c2, pairs.weight, pairs.angle, pairs.i, pairs.j]
        data = pairs
    else:
        read = [problem.blocks.panels, problem.blocks.diag]
        data = problem.blocks
    # the floor of any evaluation: a compiled call with the same arguments doing nothing
    nothing = jax.jit(lambda x, template, free, data: (x[:, None] * x, x, x[0]))
    args = (jnp.asarray(problem.x0), problem.template, problem.free, data)
    floor = best_of(lambda: [np.asarray(v) for v in nothing(*args)])
    # the least work of any evaluation: the model's per-frame factors, no derivatives
    physics = problem.template.at[problem.free].set(args[0])[: len(PHYSICS_NAMES)]
    factors = jax.jit(structured.frame_factors)
    model = best_of(lambda: [np.asarray(v) for v in factors(physics, pairs.t, pairs.phi, pairs.q)])
    n_pairs = warm.info["n_pairs"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "frames": n_frames,
        "angles": n_angles,
        "path": path,
        "pairs": n_pairs,
        "varied": warm.info["n_varied"],
        "cold_s": t1 - t0,
        "warm_s": t2 - t1,
        "nfev": warm.nfev,
        "eval_s": evaluation,
        "floor_s": floor,
        "model_s": model,
        "read_MB": sum(int(a.nbytes) for a in read) / 1e6,
        "data_MB": n_pairs * 8 / 1e6,
        "v0": warm.value("v0"),
        "peak_MB": peak,
        "bandwidth": bandwidth(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 500, 1000, 2000])
    parser.add_argument("--angles", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--path", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), int(args.one[1]), args.one[2])))
        return
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        f"{'frames':>6} {'angles':>6} {'path':>5} {'pairs':>9} {'varied':>6} {'cold s':>7} "
        f"{'warm s':>7} {'nfev':>4} {'eval ms':>8} {'floor ms':>8} {'model ms':>8} {'eval/s':>7} "
        f"{'read MB':>8} {'GB/s':>5} {'x stream':>8} {'least x':>7} {'peak MB':>8} {'v0':>9}"
    )
    for n in args.frames:
        for a in args.angles:
            for path in args.path:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", str(n), str(a), path],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                stream = r["data_MB"] * 1e6 / r["bandwidth"]
                print(
                    f"{r['frames']:>6} {r['angles']:>6} {r['path']:>5} {r['pairs']:>9} "
                    f"{r['varied']:>6} {r['cold_s']:>7.2f} {r['warm_s']:>7.2f} "
                    f"{r['nfev']:>4} {r['eval_s'] * 1e3:>8.2f} {r['floor_s'] * 1e3:>8.3f} "
                    f"{r['model_s'] * 1e3:>8.3f} {1 / r['eval_s']:>7.1f} "
                    f"{r['read_MB']:>8.1f} {r['bandwidth'] / 1e9:>5.1f} "
                    f"{r['eval_s'] / stream:>8.1f} {r['model_s'] / stream:>7.1f} "
                    f"{r['peak_MB']:>8.0f} {r['v0']:>9.3f}",
                    flush=True,
                )
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        "eval ms: one evaluation of (J^T J, J^T r, r^T r); floor ms: a compiled call with the "
        "same arguments that does nothing (dispatch and transfers); model ms: a compiled call "
        "of the model's per-frame factors, no derivatives; read MB: data arrays it reads; GB/s: "
        "numpy copy bandwidth in that process; x stream: eval time / time to stream n_pairs x 8 "
        "bytes at that bandwidth; least x: model ms / that time; peak MB: before the bandwidth "
        "test"
    )


if __name__ == "__main__":
    main()
