"""Right answers by default (issue 16): fits with no start on 20 simulated cases.

Each case draws a truth from the ranges users meet, with its own seed: a static or
diffusing reference, a sample 3-30x faster, flow from weak (a fraction of a turn over the
decay) to strong (up to 0.8 pi per frame), 2 to 6 angles, 100 to 400 frames, Gaussian
noise. Every case is fitted as a new user would: ``hd.fit_nlsq(ds)`` with defaults, and
(``--paths``) ``heterodyne fit FILE`` on the case saved as netCDF and the dashboard's Fit
button with its default table. A case is recovered when every varied physics parameter is
within 3 stderr of the truth (phi0 modulo 180 deg); it is wrong when its chi2 is above
that of a fit started at the truth (a local minimum) or it lies beyond 5 stderr. Prints
one row per case and path (worst |z| and its parameter, the verdict, the warm time),
then the counts, and 'ok' verdicts on wrong fits.

    .venv/bin/python benchmarks/defaults.py [--cases 20] [--paths api,cli,dashboard]
"""

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np

import heterodyne as hd
from heterodyne.parameters import PHYSICS_NAMES

Z_MAX = 3.0
# A fit is wrong when it misses the global minimum (a fit started at the truth does
# better) or lies this many stderr from the truth; the verdict must not call it ok.
Z_WRONG = 5.0


def case(k: int) -> tuple[dict, dict]:
    """Truth and simulation options of case ``k`` (seeded by ``k``)."""
    rng = np.random.default_rng(1000 + k)
    n_frames = int(rng.choice([100, 200, 200, 400]))
    dt = float(rng.choice([0.05, 0.1]))
    q = float(rng.choice([0.005, 0.01, 0.02]))
    span = n_frames * dt
    sample_rate = 10 ** rng.uniform(np.log10(8 / span), np.log10(0.4 / dt))  # 1/s
    reference_rate = 0.0 if rng.random() < 0.25 else sample_rate / 10 ** rng.uniform(0.5, 1.5)
    strong = rng.random() < 0.6
    # phase per frame at cos = 1: strong flow up to 0.8 pi, weak a few turns per decay
    phase = rng.uniform(0.3, 0.8 * np.pi) if strong else rng.uniform(0.3, 3.0) * sample_rate * dt
    n_phi = int(rng.choice([2, 3, 4, 6]))
    phi = np.sort(rng.choice(np.arange(-90.0, 90.0, 15.0), n_phi, replace=False))
    truth = {
        "D0_ref": reference_rate / q**2,
        "D0_sample": sample_rate / q**2,
        "v0": phase / (q * dt),
        "f0": float(rng.uniform(0.2, 0.8)),
        "phi0": float(rng.uniform(-80, 80)),
    }
    options = {
        "n_frames": n_frames,
        "dt": dt,
        "q": q,
        "phi": phi.tolist(),
        "contrast": float(rng.uniform(0.2, 0.6)),
        "noise": float(rng.uniform(0.005, 0.02)),
        "seed": k,
    }
    return truth, options


def worst_z(result, ds) -> tuple[float, str]:
    """The largest |fit - truth| / stderr over the varied physics parameters."""
    worst, name_of = 0.0, ""
    for name in PHYSICS_NAMES:
        if not bool(result.settings["vary"].sel(name=name)):
            continue
        diff = float(result.params[name]) - float(ds.attrs[f"true_{name}"])
        if name == "phi0":
            diff = (diff + 90.0) % 180.0 - 90.0
        z = abs(diff) / float(result.stderr[name])
        if not z <= worst:
            worst, name_of = z, name
    return worst, name_of


def fit_api(ds, _folder):
    return hd.fit_nlsq(ds, progress=False)


def fit_cli(ds, folder):
    from heterodyne import cli

    path = Path(folder) / "case.nc"
    hd.to_netcdf(ds, path, overwrite=True)
    out = Path(folder) / "out"
    with contextlib.redirect_stdout(io.StringIO()):  # the report: read back below
        cli.main(["fit", str(path), "--out", str(out), "--overwrite"])
    return hd.open_result(out / "nlsq.nc")


def fit_dashboard(ds, _folder):
    from heterodyne.app import Dashboard

    dash = Dashboard(data=ds)
    dash.nlsq_button.clicks += 1
    deadline = time.time() + 120
    while dash.nlsq is None and time.time() < deadline:
        time.sleep(0.05)
    return dash.nlsq


PATHS = {"api": fit_api, "cli": fit_cli, "dashboard": fit_dashboard}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--paths", default="api", help="comma-separated: api, cli, dashboard")
    args = parser.parse_args()
    paths = args.paths.split(",")
    print(
        f"{'case':>4} {'path':<10}{'N':>5}{'phi':>4}{'D0_ref':>9}{'D0_samp':>9}{'v0':>8}"
        f"{'f0':>6}{'phi0':>7}  {'max|z|':>7} {'of':<12}{'verdict':<8}{'warm s':>7}"
    )
    counts = {path: [0, 0, 0] for path in paths}  # recovered, ok on a wrong answer, cases
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(args.cases):
            truth, options = case(k)
            ds = hd.simulate(truth, **options)
            for path in paths:
                PATHS[path](ds, folder)  # compile this shape: the warm time is the user's
                start = time.perf_counter()
                result = PATHS[path](ds, folder)
                seconds = time.perf_counter() - start
                z, name = worst_z(result, ds)
                status = result.verdict.status
                # the global minimum: at least as good as a fit started at the truth
                best = hd.fit_nlsq(ds, hd.Parameters(truth), multistart=0, progress=False)
                wrong = result.chi2 > best.chi2 * (1 + 1e-6) or z > Z_WRONG
                counts[path][0] += z <= Z_MAX
                counts[path][1] += wrong and status == "ok"
                counts[path][2] += 1
                if path == "api" and options["n_frames"] == 200:
                    times.append((len(options["phi"]), seconds))
                print(
                    f"{k:>4} {path:<10}{options['n_frames']:>5}{len(options['phi']):>4}"
                    f"{truth['D0_ref']:>9.3g}{truth['D0_sample']:>9.3g}{truth['v0']:>8.4g}"
                    f"{truth['f0']:>6.2f}{truth['phi0']:>7.1f}  {z:>7.2f} {name:<12}"
                    f"{status:<8}{seconds:>7.2f}{'  WRONG' if wrong else ''}",
                    flush=True,
                )
    for path, (good, wrong_ok, n) in counts.items():
        print(
            f"{path}: truth within {Z_MAX:g} stderr in {good} of {n}; 'ok' on a wrong answer "
            f"(a worse minimum than the truth's, or beyond {Z_WRONG:g} stderr): {wrong_ok}"
        )
    if times:
        print(
            "warm fit_nlsq at 200 frames: " + ", ".join(f"{a} angles {s:.2f} s" for a, s in times)
        )


if __name__ == "__main__":
    main()
