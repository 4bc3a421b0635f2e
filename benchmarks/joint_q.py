"""Joint fits across q-bins (issue 22): the errors the bins allow, and the speed.

``--errors`` (default): speckle-level multi-q data (or, with ``--noise 0.01``, independent
Gaussian noise per pair) (``hd.simulate(q=[...],
noise="speckle")``: ``c2`` averaged over the pixels of each q-sector, pairs that share
frames correlated) with the truth varied from seed to seed (each of ``D0_ref``,
``D0_sample``, ``v0``, ``f0``, ``phi0`` drawn around the flow case of
``benchmarks/coverage.py``), fitted jointly with ``errors="speckle"`` (``--model``), which
ends with the bins' inverse-covariance combination
(:meth:`heterodyne.joint.JointObjective.combine`), and each q-bin alone
(``fit_nlsq(..., separate=True)``). For ``D0_sample`` and ``v0`` it prints,
over seeds:

- the expected error reduction: the best single bin's stderr over the joint stderr the
  bins allow, ``(sum_k C_k^-1)^-1/2`` from each bin's own covariance (its contrast and
  offset profiled out): the Fisher information of independent bins adds;
- the measured one: the best single bin's stderr over the joint fit's stderr, and the
  scatter of the best bin's relative errors over that of the joint fit's (the
  reduction the estimates show, independent of any stderr);
- the coverage of ``value -+ stderr`` (68 % for honest errors; binomial spread printed)
  and the rms of ``(value - truth) / stderr``, joint and best bin.

``--speed``: 10 q-bins x 4 angles x 500 frames (Gaussian noise), the joint fit warm
(best and median of ``--repeats``; without the per-bin fits, and with them), against one
pass over the data: one evaluation of the joint normal equations (the structured path
reads every pair once per evaluation) and one streaming read of the stored pairs.

    .venv/bin/python benchmarks/joint_q.py [--errors] [--seeds 20] [--frames 120]
                                           [--pixels 2000] [--bins 4] [--noise speckle]
                                           [--model speckle|nominal]
    .venv/bin/python benchmarks/joint_q.py --speed [--repeats 3]
"""

import argparse
import time
import warnings

import numpy as np

import heterodyne as hd
from heterodyne.joint import COMBINATION

FLOW = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
FIXED = (
    "alpha_ref", "alpha_sample", "beta", "f1", "f2", "f3",
    "D_offset_ref", "D_offset_sample", "v_offset",
)  # fmt: skip
PHI = [-45.0, 0.0, 45.0, 90.0]
SHOWN = ("D0_sample", "v0")


def parameters(start: dict) -> hd.Parameters:
    p = hd.Parameters({k: v for k, v in start.items()})
    for name in FIXED:
        p[name].vary = False
    return p


def varied_truth(rng) -> dict:
    """The flow case with each varied parameter drawn from a factor 0.7 to 1.4 of it
    (``phi0`` +-15 deg, ``f0`` 0.3 to 0.5)."""
    truth = {
        k: v * rng.uniform(0.7, 1.4) for k, v in FLOW.items() if k in ("D0_ref", "D0_sample", "v0")
    }
    truth.update(f0=rng.uniform(0.3, 0.5), phi0=FLOW["phi0"] + rng.uniform(-15, 15))
    return truth


def errors(args):
    q = np.linspace(0.006, 0.012, args.bins)
    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        truth = varied_truth(rng)
        if args.noise == "speckle":
            ds = hd.simulate(truth, q=q, phi=PHI, n_frames=args.frames, noise="speckle",
                             n_pixels=args.pixels, seed=seed)  # fmt: skip
        else:
            ds = hd.simulate(truth, q=q, phi=PHI, n_frames=args.frames,
                             noise=float(args.noise), seed=seed)  # fmt: skip
        start = {k: v * 1.3 for k, v in truth.items() if k != "phi0"}
        start["phi0"] = truth["phi0"] + 5.0
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = hd.fit_nlsq(ds, parameters(start), errors=args.model, progress=False)
        elapsed = time.perf_counter() - t0
        names = result.varied_physics
        n = len(names)
        inverses = [np.linalg.inv(r.covariance.values[:n, :n]) for r in result.separate]
        information = sum(inverses)
        combined_cov = np.linalg.inv(information)
        allowed = np.sqrt(np.diag(combined_cov))
        # the inverse-variance combination of the bins' own estimates
        combined = combined_cov @ sum(
            w @ np.array([r.value(m) for m in names])
            for w, r in zip(inverses, result.separate, strict=True)
        )
        row = {
            "seed": seed,
            "time": elapsed,
            "success": result.success,
            "combined": result.info["combination"] != COMBINATION[False],
        }
        for name in SHOWN:
            k = names.index(name)
            bin_errors = np.array([r.error(name) for r in result.separate])
            best = int(np.argmin(bin_errors))
            row[name] = {
                "truth": truth[name],
                "joint": result.value(name),
                "joint_se": result.error(name),
                "allowed_se": allowed[k],
                "combined": combined[k],
                "best": result.separate[best].value(name),
                "best_se": bin_errors[best],
                "best_q": q[best],
            }
        rows.append(row)
        print(f"seed {seed:3d}: {elapsed:6.1f} s, success {result.success}, "
              f"{result.info['combination']}, "
              + ", ".join(f"{s} joint {row[s]['joint']:.5g} ± {row[s]['joint_se']:.3g} "
                          f"(truth {row[s]['truth']:.5g}; best bin ± {row[s]['best_se']:.3g})"
                          for s in SHOWN), flush=True)  # fmt: skip
    n_seeds = len(rows)
    spread = np.sqrt(0.68 * 0.32 / n_seeds)
    kind = (
        f"speckle ({args.pixels} pixels)"
        if args.noise == "speckle"
        else (f"independent Gaussian noise {args.noise}")
    )
    used = sum(r["combined"] for r in rows)
    print(f"\n{n_seeds} seeds, {args.bins} q-bins q = {q.min():g} .. {q.max():g} 1/Å x "
          f"{len(PHI)} angles x {args.frames} frames, {kind}, errors={args.model!r}; the joint "
          f"fit combined the bins by inverse covariance in {used} of {n_seeds} seeds (else "
          f"by weighted least squares)")  # fmt: skip
    print(f"{'':10}{'expected':>10}{'measured':>10}{'scatter':>9}"
          f"{'coverage':>10}{'rms z':>8}{'best bin cov.':>15}{'rms z':>8}")  # fmt: skip
    combined_rows = []
    for name in SHOWN:
        d = {k: np.array([r[name][k] for r in rows]) for k in rows[0][name]}
        expected = np.median(d["best_se"] / d["allowed_se"])
        measured = np.median(d["best_se"] / d["joint_se"])
        scatter = np.std((d["best"] - d["truth"]) / d["truth"]) / np.std(
            (d["joint"] - d["truth"]) / d["truth"]
        )
        z = (d["joint"] - d["truth"]) / d["joint_se"]
        zb = (d["best"] - d["truth"]) / d["best_se"]
        zc = (d["combined"] - d["truth"]) / d["allowed_se"]
        combined_rows.append(
            f"{name:<10}{np.mean(np.abs(zc) < 1):>10.2f}{np.sqrt(np.mean(zc**2)):>8.2f}"
        )
        print(f"{name:<10}{expected:>10.2f}{measured:>10.2f}{scatter:>9.2f}"
              f"{np.mean(np.abs(z) < 1):>10.2f}{np.sqrt(np.mean(z**2)):>8.2f}"
              f"{np.mean(np.abs(zb) < 1):>15.2f}{np.sqrt(np.mean(zb**2)):>8.2f}")  # fmt: skip
    print(
        "the bins' own estimates combined by their inverse covariances, "
        "(sum_k C_k^-1)^-1 sum_k C_k^-1 theta_k, against its stderr:"
    )
    print(f"{'':10}{'coverage':>10}{'rms z':>8}")
    print("\n".join(combined_rows))
    print(f"expected: median over seeds of the best bin's stderr / (sum_k C_k^-1)^-1/2; "
          f"measured: best bin's stderr / the joint stderr; scatter: std of the best bin's "
          f"relative errors / the joint fit's; coverage: fraction within -+1 stderr "
          f"(0.68 -+ {spread:.2f} for honest errors); median fit time "
          f"{np.median([r['time'] for r in rows]):.1f} s (joint and the per-bin fits)")  # fmt: skip


def speed(args):
    from heterodyne.joint import JointObjective

    q = np.linspace(0.004, 0.013, 10)
    ds = hd.simulate(FLOW, q=q, phi=PHI, n_frames=500, noise=0.01, seed=1)
    p = parameters({k: 1.3 * v for k, v in FLOW.items()})
    timings = {}
    for separate in (False, True):
        hd.fit_nlsq(ds, p, progress=False, separate=separate)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = hd.fit_nlsq(ds, p, progress=False, separate=separate)
            runs.append(time.perf_counter() - t0)
        timings[separate] = runs
    problem = JointObjective.build(ds, p)
    x = problem.x0
    problem.normal_equations(x)
    evaluations = []
    for _ in range(10):
        t0 = time.perf_counter()
        problem.normal_equations(x)
        evaluations.append(time.perf_counter() - t0)
    one_pass = min(evaluations)
    stored = [b.blocks for b in problem.bins]
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        for blocks in stored:
            sum(
                float(np.sum(np.asarray(v), dtype=np.float64))
                for v in (blocks.diagonal, blocks.tiles)
            )
        reads.append(time.perf_counter() - t0)
    read = min(reads)
    fit = timings[False]
    print(f"joint fit, 10 q-bins x {len(PHI)} angles x 500 frames "
          f"({result.info['n_pairs']} pairs, {result.info['n_varied']} varied, "
          f"{result.info['nfev']} evaluations), warm:")  # fmt: skip
    print(f"  joint fit           best {min(fit):6.2f} s, median {np.median(fit):6.2f} s "
          f"(target < 5 s)")  # fmt: skip
    print(f"  with per-bin fits   best {min(timings[True]):6.2f} s, median "
          f"{np.median(timings[True]):6.2f} s")  # fmt: skip
    print(f"  one pass over the data (one evaluation of the joint normal equations) "
          f"{one_pass * 1e3:.1f} ms: fit / pass = {min(fit) / one_pass:.0f}")  # fmt: skip
    print(f"  one streaming read of the stored pairs {read * 1e3:.1f} ms: fit / read = "
          f"{min(fit) / read:.0f}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--errors", action="store_true")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--pixels", type=int, default=2000)
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--noise", default="speckle", help="'speckle' or a Gaussian level")
    parser.add_argument("--model", default="speckle", help="fit_nlsq's errors= (error model)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.speed:
        speed(args)
    if args.errors or not args.speed:
        errors(args)


if __name__ == "__main__":
    main()
