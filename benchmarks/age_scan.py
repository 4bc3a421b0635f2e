"""Age scan speed: windows of frames along the diagonal of a large two-time matrix.

Simulates ``--frames`` frames x ``--angles`` angles whose sample rate and velocity follow
``t^0.5`` (Gaussian noise), fits the whole matrix once (the law), then times
``hd.age_scan`` with ``--windows`` windows of ``--window`` frames spread evenly over the
matrix (each window is fitted twice: to the data and to the law's model):

- ``first scan``: in this process, compiling the window programs (read from the
  persistent cache when an earlier run wrote them);
- ``warm scan``: the same scan again (compiled programs in memory), the figure the issue
  asks for (under 30 s at 20 x 200 frames on 2000);
- ``one pass``: one evaluation of ``(J^T J, J^T r, r^T r)`` over every pair of the whole
  matrix (what each step of the whole fit costs), and one streaming read of its
  ``c2`` at this process's numpy copy bandwidth. The warm scan is printed as a multiple
  of both.

    .venv/bin/python benchmarks/age_scan.py [--frames 2000] [--angles 4] [--window 200]
        [--windows 20] [--executor processes]

The machine load (``os.getloadavg``) is printed before and after: other processes on the
same cores slow every time down.
"""

import argparse
import os
import time

import numpy as np
from performance import bandwidth, best_of


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--angles", type=int, default=4)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--executor", default=None)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    import heterodyne as hd
    from heterodyne.examples import AGEING_TRUTH as TRUTH

    phi = np.linspace(0.0, 180.0, args.angles, endpoint=False)
    ds = hd.simulate(TRUTH, n_frames=args.frames, dt=0.1, t_start=10.0, phi=phi, noise=0.02, seed=0)
    start = time.perf_counter()
    whole = hd.fit_nlsq(ds, hd.Parameters(**TRUTH), progress=False)
    whole_s = time.perf_counter() - start
    step = (args.frames - args.window) // (args.windows - 1)

    def scan():
        return hd.age_scan(
            ds, window=args.window, step=step, law=whole, executor=args.executor,
            progress=False,
        )  # fmt: skip

    start = time.perf_counter()
    out = scan()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    out = scan()
    warm_s = time.perf_counter() - start

    problem = hd.Objective.build(ds, whole.parameters(), fix=(), scaling="per_angle")
    x = problem.x0
    pass_s = best_of(lambda: problem.normal_equations(x), repeats=5)
    read_s = ds["c2"].nbytes / bandwidth()

    check = hd.ageing.law_check(out)
    statuses = dict(zip(*np.unique(out["verdict"].values, return_counts=True), strict=True))
    print(
        f"{args.frames} frames x {args.angles} angles; {out.sizes['age']} windows of "
        f"{args.window} frames every {step} (executor {args.executor})"
    )
    n = out.sizes["age"]
    rows = [
        ("whole fit (first, compiling)", whole_s, ""),
        ("first scan", first_s, ""),
        ("warm scan", warm_s, f"{warm_s / n:.2f} s a window"),
        ("one pass (J^T J, J^T r, r^T r)", pass_s, f"warm scan / one pass: {warm_s / pass_s:.0f}x"),
        ("one read of c2 (float64)", read_s, f"warm scan / read: {warm_s / read_s:.0f}x"),
    ]
    for label, seconds, note in rows:
        print(f"{label:<32}{seconds:9.3f} s   {note}")
    print(f"window verdicts: {statuses}")
    print(check.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
