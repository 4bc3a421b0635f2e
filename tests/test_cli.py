"""The command line: the README's demo, fitting a file, and argument errors."""

import html
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import heterodyne as hd
from heterodyne.cli import DEMO_TRUTH, main
from heterodyne.examples import example_file
from heterodyne.survey import table as survey_table


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "heterodyne", *args], capture_output=True, text=True
    )


@pytest.mark.slow
def test_demo_writes_data_fits_and_html_reports(tmp_path):
    out = tmp_path / "demo"
    done = run("demo", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "cmc.nc",
        "cmc_report.html",
        "cmc_report.txt",
        "data.nc",
        "nlsq.nc",
        "nlsq_report.html",
        "nlsq_report.txt",
    ]
    nlsq, cmc = hd.open_result(out / "nlsq.nc"), hd.open_result(out / "cmc.nc")
    assert isinstance(cmc, hd.CMCResult) and cmc.converged
    for name, truth in DEMO_TRUTH.items():
        assert abs(nlsq.value(name) - truth) < 4 * nlsq.error(name), name
        assert abs(cmc.value(name) - truth) < 4 * cmc.error(name), name
        # a warm-started posterior of Gaussian noise: the NLSQ fit within its sd
        assert abs(cmc.value(name) - nlsq.value(name)) < 0.5 * cmc.error(name), name
    data = hd.load(out / "data.nc")
    assert data.identical(nlsq.data) and data.identical(cmc.data)
    for stem, text in (("nlsq", "D0_sample"), ("cmc", "R-hat")):
        page = (out / f"{stem}_report.html").read_text()
        assert "cdn.bokeh.org" not in page and text in page, stem
    assert "truth vs fit" in done.stdout and "W-1005" not in done.stderr
    again = run("demo", "--out", str(out))
    assert again.returncode == 1 and "exists" in again.stderr


def test_fit_a_beamline_file(tmp_path, capsys):
    path = example_file(tmp_path / "f.h5", q=(0.008, 0.012), n_frames=40, phi=(0.0, 45.0))
    code = main(
        [
            "fit",
            str(path),
            "--q",
            "0.012",
            "--phi",
            "0",
            "45",
            "--frames",
            "0:30",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert "[[NLSQ fit]]" in capsys.readouterr().out
    result = hd.open_result(tmp_path / "out" / "nlsq.nc")
    assert float(result.params["q"]) == 0.012
    np.testing.assert_allclose(result.data["t1"].values[[0, -1]], [0.1, 3.0])


def test_survey_writes_the_table_and_plot_and_resumes(tmp_path, capsys):
    path = example_file(tmp_path / "f.h5", q=(0.008, 0.012), n_frames=40, phi=(0.0, 45.0))
    out = tmp_path / "survey"
    assert main(["survey", str(path), "--out", str(out)]) == 0
    table = xr.open_dataset(out / "survey.nc", engine="h5netcdf")
    np.testing.assert_allclose(table["q"].values, [0.008, 0.012])
    page = (out / "survey.html").read_text()
    assert "cdn.bokeh.org" not in page
    printed = capsys.readouterr().out
    rows = survey_table(table)
    # every fitted parameter, in full (no xarray "(12/19)" elision), with units and verdicts
    assert rows.columns[:3].tolist() == ["q [1/Å]", "verdict", "reduced χ²"]
    assert "v0 [Å/s^(1+β)]" in rows.columns and "D0_ref [Å²/s^(1+α)]" in rows.columns
    assert rows.drop(columns="reasons").to_string(index=False) in printed
    assert "..." not in printed
    assert f"wrote {out / 'survey.nc'}, {out / 'survey.html'}" in printed
    assert rows["verdict"].tolist() == [str(v) for v in table["verdict"].values]
    v0 = rows["v0 [Å/s^(1+β)]"][1]
    assert v0 == f"{float(table['v0'][1]):.4g} ± {float(table['v0_stderr'][1]):.2g}"
    # the table is in the page's document (JSON, HTML-escaped inside the bokeh script)
    cell = json.dumps(html.escape(f"<td>{v0}</td>"))[1:-1]
    assert cell in page and html.escape("<th>verdict</th>") in page
    assert main(["survey", str(path), "--out", str(out), "--overwrite"]) == 0
    assert "0 fits run, 2 read from" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit"], "the following arguments are required: file"),
        (["fit", "x.h5", "--out", "o", "--frames", "1-5"], "argument --frames: must be A:B"),
        (["fit", "x.h5", "--out", "o", "--method", "mcmc"], "invalid choice: 'mcmc'"),
        (["launch"], "invalid choice: 'launch'"),
        (["survey", "x.h5", "--out", "o", "--executor", "threads"], "argument --executor: must be"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_file_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "none.h5"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("heterodyne fit: ") and "none.h5" in err and "\n" not in err


def test_fit_sets_starts_bounds_and_fixed_parameters_and_prints_the_verdict_first(tmp_path, capsys):
    ds = hd.simulate(DEMO_TRUTH, n_frames=40, phi=[-45.0, 0.0, 45.0], noise=0.01, seed=3)
    path = hd.to_netcdf(ds, tmp_path / "d.nc")
    settings = hd.Parameters(f0=0.45)
    settings["D_offset_ref"].max = 50.0
    params = settings.to_json(tmp_path / "p.json")
    out = tmp_path / "out"
    code = main(
        ["fit", str(path), "--params", str(params), "--set", "v0=700,phi0=15"]
        + ["--fix", "f1,beta", "--bound", "D0_ref=100:9000", "--multistart", "0"]
        + ["--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("[[Verdict]]")
    assert f"wrote {out / 'nlsq.nc'}, {out / 'nlsq_report.txt'}" in printed
    result = hd.open_result(out / "nlsq.nc")
    settings = result.settings
    assert not settings["vary"].sel(name="f1") and not settings["vary"].sel(name="beta")
    assert float(settings["min"].sel(name="D0_ref")) == 100.0
    assert float(settings["max"].sel(name="D0_ref")) == 9000.0
    assert float(settings["max"].sel(name="D_offset_ref")) == 50.0  # from the file
    assert result.starts.sizes["start"] == 1
    for name in ("D0_ref", "D0_sample", "v0", "phi0"):
        assert abs(result.value(name) - DEMO_TRUTH[name]) < 4 * result.error(name), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "v0"], "expected NAME=VALUE"),
        (["--multistart", "-2"], "argument --multistart: must be auto or an integer >= 0"),
    ],
)
def test_bad_parameter_options_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "x.nc", "--out", "o", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "speed=3"], "unknown parameter 'speed'"),
        (["--bound", "v0=abc:5"], "'abc' is not a number"),
        (["--set", "f0=2"], "outside its bounds"),
    ],
)
def test_bad_parameter_values_exit_1_before_reading_the_file(args, message, capsys):
    assert main(["fit", "missing.nc", "--out", "o", *args]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dashboard", "x.h5", "--port", "70000"], "argument --port: must be a port number"),
        (["dashboard", "x.h5", "--address", "999.999.999.999"], "an IP address or a host name"),
        (["fit", "x.h5", "--out", "o", "--frames", "150:50"], "got '150:50'"),
        (["fit", "x.h5", "--out", "o", "--phi", "inf"], "argument --phi: must be finite"),
        (["fit", "x.h5", "--out", "o", "--q", "-1"], "argument --q: must be a number > 0"),
        (["fit", "x.h5", "--out", "o", "--multistart", "-1"], "must be auto or an integer >= 0"),
        (["survey", "x.h5", "--out", "o", "--executor", "dask://host"], "dask://HOST:PORT"),
    ],
)
def test_hostile_arguments_exit_2_with_one_line_and_no_repr(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "slice(" not in err and "Traceback" not in err


def test_an_existing_output_is_refused_before_any_work(tmp_path, capsys):
    from _work import NoWork

    path = example_file(tmp_path / "f.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    out = tmp_path / "out"
    out.mkdir()
    (out / "nlsq_report.txt").write_text("an earlier fit")
    with NoWork() as work:
        assert main(["fit", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nlsq_report.txt" in err and "--overwrite" in err and "overwrite=True" not in err
    assert not work.events  # nothing compiled: the fit never started
    assert sorted(p.name for p in out.iterdir()) == ["nlsq_report.txt"]


def test_unusable_outputs_and_executors_are_one_line_and_exit_1(tmp_path, capsys):
    path = example_file(tmp_path / "f.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    assert main(["demo", "--out", "/dev/null/x"]) == 1
    assert "--out /dev/null/x cannot be created (Not a directory)" in capsys.readouterr().err
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["survey", str(path), "--out", str(tmp_path / "s"), "--executor"]
    assert main([*args, f"dask://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("heterodyne survey: executor=") and "cannot reach a dask scheduler" in err


READ_ONLY = """
import sys
from heterodyne.cli import main
sys.exit(main(["fit", sys.argv[1], "--out", sys.argv[2]]))
"""


def _unprivileged(*args):
    """Run this Python with ``args`` subject to file permissions: as root, without the
    capabilities that override them (``setpriv``)."""
    command = [sys.executable, *args]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv cannot drop its file-permission override")
        drop = ["--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all"]
        command = ["setpriv", *drop, "--", *command]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_read_only_out_or_unreadable_file_is_one_line_and_exit_1(tmp_path):
    path = example_file(tmp_path / "f.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        done = _unprivileged("-c", READ_ONLY, str(path), str(locked / "out"))
        assert done.returncode == 1, done.stderr
        assert "permission denied" in done.stderr and "Traceback" not in done.stderr
        path.chmod(0o000)
        done = _unprivileged("-c", READ_ONLY, str(path), str(tmp_path / "out"))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "f.h5: permission denied" in done.stderr
        path.chmod(0o644)
        hidden = tmp_path / "hidden"
        hidden.mkdir()
        inside = shutil.copy(path, hidden / "g.h5")
        hidden.chmod(0o000)
        done = _unprivileged("-c", READ_ONLY, str(inside), str(tmp_path / "out"))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "cannot be reached (permission denied on it or on a folder above it)" in done.stderr
    finally:
        locked.chmod(0o755)
        path.chmod(0o644)
        if (tmp_path / "hidden").exists():
            (tmp_path / "hidden").chmod(0o755)


def test_fit_of_a_multi_q_netcdf_file_is_a_joint_fit(tmp_path, capsys):
    multi = hd.simulate(
        DEMO_TRUTH, q=[0.008, 0.012], phi=[[0.0, 45.0], [0.0, 90.0]], n_frames=30,
        noise=0.01, seed=2,
    )  # fmt: skip
    path = hd.to_netcdf(multi, tmp_path / "multi.nc")
    assert main(["fit", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "[[Joint NLSQ fit]]" in capsys.readouterr().out
    result = hd.open_result(tmp_path / "out" / "nlsq.nc")
    np.testing.assert_array_equal(result.params["q"].values, [0.008, 0.012])
    page = (tmp_path / "out" / "nlsq_report.html").read_text()
    assert "Joint NLSQ fit" in html.unescape(page)


def test_fit_q_all_of_a_beamline_file_is_a_joint_fit_of_its_bins(tmp_path, capsys):
    import _files

    # three angles: with two, the flow direction has two solutions of the same cost
    q, phi = [0.008, 0.012], [0.0, 45.0, 90.0]
    multi = hd.simulate(DEMO_TRUTH, q=q, phi=phi, n_frames=30, noise=0.01, seed=3)
    cells = [(iq, ip) for iq in range(2) for ip in range(3)]
    matrices = [np.triu(multi["c2"].values[iq, ip]) for iq, ip in cells]
    layout = _files.aps_u(np.array(q), np.array(phi), cells, matrices, multi.attrs["dt"])
    path = _files.write_h5(tmp_path / "bins.h5", layout)
    out = tmp_path / "out"
    assert main(["fit", str(path), "--out", str(out)]) == 1
    assert "--q all for a joint fit" in capsys.readouterr().err
    assert main(["fit", str(path), "--q", "all", "--out", str(out)]) == 0
    assert "[[Joint NLSQ fit]]" in capsys.readouterr().out
    joint = hd.open_result(out / "nlsq.nc")
    np.testing.assert_allclose(joint.params["q"].values, q, rtol=1e-12)
    for name in ("D0_sample", "v0", "phi0"):
        value, error = float(joint.params[name]), float(joint.stderr[name])
        assert abs(value - DEMO_TRUTH[name]) < 5 * error, (name, value, error)
    assert main(["fit", str(path), "--q", "0.012,0.008", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(hd.open_result(out / "nlsq.nc").params["q"].values, q)
    with pytest.raises(SystemExit):
        main(["fit", str(path), "--q", "0.01,x", "--out", str(out)])
    assert "numbers A,B,... or 'all'" in capsys.readouterr().err
