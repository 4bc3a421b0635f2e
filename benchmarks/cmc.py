"""CMC speed and memory: wall time, ESS per second and peak memory, sequential vs processes,
and the whole-row likelihood against the pairwise reference path (ESS/s ratio).

Each configuration runs in a fresh process, so the wall time includes JIT compilation (in
every worker process with ``executor="processes"``) and the peak resident memory is that
configuration's own: the largest of the main process and its worker processes. The NLSQ
warm start is fitted first and not timed. ESS is the smallest bulk ESS over the
parameters of the combined posterior.

    .venv/bin/python benchmarks/cmc.py [--frames 200 500] [--angles 1 4]
        [--executors sequential processes] [--likelihoods rows pairs] [--shards auto]
        [--warmup 200] [--samples 300]

Issue 8's comparison: ``--frames 500 --angles 4 --executors sequential``. Besides the
whole run, it times one shard's log density and gradient (``grad ms``), the cost NUTS
pays per leapfrog step. Whole runs of the two paths take minutes each, one after the
other, and a machine shared with other work slows them unequally; so the script also
samples the same shard with both paths in one process, compiled, alternating ``--repeats``
times, and prints the ESS per second of each and their ratio (all shards cost the same,
so this is the ratio of whole runs less their compile time).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
NOT_IN_TRUTH = ("alpha_ref", "alpha_sample", "beta", "f1")


def gradient_ms(plan) -> float:
    """Milliseconds per log density + gradient of the first shard (compiled, warm)."""
    import jax
    import jax.numpy as jnp

    from heterodyne import sampler

    job = plan.jobs()[0]
    data = type(job.data)(*(jnp.asarray(a) for a in job.data))
    potential = sampler.potential(data, job.space.as_jax(), n_scale=job.n_scale, n_free=job.n_free)
    step = jax.jit(jax.value_and_grad(potential))
    w = {"w": jnp.zeros(job.space.u0.shape)}
    jax.block_until_ready(step(w))
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        out = step(w)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - start) / repeats


def shard_comparison(n_frames, n_angles, shards, warmup, samples, repeats) -> dict:
    """ESS per second of shard 0 sampled by each likelihood path, warm, alternating."""
    import numpy as np
    import xarray as xr

    from heterodyne import cmc, diagnostics, sampler

    ds, init = problem(n_frames, n_angles)
    shards = shards if shards == "auto" else int(shards)
    jobs = {
        path: cmc.prepare(
            ds, init, shards=shards, warmup=warmup, samples=samples, likelihood=path
        ).jobs()[0]
        for path in ("rows", "pairs")
    }
    for job in jobs.values():
        sampler.run_shard(job)  # compile
    seconds, ess, steps = {p: [] for p in jobs}, {p: [] for p in jobs}, {p: [] for p in jobs}
    for _ in range(repeats):
        for path, job in jobs.items():
            start = time.perf_counter()
            out = sampler.run_shard(job)
            seconds[path].append(time.perf_counter() - start)
            w = out["w"]
            draws = xr.Dataset(
                {f"w{k}": (("chain", "draw"), w[..., k]) for k in range(w.shape[-1])}
            )
            found = diagnostics.ess(draws)
            ess[path].append(min(float(found[v]) for v in found.data_vars))
            steps[path].append(float(out["n_steps"].mean()))
    return {
        path: {
            "seconds": float(np.median(seconds[path])),
            "min_ess": float(np.median(ess[path])),
            "ess_per_s": float(np.median(np.array(ess[path]) / np.array(seconds[path]))),
            "leapfrogs": float(np.mean(steps[path])),
        }
        for path in jobs
    }


def problem(n_frames, n_angles):
    """The benchmark's simulated data and its NLSQ warm start."""
    import numpy as np

    import heterodyne as hd

    phi = np.linspace(-60, 60, n_angles) if n_angles > 1 else [0.0]
    ds = hd.simulate(TRUTH, n_frames=n_frames, phi=phi, noise=0.02, seed=0)
    # One angle sees only v0 cos(phi - phi0): phi0 is then not identifiable, and a sampler
    # would spend its time on that ridge.
    fixed = NOT_IN_TRUTH + (("phi0",) if n_angles == 1 else ())
    return ds, hd.fit_nlsq(ds, hd.Parameters(TRUTH).fix(*fixed), progress=False)


def one(n_frames, n_angles, executor, likelihood, shards, warmup, samples):

    import heterodyne as hd
    from heterodyne import cmc, diagnostics

    ds, init = problem(n_frames, n_angles)
    shards = shards if shards == "auto" else int(shards)
    grad = gradient_ms(cmc.prepare(ds, init, shards=shards, likelihood=likelihood))
    start = time.perf_counter()
    result = hd.fit_cmc(
        ds,
        init,
        shards=shards,
        warmup=warmup,
        samples=samples,
        executor=None if executor == "sequential" else executor,
        likelihood=likelihood,
        progress=False,
    )
    wall = time.perf_counter() - start
    ess = diagnostics.ess(result.posterior.posterior)
    min_ess = min(float(ess[name].min()) for name in ess.data_vars)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return {
        "frames": n_frames,
        "angles": n_angles,
        "executor": executor,
        "likelihood": likelihood,
        "grad_ms": grad,
        "pairs": result.info["n_pairs"],
        "shards": result.info["shards"],
        "wall_s": wall,
        "min_ess": min_ess,
        "ess_per_s": min_ess / wall,
        "converged": result.converged,
        "peak_MB": peak / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--angles", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--executors", nargs="+", default=["sequential", "processes"])
    parser.add_argument("--likelihoods", nargs="+", default=["rows", "pairs"])
    parser.add_argument("--shards", default="auto")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="of the one-shard comparison")
    parser.add_argument("--skip-runs", action="store_true", help="only the one-shard comparison")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        frames, angles, executor, likelihood = args.one
        outcome = one(
            int(frames), int(angles), executor, likelihood, args.shards, args.warmup, args.samples
        )
        print(json.dumps(outcome))
        return
    print(f"warmup {args.warmup}, samples {args.samples}, 2 chains per shard, shards {args.shards}")
    if {"rows", "pairs"} <= set(args.likelihoods):
        print("one shard, both paths in one process, warm, median of --repeats runs:")
        for n in args.frames:
            for a in args.angles:
                found = shard_comparison(n, a, args.shards, args.warmup, args.samples, args.repeats)
                for path, r in found.items():
                    print(
                        f"    N={n} angles={a} {path:>5}: {r['seconds']:6.1f} s, min ESS "
                        f"{r['min_ess']:5.0f}, ESS/s {r['ess_per_s']:7.1f}, leapfrogs/draw "
                        f"{r['leapfrogs']:.1f}"
                    )
                ratio = found["rows"]["ess_per_s"] / found["pairs"]["ess_per_s"]
                print(f"    ESS/s rows / pairs: {ratio:.2f}", flush=True)
    if args.skip_runs:
        return
    print(
        f"{'frames':>6} {'angles':>6} {'pairs':>8} {'shards':>6} {'executor':>10} "
        f"{'path':>6} {'grad ms':>8} {'wall s':>8} {'min ESS':>8} {'ESS/s':>7} {'conv.':>5} "
        f"{'peak MB':>8}"
    )
    for n in args.frames:
        for a in args.angles:
            for executor in args.executors:
                ess_per_s = {}
                for likelihood in args.likelihoods:
                    r = run_one(n, a, executor, likelihood, args)
                    ess_per_s[likelihood] = r["ess_per_s"]
                    print(
                        f"{r['frames']:>6} {r['angles']:>6} {r['pairs']:>8} {r['shards']:>6} "
                        f"{r['executor']:>10} {likelihood:>6} {r['grad_ms']:>8.2f} "
                        f"{r['wall_s']:>8.1f} {r['min_ess']:>8.0f} {r['ess_per_s']:>7.2f} "
                        f"{'yes' if r['converged'] else 'no':>5} {r['peak_MB']:>8.0f}",
                        flush=True,
                    )
                if {"rows", "pairs"} <= set(ess_per_s):
                    print(f"    ESS/s rows / pairs: {ess_per_s['rows'] / ess_per_s['pairs']:.2f}")


def run_one(n, a, executor, likelihood, args) -> dict:
    """One configuration in a fresh process (its own compile and peak memory)."""
    command = [sys.executable, __file__, "--one", str(n), str(a), executor, likelihood]
    command += ["--shards", args.shards, "--warmup", str(args.warmup)]
    command += ["--samples", str(args.samples)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
