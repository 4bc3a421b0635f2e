"""The ``heterodyne`` command line: ``demo``, ``fit``, ``survey`` and ``dashboard``.

Bad arguments print one line and exit with status 2; a problem with the data or the
fit prints the package's error message and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from heterodyne import checks
from heterodyne.errors import HeterodyneError, OverwriteError

# The demo's sample: a flowing, diffusing sample against a slowly diffusing reference,
# seen at three angles; flow at 20° so the heterodyne oscillation differs by angle. In 60
# frames (6 s) the reference decays to exp(-q² D0_ref 6 s) = 0.17, the sample and the
# heterodyne oscillation (period 0.8 s at 0°) to nothing: every parameter is determined,
# and NLSQ and CMC take seconds.
DEMO_TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
DEMO_DATA = {
    "n_frames": 60,
    "dt": 0.1,
    "phi": [-45.0, 0.0, 45.0],
    "q": 0.01,
    "contrast": [0.45, 0.5, 0.4],
    "noise": 0.01,
    "seed": 2026,
}
# A short CMC run warm-started from the NLSQ fit: two shards show the consensus. Draws are
# cheap next to compiling NUTS (~6 s); with 2000 per chain the worst R-hat of the 36
# figures stays near 1.005 (seeds 0-4), with 1000 it reached the 1.01 limit.
DEMO_CMC = {"shards": 2, "chains": 2, "warmup": 500, "samples": 2000, "seed": 0}


T_START_HELP = (
    "time [s] of the file's stored frame 0, e.g. since a shear started (default: the "
    "file's own times; required where the file cannot place its first frame)"
)


def _argument(convert, text: str, flag: str, expected: str):
    """``convert(text)``, or argparse's one-line error naming ``flag`` and ``expected``."""
    try:
        return convert(text)
    except (ValueError, HeterodyneError):
        raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}") from None


def _frames(text: str) -> slice:
    def window(text):
        start, stop = (int(v) if v else None for v in text.split(":"))
        return checks.frame_window(slice(start, stop))

    return _argument(window, text, "--frames", "A:B, frame indices with B >= A + 3")


def _angle(text: str) -> float:
    return _argument(lambda v: checks.number(float(v), "phi"), text, "--phi", "finite angles [deg]")


def _q(text: str) -> float | list[float] | str:
    """``--q``: one q-bin, several (``0.005,0.01``: a joint fit) or ``all`` of them."""
    if text.strip().lower() == "all":
        return "all"

    def values(v):
        q = [checks.number(float(part), "q", positive=True) for part in v.split(",")]
        return q[0] if len(q) == 1 else q

    return _argument(values, text, "--q", "a number > 0 [1/Å], numbers A,B,... or 'all'")


def _port(text: str) -> int:
    return _argument(
        lambda v: checks.integer(int(v), "port", minimum=1, maximum=65535),
        text,
        "--port",
        "a port number from 1 to 65535",
    )


def _address(text: str) -> str:
    return _argument(
        checks.host_address, text, "--address", "an IP address or a host name (e.g. localhost)"
    )


def _multistart(text: str) -> str | int:
    if text == "auto":
        return text
    return _argument(
        lambda v: checks.integer(int(v), "n", minimum=0),
        text,
        "--multistart",
        "auto or an integer >= 0",
    )


def _assignments(text: str) -> list[tuple[str, str]]:
    """``NAME=VALUE[,NAME=VALUE...]`` as pairs."""
    pairs = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {text!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {text!r}")
    return names


def _add_parameter_options(command: argparse.ArgumentParser) -> None:
    """Start values, bounds and fixed parameters of the fit (``fit`` and ``survey``)."""
    group = command.add_argument_group(
        "parameters",
        "Varied D0_ref, D0_sample, f0, v0 and phi0 without a value start from estimates "
        "read off the data; v0's default upper bound is the velocity the frame rate "
        "resolves, pi / (q dt).",
    )
    group.add_argument(
        "--params", type=Path, help="a parameters file (JSON, as Parameters.to_json writes)"
    )
    lists = (
        ("--set", _assignments, "NAME=VALUE[,...]", "start (or fixed) values, e.g. v0=400,phi0=10"),
        ("--fix", _names, "NAME[,...]", "hold these at their value, e.g. f1,beta"),
        ("--free", _names, "NAME[,...]", "vary these too, e.g. D_offset_ref"),
        ("--bound", _assignments, "NAME=MIN:MAX[,...]", "either side may be empty, e.g. v0=:5000"),
    )
    for flag, kind, metavar, text in lists:
        group.add_argument(flag, type=kind, action="extend", default=[], metavar=metavar, help=text)
    group.add_argument(
        "--multistart",
        type=_multistart,
        default="auto",
        help="auto (default: the data's best estimates) or a number of extra starts",
    )


def parameters_from(args):
    """The ``Parameters`` that the parameter options of ``args`` describe."""
    from heterodyne.errors import OptionError
    from heterodyne.parameters import Parameters

    p = Parameters() if args.params is None else Parameters.from_json(args.params)
    for name, text in args.set:
        p[name].value = _float(text, f"--set {name}")
    for name in args.fix:
        p[name].vary = False
    for name in args.free:
        p[name].vary = True
    for name, text in args.bound:
        low, sep, high = text.partition(":")
        if not sep:
            raise OptionError(f"--bound {name}={text}: expected MIN:MAX (a side may be empty)")
        if low:
            p[name].min = _float(low, f"--bound {name}")
        if high:
            p[name].max = _float(high, f"--bound {name}")
    p.validate()
    return p


def _float(text: str, where: str) -> float:
    from heterodyne.errors import OptionError

    try:
        return float(text)
    except ValueError:
        raise OptionError(f"{where}: {text!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heterodyne",
        description="Fit XPCS two-time correlation matrices with the heterodyne model.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="simulate the default dataset, fit it (NLSQ, then CMC), write results and plots",
        description="Simulate the embedded default dataset (3 angles, 60 frames, a "
        "flowing sample against a diffusing reference), fit it by NLSQ, sample its "
        "posterior by a short CMC run started from the NLSQ fit, and write data.nc, "
        "nlsq.nc, cmc.nc, their text reports and HTML reports (the plots) to --out.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    fit = commands.add_parser(
        "fit",
        help="fit a file (beamline HDF5 or heterodyne netCDF)",
        description="Load FILE, fit it, and write the result netCDF and report to --out.",
    )
    fit.add_argument("file", type=Path, help="APS-U / legacy HDF5 or heterodyne netCDF")
    fit.add_argument(
        "--q",
        type=_q,
        help="q-bin to fit [1/Å] (nearest is taken); several, A,B,..., or 'all': a joint fit",
    )
    fit.add_argument("--phi", type=_angle, nargs="+", help="angles to fit [deg]")
    fit.add_argument("--frames", type=_frames, help="frame window A:B")
    fit.add_argument("--t-start", type=float, help=T_START_HELP)
    fit.add_argument("--method", choices=["nlsq"], default="nlsq", help="fitting method")
    _add_parameter_options(fit)
    fit.add_argument("--out", type=Path, required=True, help="output folder")
    fit.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    survey = commands.add_parser(
        "survey",
        help="fit every q-bin of a file and gather the parameters",
        description="Fit every q-bin of FILE by NLSQ; write survey.nc (parameters and "
        "stderr against q), survey.html (the plot) and each fit under "
        "--out/fits (a rerun resumes from there).",
    )
    survey.add_argument("file", type=Path, help="APS-U / legacy HDF5 file")
    survey.add_argument("--phi", type=_angle, nargs="+", help="angles to fit [deg]")
    survey.add_argument("--frames", type=_frames, help="frame window A:B")
    survey.add_argument("--t-start", type=float, help=T_START_HELP)
    survey.add_argument(
        "--executor",
        type=_executor,
        default=None,
        help="processes, or dask://HOST:PORT (default: in this process)",
    )
    _add_parameter_options(survey)
    survey.add_argument("--out", type=Path, required=True, help="output folder")
    survey.add_argument("--overwrite", action="store_true", help="replace survey.nc/html")
    dashboard = commands.add_parser(
        "dashboard",
        help="serve the interactive dashboard of a file",
        description="Serve the panel dashboard of FILE (data views, NLSQ and CMC fits) at "
        "http://ADDRESS:PORT/ until interrupted. It listens on localhost only, accepts "
        "page connections (websockets) only from pages it served, and its file box opens "
        "only files under --root (default: the folder of FILE). Anyone who can reach the "
        "port can drive it: to use it from another machine, keep the default and forward "
        "the port over SSH (ssh -L 5006:localhost:5006 HOST), rather than --address "
        "0.0.0.0 on a network you do not control.",
    )
    dashboard.add_argument("file", type=Path, help="APS-U / legacy HDF5 or heterodyne netCDF")
    dashboard.add_argument("--t-start", type=float, help=T_START_HELP)
    dashboard.add_argument("--port", type=_port, default=5006, help="port (default: 5006)")
    dashboard.add_argument(
        "--address",
        type=_address,
        default="localhost",
        help="address to listen on (default: localhost)",
    )
    dashboard.add_argument(
        "--root",
        type=Path,
        help="folder whose files the file box may open (default: the folder of FILE)",
    )
    dashboard.add_argument("--show", action="store_true", help="open it in a web browser")
    return parser


def _executor(text: str) -> str:
    from heterodyne import executors

    def check(text):
        executors.check(text)
        return text

    return _argument(check, text, "--executor", "'processes' or dask://HOST:PORT")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "demo": run_demo,
            "fit": run_fit,
            "survey": run_survey,
            "dashboard": run_dashboard,
        }
        return commands[args.command](args)
    except HeterodyneError as err:
        print(f"heterodyne {args.command}: {err}", file=sys.stderr)
        return 1


def _outputs(args, names: tuple[str, ...]) -> None:
    """Before any work: ``--out`` is a folder this user can write, and none of ``names``
    exists there unless ``--overwrite`` was given."""
    checks.writable_folder(args.out, "--out")
    if args.overwrite:
        return
    present = [name for name in names if (args.out / name).exists()]
    if present:
        raise OverwriteError(
            f"output exists in {args.out}: {', '.join(present)}; pass --overwrite to replace "
            "it, or choose another --out"
        )


def run_demo(args) -> int:
    import heterodyne as hd

    start = time.perf_counter()
    out = args.out
    _outputs(args, ("data.nc", *_result_files("nlsq"), *_result_files("cmc")))
    ds = hd.simulate(DEMO_TRUTH, **DEMO_DATA)
    hd.to_netcdf(ds, out / "data.nc", overwrite=args.overwrite)
    guess = hd.Parameters({name: 0.7 * value for name, value in DEMO_TRUTH.items()})
    nlsq = hd.fit_nlsq(ds, guess, multistart=2)
    _write_result(nlsq, out, "nlsq", overwrite=args.overwrite)
    print(nlsq.report() + "\n")
    cmc = hd.fit_cmc(ds, nlsq, **DEMO_CMC)
    _write_result(cmc, out, "cmc", overwrite=args.overwrite)
    print(cmc.report())
    print(
        f"\ntruth vs fit:\n    {'':<10}{'truth':>10}{'NLSQ':>13} ± {'stderr':<10}{'CMC':>10} ± sd"
    )
    for name, value in DEMO_TRUTH.items():
        print(
            f"    {name:<10}{value:>10.6g}{nlsq.value(name):>13.6g} ± {nlsq.error(name):<10.3g}"
            f"{cmc.value(name):>10.6g} ± {cmc.error(name):.3g}"
        )
    print(
        f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/ "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def run_fit(args) -> int:
    import heterodyne as hd

    params = parameters_from(args)
    _outputs(args, _result_files(args.method))
    ds = hd.load(args.file, q=args.q, phi=args.phi, frames=args.frames, t_start=args.t_start)
    result = hd.fit_nlsq(ds, params, multistart=args.multistart)
    # the answer first: the HTML page's plotting libraries take seconds to load
    print(result.report(), flush=True)
    written = _write_result(result, args.out, args.method, overwrite=args.overwrite)
    print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


def run_survey(args) -> int:
    import heterodyne as hd
    from heterodyne.files import atomic_write
    from heterodyne.report import write_survey_html
    from heterodyne.survey import table

    _outputs(args, ("survey.nc", "survey.html"))
    out = hd.survey(
        args.file,
        phi=args.phi,
        frames=args.frames,
        t_start=args.t_start,
        executor=args.executor,
        checkpoint=args.out / "fits",
        params=parameters_from(args),
        multistart=args.multistart,
    )
    out.attrs["file"] = str(args.file)
    atomic_write(
        lambda tmp: out.to_netcdf(tmp, engine="h5netcdf"),
        args.out / "survey.nc",
        overwrite=args.overwrite,
    )
    write_survey_html(
        out,
        args.out / "survey.html",
        overwrite=args.overwrite,
        title=f"heterodyne survey of {args.file.name}",
    )
    rows = table(out)
    print(rows.drop(columns="reasons").to_string(index=False))  # reasons: one line each
    flagged = rows[rows["verdict"] != "ok"]
    for row in flagged.itertuples(index=False):
        print(f"q = {row[0]} 1/Å: verdict {row.verdict}: {row.reasons}")
    print(
        f"{out.attrs['fitted']} fits run, {out.attrs['from_checkpoint']} read from "
        f"{args.out / 'fits'}; {len(flagged)} of {len(rows)} not ok\n"
        f"wrote {args.out / 'survey.nc'}, {args.out / 'survey.html'}"
    )
    return 0


def run_dashboard(args) -> int:
    from heterodyne.app import serve

    try:
        serve(
            args.file,
            port=args.port,
            address=args.address,
            show=args.show,
            root=args.root,
            t_start=args.t_start,
        )
    except KeyboardInterrupt:
        pass
    return 0


def _result_files(stem: str) -> tuple[str, str, str]:
    """The files :func:`_write_result` writes for ``stem``."""
    return f"{stem}.nc", f"{stem}_report.txt", f"{stem}_report.html"


def _write_result(result, out: Path, stem: str, *, overwrite: bool) -> list[Path]:
    """Write the result's netCDF file, text report and HTML page; their paths."""
    from heterodyne.files import atomic_write
    from heterodyne.report import write_html

    netcdf, text, page = (out / name for name in _result_files(stem))
    result.to_netcdf(netcdf, overwrite=overwrite)
    atomic_write(lambda tmp: tmp.write_text(result.report() + "\n"), text, overwrite=overwrite)
    write_html(result, page, overwrite=overwrite)
    return [netcdf, text, page]


if __name__ == "__main__":
    sys.exit(main())
