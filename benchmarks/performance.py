"""NLSQ performance: cold, cache-warm and warm fits, peak memory, and an evaluation
against the floors of any evaluation.

For each configuration (frames x angles, and path):

- ``cold``: a fresh process with an empty compilation cache: ``import heterodyne``, the
  libraries a fit needs (JAX, SciPy, xarray), then the first ``hd.fit_nlsq(ds)``, with
  its defaults as a user calls it (starts read off the data; it compiles everything);
- ``cache``: a fresh process reading the cache the cold one wrote: the same two times
  (what a user sees in a new notebook, a command-line run or a survey worker);
- ``warm``: the second fit in that process (compiled programs in memory).

``--repeats R`` runs R cold and R cache-warm processes and prints the medians. The data
are simulated once per configuration, in a process of their own, and written to a
netCDF file (``sim MB``: that process's peak); each fitting process reads the file with
``hd.load``, so its peak resident memory (sampled every millisecond during the fits) is
the fit's own, with the Dataset and the libraries, against the stored matrices ``c2``
(float64, ``n_phi x N x N``). For the fast path it also prints the time of one evaluation of
``(J^T J, J^T r, r^T r)`` against two floors: one streaming read of the data the
evaluation reads at the memory bandwidth measured in the same process (a numpy copy of
256 MB), and a compiled call of the model's per-frame factors without derivatives
(``O(N)``: what any evaluation computes first). ``x floor`` is the evaluation against the
larger of the two.

    .venv/bin/python benchmarks/performance.py [--frames 150 1000 2000 5000]
        [--angles 3 4 4 2] [--path fast plain] [--repeats 5] [--padding]

``--padding`` prices the size classes (:mod:`heterodyne.shapes`) instead: for each size,
the warm fit and one evaluation with the frames padded to their class and without, and
the first fit of a new window one frame shorter (the same class: no compilation) against
the same without padding (a new size: compiled); then the same for the angles: the warm
fit and one evaluation with the angles padded to their class and without, and the first
fit of all angles but the last (where that count has the same class) with and without.

``--frames`` and ``--angles`` are paired (one configuration each). The machine load
(``os.getloadavg``) is printed before and after: other processes on the same cores slow
every time down (memory figures do not change).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
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


def best_of(call, repeats: int = 10) -> float:
    """The shortest of ``repeats`` wall times [s] of ``call()``, after one call to warm up."""
    call()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def resident() -> float:
    """The resident memory of this process now [MB] (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class Peak:
    """The largest resident memory [MB] sampled every millisecond inside ``with``."""

    def __enter__(self):
        self.peak, self._done = resident(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, resident())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident())


def make(n_frames: int, n_angles: int, file: str) -> dict:
    """Simulate the data of a configuration and write them to ``file`` (netCDF); the peak
    resident memory of doing so."""
    import heterodyne as hd

    ds = hd.simulate(TRUTH, n_frames=n_frames, phi=angles(n_angles), noise=0.01, seed=0)
    hd.to_netcdf(ds, file)
    return {"simulate_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def angles(n_angles: int):
    return np.linspace(-60, 60, n_angles) if n_angles > 1 else [0.0]


def one(
    n_frames: int,
    n_angles: int,
    path: str,
    measure: bool,
    padded: str = "all",
    window=False,
    file=None,
) -> dict:
    """One fresh process: import, first fit, and with ``measure`` the warm fit and the
    evaluation's figures, with ``window`` the first fit of a window one frame shorter and
    then of all angles but the last; ``padded="frames"`` turns the angle classes off
    (every angle count its own class), ``"angles"`` the frame classes, to price the
    padding. The data are read from ``file`` (:func:`make`), else simulated here."""
    start = time.perf_counter()
    import heterodyne as hd

    imported = time.perf_counter() - start
    # what the first calls load (JAX, SciPy, xarray, h5netcdf), as a user meets them,
    # timed apart from the fit
    hd.load, hd.simulate, hd.fit_nlsq, hd.Parameters  # noqa: B018
    libraries = time.perf_counter() - start - imported
    from heterodyne import structured

    if padded != "all":
        from heterodyne import shapes

        if padded == "frames":
            shapes.angle_class = int
        else:
            shapes.size_class = int
    if path == "plain":
        # the switch of this benchmark: the fast path's rule says "does not apply"
        structured.blocks = lambda pairs, block=None, dtype=None: None
    if file is None:
        ds = hd.simulate(TRUTH, n_frames=n_frames, phi=angles(n_angles), noise=0.01, seed=0)
    else:
        ds = hd.load(file)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with Peak() as first:
        hd.fit_nlsq(ds, progress=False)  # as a user calls it: starts read off the data
    t1 = time.perf_counter()
    out = {"import_s": imported, "libs_s": libraries, "first_s": t1 - t0}
    if not measure:
        return out
    before = resident()
    with Peak() as peak:
        warm = hd.fit_nlsq(ds, progress=False)
    out["warm_s"] = time.perf_counter() - t1
    out["peak_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(loaded_MB=loaded, fit_MB=max(first.peak, peak.peak), before_MB=before)
    out.update(
        data_MB=ds["c2"].nbytes / 1e6,
        pairs=warm.info["n_pairs"],
        nfev=warm.nfev,
        v0=warm.value("v0"),
    )
    if path == "fast":
        out.update(evaluation(hd, structured, ds))
    if window:
        # a new window one frame shorter: the same size class unless sizes are unpadded
        t2 = time.perf_counter()
        hd.fit_nlsq(hd.select(ds, frames=slice(1, n_frames)), progress=False)
        out["window_s"] = time.perf_counter() - t2
        if n_angles > 1:
            subset = hd.select(ds, phi=list(ds["phi"].values[:-1]))
            t3 = time.perf_counter()
            hd.fit_nlsq(subset, progress=False)
            out["subset_s"] = time.perf_counter() - t3
    return out


def evaluation(hd, structured, ds) -> dict:
    import jax

    from heterodyne.parameters import PHYSICS_NAMES

    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()})
    problem = hd.Objective.build(ds, guess, fix=(), scaling="per_angle")
    x = problem.x0
    data = problem.blocks
    factors = jax.jit(structured.frame_factors)
    physics = jax.numpy.asarray(problem.physics(x)[: len(PHYSICS_NAMES)])
    return {
        "eval_s": best_of(lambda: problem.normal_equations(x)),
        "model_s": best_of(
            lambda: [np.asarray(v) for v in factors(physics, data.t, data.phi, data.q)]
        ),
        "read_MB": (data.diagonal.nbytes + data.tiles.nbytes) / 1e6,
        "bandwidth": bandwidth(),
    }


def run(args: list[str], cache: str, flag: str = "--one") -> dict:
    env = {**os.environ, "HETERODYNE_CACHE": cache}
    out = subprocess.run(
        [sys.executable, __file__, flag, *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[150, 1000, 2000, 5000])
    parser.add_argument("--angles", type=int, nargs="+", default=[3, 4, 4, 2])
    parser.add_argument("--path", nargs="+", choices=PATHS, default=["fast"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="only the measuring process (its first fit with an empty cache is then the "
        "cold one): for sizes where each fit takes minutes",
    )
    parser.add_argument(
        "--padding",
        action="store_true",
        help="price the size classes: each size with and without padding (warm fit, "
        "evaluation) and the compilation a new window of the same class saves",
    )
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        n, a, file = args.make
        print(json.dumps(make(int(n), int(a), file)))
        return
    if args.one:
        n, a, path, measure, padded, *file = args.one
        level = int(measure)
        found = one(int(n), int(a), path, level > 0, padded, level > 1, *file)
        print(json.dumps(found))
        return
    if args.padding:
        padding(args.frames, args.angles)
        return
    if len(args.angles) != len(args.frames):
        parser.error("--angles needs one value per --frames value")
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        f"{'frames':>6} {'angles':>6} {'path':>5} {'import':>6} {'libs':>5} {'cold s':>7} "
        f"{'libs':>5} {'cache s':>7} {'warm s':>7} {'nfev':>4} {'peak MB':>8} "
        f"{'sim MB':>7} {'load MB':>7} {'fit MB':>7} {'data MB':>8} {'x data':>6} {'eval ms':>8} "
        f"{'model ms':>8} {'stream ms':>9} "
        f"{'x floor':>7} {'v0':>9}"
    )
    for n, a in zip(args.frames, args.angles, strict=True):
        for path in args.path:
            cold, cached = [], []
            with tempfile.TemporaryDirectory() as folder:
                file = os.path.join(folder, "data.nc")
                made = run([str(n), str(a), file], os.path.join(folder, "cache"), "--make")
                for k in range(args.repeats):
                    cache = os.path.join(folder, f"cache{k}")
                    config = [str(n), str(a), path]
                    if not args.one_process:
                        cold.append(run([*config, "0", "all", file], cache))
                    cached.append(run([*config, "1", "all", file], cache))
            cold = cold or cached

            def median(runs, key):
                return statistics.median(r[key] for r in runs)

            r = cached[-1]
            line = (
                f"{n:>6} {a:>6} {path:>5} {median(cold, 'import_s'):>6.2f} "
                f"{median(cold, 'libs_s'):>5.2f} {median(cold, 'first_s'):>7.2f} "
                f"{median(cached, 'libs_s'):>5.2f} {median(cached, 'first_s'):>7.2f} "
                f"{median(cached, 'warm_s'):>7.2f} "
                f"{r['nfev']:>4} {median(cached, 'peak_MB'):>8.0f} "
                f"{made['simulate_MB']:>7.0f} {median(cached, 'loaded_MB'):>7.0f} "
                f"{median(cached, 'fit_MB'):>7.0f} "
                f"{r['data_MB']:>8.0f} {median(cached, 'fit_MB') / r['data_MB']:>6.1f}"
            )
            if "eval_s" in r:
                stream = r["read_MB"] * 1e6 / r["bandwidth"]
                floor = max(stream, r["model_s"])
                line += (
                    f" {r['eval_s'] * 1e3:>8.2f} {r['model_s'] * 1e3:>8.3f} "
                    f"{stream * 1e3:>9.3f} {r['eval_s'] / floor:>7.1f}"
                )
            else:
                line += f" {'':>8} {'':>8} {'':>9} {'':>7}"
            print(line + f" {r['v0']:>9.3f}", flush=True)
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        "import: `import heterodyne` in a fresh process; libs: then what hd.load, hd.simulate "
        "and hd.fit_nlsq load (JAX, SciPy, xarray, h5netcdf); "
        "cold s: its first fit_nlsq with an empty compilation cache; "
        "cache s: the same in a fresh process reading that cache; "
        "warm s: the second fit in that process; peak MB: its peak resident memory (hd.load "
        "included); sim MB: the peak of hd.simulate and writing the file, in a process of "
        "its own; load MB: the peak after hd.load, before the fits; fit MB: the peak "
        "resident memory during either fit (sampled every ms; libraries, compiled code and "
        "the Dataset read by hd.load included); data MB: the c2 matrices in float64; "
        "x data: fit MB / data MB; eval ms: "
        "one evaluation of (J^T J, J^T r, r^T r); model ms: a compiled call of the model's "
        "per-frame factors, no derivatives; stream ms: one read of the data the evaluation "
        "reads at this process's numpy copy bandwidth; x floor: eval / the larger of the "
        "two floors. Times are medians over --repeats fresh processes."
    )


def padding(frames: list[int], angles: list[int]):
    """Each size with its size classes and without (frames, then angles: each count its
    own class), in fresh processes with a cold cache each: the warm fit and one
    evaluation, padded and not, and the first fit of a new window of the same frame class
    and of an angle subset of the same angle class (compiled programs reused) against
    the same without classes (a new size: compiled afresh)."""
    from heterodyne import shapes

    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    runs = {}
    for n, a in zip(frames, angles, strict=True):
        for padded in ("all", "angles", "frames"):
            with tempfile.TemporaryDirectory() as cache:
                runs[n, a, padded] = run([str(n), str(a), "fast", "2", padded], cache)
    # (the size, the setting without its classes, its rule, the first fit it saves)
    tables = (
        ("frames", "angles", shapes.size_class, "window_s", "new window s", "new size s"),
        ("angles", "frames", shapes.angle_class, "subset_s", "subset s", "new count s"),
    )
    for kind, unpadded, size_class, first, same_label, new_label in tables:
        print(
            f"\n{'frames':>6} {'angles':>6} {kind + ' class':>13} {'pad %':>5} {'warm s':>7} "
            f"{'unpadded':>8} {'eval ms':>8} {'unpadded':>8} {same_label:>12} {new_label:>11}"
        )
        for n, a in zip(frames, angles, strict=True):
            padded, plain = runs[n, a, "all"], runs[n, a, unpadded]
            count = n if kind == "frames" else a
            size = size_class(count)
            # all frames (angles) but the last share the class unless that count is one
            same = count > 1 and size_class(count - 1) == size
            print(
                f"{n:>6} {a:>6} {size:>13} {100 * (size - count) / count:>5.1f} "
                f"{padded['warm_s']:>7.2f} {plain['warm_s']:>8.2f} "
                f"{padded['eval_s'] * 1e3:>8.2f} {plain['eval_s'] * 1e3:>8.2f} "
                + (f"{padded[first]:>12.2f} {plain[first]:>11.2f}" if same else ""),
                flush=True,
            )
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        "warm s: the second fit of one process; eval ms: one evaluation of the normal "
        "equations; unpadded: the same with every size (frames, then angles) its own "
        "class; new window s: then the first fit of frames 1 to N (one fewer: the same "
        "class, compiled); new size s: the same without frame classes (a new size: "
        "compiled afresh, the cache cold for it); subset s: the first fit of all angles "
        "but the last (the same class); new count s: the same without angle classes."
    )


if __name__ == "__main__":
    main()
