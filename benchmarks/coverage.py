"""Coverage of NLSQ standard errors and CMC intervals on speckle-level two-time data (issues 9, 20).

Speckle simulations (``hd.simulate(noise="speckle")``: ``c2`` averaged over the pixels of
each q-sector, so pairs that share frames have correlated errors; with ``--counts`` the
intensities are Poisson photon counts at that mean per pixel and frame) at q = 0.01 1/Å,
dt = 0.1 s, phi = -45, 0, 45, 90, contrast 0.5, fitted from a start 30 % off. Cases
(``--case``):

- ``flow``: ``D0_ref = 3e3, D0_sample = 2e4, v0 = 800, f0 = 0.4, phi0 = 20``, constant
  rates (``alpha_ref``, ``alpha_sample``, ``beta``, ``f1`` fixed at their true 0);
- ``powerlaw``: the same with a velocity ``v0 t**beta``, ``v0 = 300, beta = 0.8``
  (``beta`` varied);
- ``weakref``: the flow case with a reference 300 times slower, ``D0_ref = 10``: it
  decorrelates by 1.5 % over the window, so ``D0_ref`` is weakly determined (about
  2 stderr from 0).

For each seed the fit is done once with ``errors="speckle"``, which keeps the nominal
errors alongside.

With ``--cmc`` each seed's NLSQ fit also starts a CMC run (``fit_cmc(ds, fit)``, which
takes ``errors="speckle"`` from the fit) and the 68 % central posterior interval (16th to
84th percentile of the draws) is checked against the truth, with the speckle correction
(``posterior``) and without it (``uncorrected_posterior``, the same run's draws before
the correction).

Prints, per quantity, the scatter of the fitted values over seeds, the mean of each kind
of stderr, their ratio, the fraction of fits whose ``value -+ stderr`` covers the truth
(68 % for honest Gaussian errors; the binomial spread over the seeds is printed) and the
rms of ``(value - truth) / stderr``, and the time the speckle errors add to a fit.

    .venv/bin/python benchmarks/coverage.py [--case flow] [--seeds 40] [--first-seed 0]
                                            [--frames 150] [--pixels 2000] [--counts C]
                                            [--cmc] [--warmup 300] [--samples 500]
                                            [--save F.npz]
    .venv/bin/python benchmarks/coverage.py --load A.npz B.npz ...
    .venv/bin/python benchmarks/coverage.py --table A.npz B.npz ...

``--save`` keeps each seed's outcome; ``--load`` prints the tables of several saved runs
together (seed ranges run in parallel processes, say), refusing runs whose settings or
seeds overlap; ``--table`` prints one summary line per saved run (the README's table).
"""

import argparse
import json
import time
import warnings

import numpy as np

import heterodyne as hd

FLOW = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
#: truth and fixed parameters of each case
CASES = {
    "flow": (FLOW, ("alpha_ref", "alpha_sample", "beta", "f1")),
    "powerlaw": ({**FLOW, "v0": 300.0, "beta": 0.8}, ("alpha_ref", "alpha_sample", "f1")),
    "weakref": ({**FLOW, "D0_ref": 10.0}, ("alpha_ref", "alpha_sample", "beta", "f1")),
}
PHI = [-45.0, 0.0, 45.0, 90.0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="flow")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--pixels", type=int, default=2000)
    parser.add_argument("--counts", type=float, default=None, help="mean photons per pixel")
    parser.add_argument("--cmc", action="store_true", help="also CMC intervals")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--save", help="write each seed's outcome to this .npz file")
    parser.add_argument("--load", nargs="+", help="print the tables of saved runs")
    parser.add_argument(
        "--table", nargs="+", help="one summary line per saved run (a+b.npz: runs joined)"
    )
    args = parser.parse_args()
    if args.table:
        summary([combine(f.split("+")) for f in args.table])
        return
    outcome = combine(args.load) if args.load else run(args)
    if args.save:
        np.savez(args.save, **outcome)
    report(outcome)


def run(args) -> dict:
    """Fit each seed's speckle simulation; the outcome arrays are indexed by seed first."""
    settings = {k: getattr(args, k) for k in ("case", "frames", "pixels", "counts", "cmc")}
    if args.cmc:
        settings.update(warmup=args.warmup, samples=args.samples)
    truth, fixed = CASES[args.case]
    guess = hd.Parameters({k: 1.3 * v for k, v in truth.items()}).fix(*fixed)
    names = list(truth)
    values, speckle, nominal, seconds = [], [], [], []
    intervals = {"posterior": [], "uncorrected_posterior": []}
    cmc_seconds, converged, dominated, logged, reflected = [], [], [], [], []
    seeds = np.arange(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        ds = hd.simulate(
            truth,
            n_frames=args.frames,
            phi=PHI,
            noise="speckle",
            n_pixels=args.pixels,
            counts=args.counts,
            seed=int(seed),
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
                    ds,
                    result,
                    warmup=args.warmup,
                    samples=args.samples,
                    seed=int(seed),
                    progress=False,
                )
            cmc_seconds.append(time.perf_counter() - start)
            converged.append(cmc.converged)
            if not cmc.converged:
                print(f"seed {seed}: not converged: {cmc.failures()}", flush=True)
            flagged = cmc.prior_dominated()
            dominated.append([n in flagged for n in names])
            space = dict(zip(cmc.prior["name"].values, cmc.prior["space"].values, strict=True))
            logged.append([str(space.get(n, "")) == "log" for n in names])
            reflected.append([str(space.get(n, "")) == "reflected" for n in names])
            for group, found in intervals.items():
                draws = cmc.posterior[group]
                found.append(
                    [draws[n].quantile([0.16, 0.84], dim=("chain", "draw")).values for n in names]
                )
    start = time.perf_counter()
    hd.fit_nlsq(ds, guess, progress=False)
    outcome = {
        "settings": np.array(json.dumps(settings)),
        "seed": seeds,
        "value": np.asarray(values),
        "speckle": np.asarray(speckle),
        "nominal": np.asarray(nominal),
        "seconds": np.asarray(seconds),
        "plain_seconds": np.array([time.perf_counter() - start]),
    }
    if args.cmc:
        outcome.update(
            cmc_seconds=np.asarray(cmc_seconds),
            converged=np.asarray(converged),
            prior_dominated=np.asarray(dominated),
            log_space=np.asarray(logged),
            reflected=np.asarray(reflected),
            **{group: np.asarray(found) for group, found in intervals.items()},
        )
    return outcome


def combine(files) -> dict:
    """The saved outcomes of several runs with the same settings, seeds in order."""
    parts = [dict(np.load(f)) for f in files]
    if len({str(p["settings"]) for p in parts}) > 1:
        raise SystemExit("these runs have different settings: " + ", ".join(files))
    seeds = np.concatenate([p["seed"] for p in parts])
    if np.unique(seeds).size < seeds.size:
        raise SystemExit("these runs share seeds: " + ", ".join(files))
    order = np.argsort(seeds)
    joined = {"settings": parts[0]["settings"]}
    for key in parts[0]:
        if key != "settings":
            stacked = np.concatenate([p[key] for p in parts])
            joined[key] = stacked if key == "plain_seconds" else stacked[order]
    return joined


def case_truth(settings: dict) -> dict:
    """The true values of a saved run's case (runs saved before cases were ``flow``)."""
    return CASES[settings.get("case", "flow")][0]


def report(outcome: dict) -> None:
    settings = json.loads(str(outcome["settings"]))
    names = list(case_truth(settings))
    truth = np.array(list(case_truth(settings).values()))
    values, speckle, nominal = outcome["value"], outcome["speckle"], outcome["nominal"]
    seeds = outcome["seed"]
    spread = 100 * np.sqrt(0.68 * 0.32 / seeds.size)
    print(
        f"case {settings.get('case', 'flow')}: "
        f"{seeds.size} seeds ({seeds.min()} to {seeds.max()}), N = {settings['frames']}, "
        f"{len(PHI)} angles, {settings['pixels']} pixels, counts {settings['counts']}; "
        f"coverage of truth by value -+ stderr (68 % expected, +- {spread:.0f} % over the seeds)"
    )
    print(
        f"{'quantity':<11}{'truth':>9}{'mean fit':>11}{'scatter':>10}{'nominal':>10}"
        f"{'speckle':>10}{'spk/scat':>10}{'cover nom':>11}{'cover spk':>11}{'rms z nom':>11}"
        f"{'rms z spk':>11}"
    )
    for k, name in enumerate(names):
        error = values[:, k] - truth[k]
        z_nominal, z_speckle = error / nominal[:, k], error / speckle[:, k]
        print(
            f"{name:<11}{truth[k]:>9.4g}{values[:, k].mean():>11.5g}"
            f"{values[:, k].std(ddof=1):>10.3g}{nominal[:, k].mean():>10.3g}"
            f"{speckle[:, k].mean():>10.3g}"
            f"{speckle[:, k].mean() / values[:, k].std(ddof=1):>10.2f}"
            f"{100 * np.mean(np.abs(z_nominal) < 1):>10.0f}%"
            f"{100 * np.mean(np.abs(z_speckle) < 1):>10.0f}%"
            f"{np.sqrt(np.mean(z_nominal**2)):>11.2f}{np.sqrt(np.mean(z_speckle**2)):>11.2f}"
        )
    print(
        f"fit with errors='speckle': median {np.median(outcome['seconds']):.2f} s; "
        f"errors='nominal' (one fit): {np.median(outcome['plain_seconds']):.2f} s"
    )
    if not settings["cmc"]:
        return
    print(
        f"\nCMC ({settings['warmup']} warmup + {settings['samples']} draws x 2 chains per "
        "shard): coverage of truth by the 68 % central posterior interval; "
        f"{np.sum(~outcome['converged'])} of {seeds.size} runs flagged not converged; median "
        f"{np.median(outcome['cmc_seconds']):.1f} s per run"
    )
    # runs saved before these were recorded
    dominated = outcome.get("prior_dominated", np.zeros(values.shape, dtype=bool))
    logged = outcome.get("log_space", np.zeros(values.shape, dtype=bool))
    reflected = outcome.get("reflected", np.zeros(values.shape, dtype=bool))
    print(
        f"{'quantity':<11}{'corrected':>11}{'uncorrected':>13}{'converged':>11}"
        f"{'prior-dominated':>17}{'log space':>11}{'reflected':>11}{'width/spk':>11}"
        f"{'shift/spk':>11}{'as NLSQ':>9}"
    )
    ok = outcome["converged"]
    low, high = outcome["posterior"][..., 0], outcome["posterior"][..., 1]
    inside = (low <= truth) & (truth <= high)
    # the corrected interval against the NLSQ speckle one of the same seed
    width, shift = (high - low) / 2 / speckle, ((high + low) / 2 - values) / speckle
    same = inside == (np.abs(values - truth) < speckle)
    for k, name in enumerate(names):
        uncorrected = outcome["uncorrected_posterior"][:, k]
        covered = (uncorrected[:, 0] <= truth[k]) & (truth[k] <= uncorrected[:, 1])
        converged = f"{100 * np.mean(inside[ok, k]):.0f}%" if ok.any() else "-"
        print(
            f"{name:<11}{100 * np.mean(inside[:, k]):>10.0f}%{100 * np.mean(covered):>12.0f}%"
            f"{converged:>11}{int(dominated[:, k].sum()):>17}{int(logged[:, k].sum()):>11}"
            f"{int(reflected[:, k].sum()):>11}{np.median(width[:, k]):>11.3f}"
            f"{np.median(shift[:, k]):>+11.3f}{100 * np.mean(same[:, k]):>8.0f}%"
        )
    print(
        "converged: coverage of the corrected intervals over the runs not flagged; "
        "prior-dominated, log space, reflected (at a bound): number of runs; width/spk, "
        "shift/spk: medians over the runs of the corrected interval's half-width and of "
        "its centre less the NLSQ value, over the NLSQ speckle stderr of the same seed; as "
        "NLSQ: runs where it holds the truth exactly when value -+ stderr does"
    )


def summary(outcomes) -> None:
    """One line per saved run: the range over the physics parameters of the speckle
    stderr over the scatter, of the +-1 stderr coverage and of the rms z, and the
    sampling spread of the first two over the seeds for honest Gaussian errors: the
    binomial ``sqrt(0.68 0.32 / n)`` of the coverage and ``1 / sqrt(2 (n - 1))`` of a
    scatter (the relative sd of a sample sd)."""
    print(
        f"{'case':<10}{'pixels':>8}{'photons':>9}{'seeds':>7}{'stderr/scatter':>17}"
        f"{'coverage %':>13}{'rms z':>12}{'spread':>14}"
    )
    for outcome in outcomes:
        settings = json.loads(str(outcome["settings"]))
        truth = np.array(list(case_truth(settings).values()))
        values, speckle = outcome["value"], outcome["speckle"]
        ratio = speckle.mean(axis=0) / values.std(axis=0, ddof=1)
        z = (values - truth) / speckle
        cover = 100 * np.mean(np.abs(z) < 1, axis=0)
        rms = np.sqrt(np.mean(z**2, axis=0))
        counts = "none" if settings["counts"] is None else f"{settings['counts']:g}"
        seeds = outcome["seed"]
        print(
            f"{settings.get('case', 'flow'):<10}{settings['pixels']:>8}{counts:>9}"
            f"{seeds.size:>7}{ratio.min():>10.2f} - {ratio.max():<4.2f}"
            f"{cover.min():>8.0f} - {cover.max():<3.0f}{rms.min():>7.2f} - {rms.max():.2f}"
            f"{1 / np.sqrt(2 * (seeds.size - 1)):>7.2f}"
            f"{100 * np.sqrt(0.68 * 0.32 / seeds.size):>4.0f} %"
        )


if __name__ == "__main__":
    main()
