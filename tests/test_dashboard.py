"""The dashboard object without a browser: selectors, the parameter table, the Fit and
Run buttons pressed from code, the reports, downloads and alerts."""

import asyncio
import html
import inspect
import re
import socket
import time
import urllib.request

import _files
import holoviews as hv
import numpy as np
import pytest
from _served import free_port, served
from _work import Compiles

import heterodyne as hd
from heterodyne import diagnostics
from heterodyne.app import (
    FAIL_STYLE,
    PASS_STYLE,
    Dashboard,
    _session,
    cmc_setting_problems,
    diagnostics_tables,
    parameter_frame,
    serve,
    table_problems,
)
from heterodyne.cli import build_parser, main
from heterodyne.examples import EXAMPLE_TRUTH, example_file
from heterodyne.parameters import ESTIMATED, PHYSICS_NAMES, SCALING_NAMES

# Small data (the sizes of the browser tests, so the compiled fits are shared).
DATA = {"n_frames": 40, "phi": [-45.0, 0.0, 45.0], "noise": 0.01}


def rendered(pane) -> str:
    """The HTML a Markdown pane (an alert) puts in the page."""
    return html.unescape(pane._transform_object(pane.object)["object"])


def shown(pane) -> str:
    """The text a Markdown pane shows: its HTML without tags and entities."""
    return html.unescape(re.sub(r"<[^>]+>", "", rendered(pane)))


@pytest.fixture(scope="module")
def ds():
    return hd.simulate(EXAMPLE_TRUTH, **DATA, seed=3)


@pytest.fixture(scope="module")
def fitted(ds):
    """A dashboard whose Fit was pressed, starting at 0.7 x the truth."""
    dash = hd.dashboard(ds, {name: 0.7 * value for name, value in EXAMPLE_TRUTH.items()})
    dash.nlsq_button.clicks += 1
    return dash


def test_a_beamline_file_opens_with_its_q_bins_and_follows_the_selectors(tmp_path):
    path = example_file(tmp_path / "f.h5", q=(0.008, 0.012), n_frames=30, phi=(-45.0, 0.0, 45.0))
    dash = hd.dashboard(path)
    assert isinstance(dash, Dashboard)
    assert list(dash.param.q.objects) == [0.008, 0.012]
    assert not dash.data_alert.visible
    assert dash.data.identical(hd.load(path, q=0.008))
    assert not dash.q_select.disabled and not dash.nlsq_button.disabled

    dash.q = 0.012
    full = hd.load(path, q=0.012)
    assert dash.data.identical(full)
    assert dash.phi == [-45.0, 0.0, 45.0] and dash.frames == (0, 30)
    dash.param.update(phi=[45.0, -45.0], frames=(5, 25))
    assert dash.data.identical(hd.select(full, phi=[45.0, -45.0], frames=slice(5, 25)))
    heatmaps = dash.c2_view.object
    assert isinstance(heatmaps, hv.Layout)
    titles = [image.opts.get().kwargs["title"] for image in heatmaps]
    assert titles == [f"φ = {v} deg, q = 0.012 1/Å" for v in ("45", "-45")]
    assert "20: t = 0.6 ... 2.5 s" in dash.summary.object
    assert "380 (0 non-finite, masked)" in dash.summary.object  # 2 x 20 x 19 / 2 pairs
    assert "(0 dropped, masked)" in dash.summary.object


def test_a_bad_file_or_selection_shows_an_alert(tmp_path):
    dash = hd.dashboard(tmp_path / "missing.h5")
    assert dash.data_alert.visible and dash.data_alert.alert_type == "danger"
    assert "no such file" in shown(dash.data_alert)
    assert dash.data is None and dash.nlsq_button.disabled and dash.cmc_button.disabled

    text = tmp_path / "notes.h5"
    text.write_text("not HDF5")
    dash.path = str(text)
    assert dash.data_alert.visible and "FileFormatError" in shown(dash.data_alert)

    dash.path = str(example_file(tmp_path / "f.h5", q=(0.01,), n_frames=20, phi=(0.0,)))
    assert not dash.data_alert.visible and dash.data.sizes["t1"] == 20
    dash.frames = (0, 2)
    assert dash.data_alert.visible and "leaves 2 frames" in shown(dash.data_alert)
    assert dash.data.sizes["t1"] == 20  # the last selection is kept
    dash.phi = []
    assert "select at least one angle" in shown(dash.data_alert)
    assert dash.data is None and dash.c2_view.object is None  # no plot of an unticked angle
    dash.path = str(text)  # a bad file after a good one: nothing of the good one is left
    assert dash.param.phi.objects == [] and dash.intensity_view.object is None


def test_the_parameter_table_is_the_parameters(ds):
    p = hd.Parameters(v0=250.0, contrast=0.4)
    p["f3"].vary = True
    p["D0_ref"].min = 10.0
    dash = hd.dashboard(ds, p)
    assert list(dash.table.value["name"]) == list(PHYSICS_NAMES + SCALING_NAMES)
    back = dash.parameters()
    for name in PHYSICS_NAMES + SCALING_NAMES:
        assert (back[name].value, back[name].vary, back[name].min, back[name].max) == (
            p[name].value,
            p[name].vary,
            p[name].min,
            p[name].max,
        ), name
    assert back["offset"].value is None  # blank: estimated per angle

    with pytest.raises(hd.ParameterError, match="one value for all angles"):
        parameter_frame(hd.Parameters(contrast=[0.3, 0.5]))


def test_fit_pressed_from_code_fits_with_the_table_and_reports(fitted, ds, tmp_path):
    result = fitted.nlsq
    assert not fitted.nlsq_alert.visible and result.success
    for name, truth in EXAMPLE_TRUTH.items():
        assert abs(result.value(name) - truth) < 4 * result.error(name), name
    assert fitted.nlsq_report.object == result._repr_html_()
    assert fitted.nlsq_text.object == result.report()
    assert "reduced χ²" in fitted.nlsq_status.object and not fitted.nlsq_progress.visible
    assert len(fitted.nlsq_view.object) == 4 * ds.sizes["phi"]
    path = tmp_path / "download.nc"
    path.write_bytes(fitted.nlsq_download.callback().getvalue())
    back = hd.open_result(path)
    assert back.params.identical(result.params) and back.data.identical(ds)

    fitted.from_fit_button.clicks += 1  # as a click does
    start = fitted.parameters()
    for name in PHYSICS_NAMES:
        assert start[name].value == result.value(name), name


def test_the_first_click_fits_from_the_data_with_the_default_table(ds):
    """No values typed: the starts read off the data are blank, the velocity
    bound is the data's, and the fit finds the truth with a verdict."""
    dash = hd.dashboard(ds)
    blank = dash.table.value.set_index("name")["value"].isna()
    assert set(blank[blank].index) == set(ESTIMATED + SCALING_NAMES)
    dash.nlsq_button.clicks += 1
    result = dash.nlsq
    assert float(result.settings["max"].sel(name="v0")) < 1e6
    assert result.starts.sizes["start"] >= 1
    for name, truth in EXAMPLE_TRUTH.items():
        assert abs(result.value(name) - truth) < 4 * result.error(name), name
    assert result.verdict.status == "ok"
    assert "verdict **OK**" in dash.nlsq_status.object
    assert "Verdict: OK" in dash.nlsq_report.object


def test_a_new_frame_window_refits_without_compiling(ds):
    """Frames 3 to 40 after 0 to 40: both lie in the size class of 40 frames
    (heterodyne.shapes), so the second Fit reuses every compiled program."""
    dash = hd.dashboard(ds)
    dash.nlsq_button.clicks += 1
    assert dash.nlsq.success and dash.nlsq.verdict.status != "fail"
    dash.frames = (3, 40)
    with Compiles() as compiles:
        dash.nlsq_button.clicks += 1
    assert dash.nlsq.data.sizes["t1"] == 37 and dash.nlsq.success
    assert dash.nlsq.verdict.status != "fail" and "verdict" in dash.nlsq_status.object
    assert compiles.names == []


def test_a_new_angle_choice_of_the_same_class_refits_without_compiling():
    """3 of 4 angles after all 4: both counts pad to the angle class 4 (heterodyne.shapes),
    so the second Fit reuses every compiled program."""
    four = {**DATA, "phi": [-45.0, 0.0, 45.0, 90.0]}
    dash = hd.dashboard(hd.simulate(EXAMPLE_TRUTH, **four, seed=3))
    dash.nlsq_button.clicks += 1
    assert dash.nlsq.success and dash.nlsq.verdict.status != "fail"
    dash.phi = [-45.0, 45.0, 90.0]
    with Compiles() as compiles:
        dash.nlsq_button.clicks += 1
    assert list(dash.nlsq.data["phi"].values) == [-45.0, 45.0, 90.0] and dash.nlsq.success
    assert dash.nlsq.verdict.status != "fail" and "verdict" in dash.nlsq_status.object
    assert compiles.names == []


def test_the_event_loop_stays_live_while_a_fit_runs(ds):
    dash = hd.dashboard(ds)
    panes = (dash.nlsq_report, dash.nlsq_text, dash.nlsq_view, dash.nlsq_cuts)
    busy_while_drawn = []  # the result panes are busy while the new result is drawn
    dash.param.watch(lambda _: busy_while_drawn.append([p.loading for p in panes]), "nlsq")

    async def press_and_watch():
        dash.nlsq_button.clicks += 1  # with a running loop, panel schedules the callback
        shown = []
        for _ in range(24_000):  # 2 minutes at most
            if dash.nlsq is not None or dash.nlsq_alert.visible:
                break
            shown.append((dash.nlsq_status.object, dash.nlsq_button.disabled))
            await asyncio.sleep(0.005)
        return shown

    shown = asyncio.run(press_and_watch())
    assert dash.nlsq is not None and not dash.nlsq_button.disabled
    # The loop ran this coroutine between the start and the end of the fit, which had
    # disabled the button and shown its progress.
    assert any(status.startswith("fitting...") and disabled for status, disabled in shown)
    assert busy_while_drawn == [[True] * 4] and not any(p.loading for p in panes)


def test_a_fixed_parameter_and_shared_scaling_reach_the_fit(ds):
    dash = hd.dashboard(ds)
    table = dash.table.value.copy()
    row = table["name"] == "phi0"
    table.loc[row, "value"], table.loc[row, "vary"] = EXAMPLE_TRUTH["phi0"], False
    dash.table.value = table
    dash.scaling = "shared"
    dash.nlsq_button.clicks += 1
    result = dash.nlsq
    assert result.value("phi0") == EXAMPLE_TRUTH["phi0"] and np.isnan(result.error("phi0"))
    assert result.info["scaling"] == "shared" and np.ptp(result.params["contrast"].values) == 0
    assert abs(result.value("v0") - EXAMPLE_TRUTH["v0"]) < 4 * result.error("v0")


def test_bad_parameters_or_a_missing_fit_show_alerts_instead_of_running(ds):
    dash = hd.dashboard(ds)
    table = dash.table.value.copy()
    table.loc[table["name"] == "v0", "value"] = -1.0
    dash.table.value = table
    # marked as edited, before any click: the cell, the message beside it, no Fit
    assert dash.nlsq_button.disabled and dash.table_message.visible
    assert "v0: value -1 is outside [0, 1e+06]" in shown(dash.table_message)
    v0 = list(table["name"]).index("v0")
    assert set(table_problems(table)) == {(v0, "value")}
    dash.nlsq_button.clicks += 1  # pressed from code all the same: refused with the reason
    assert dash.nlsq is None
    assert dash.nlsq_alert.visible and "ParameterError" in shown(dash.nlsq_alert)
    assert "v0: value -1.0 outside its bounds" in shown(dash.nlsq_alert)
    table.loc[table["name"] == "v0", "value"] = "fast"  # text is not a blank (from the data)
    table.loc[table["name"] == "D0_ref", "max"] = ""
    dash.table.value = table
    assert set(table_problems(table)) == {(v0, "value"), (0, "max")}
    assert "v0 value: 'fast' is not a number" in shown(dash.table_message)
    table.loc[table["name"] == "v0", "value"] = 1e3
    table.loc[table["name"] == "D0_ref", "max"] = "1e7"
    dash.table.value = table
    assert not dash.nlsq_button.disabled and not dash.table_message.visible

    dash.cmc_button.clicks += 1  # warm start is ticked, but there is no NLSQ fit
    assert dash.cmc is None and "warm start needs an NLSQ fit" in shown(dash.cmc_alert)


def test_cmc_settings_out_of_range_are_kept_marked_and_explained(ds):
    dash = hd.dashboard(ds)  # 40 frames: at most 20 shards of two rows
    assert not dash.cmc_button.disabled and not dash.cmc_message.visible
    dash.param.update(shards=0, samples=2)
    assert dash.shards == 0 and dash.samples == 2  # kept as typed, not reset
    assert dash.cmc_button.disabled and dash.cmc_message.visible
    assert "shards must be an integer >= 1 and <= 20; got 0" in shown(dash.cmc_message)
    assert "samples must be an integer >= 4; got 2" in shown(dash.cmc_message)
    marked = {name for name, box in dash.cmc_inputs.items() if box.stylesheets}
    assert marked == {"shards", "samples"}
    dash.param.update(shards=21, samples=100)
    assert set(cmc_setting_problems({"shards": 21, "samples": 100}, 40)) == {"shards"}
    dash.shards = 20
    assert not dash.cmc_button.disabled and not dash.cmc_message.visible


def test_a_new_selection_drops_the_fits_of_the_old_one(fitted, ds):
    dash = hd.dashboard(ds)
    dash.nlsq = fitted.nlsq
    assert dash.nlsq_report.object == fitted.nlsq._repr_html_()
    assert not dash.nlsq_download.disabled and not dash.from_fit_button.disabled
    dash.frames = (0, 30)
    assert dash.nlsq is None and dash.nlsq_report.object == ""
    assert dash.nlsq_download.disabled and dash.from_fit_button.disabled


def test_scan_pressed_from_code_scans_ages_against_the_laws_of_the_fit(fitted, ds):
    dash = hd.dashboard(ds)
    assert dash.window == dash.step == 8  # a fifth of the 40 frames: five ages
    dash.nlsq = fitted.nlsq
    dash.param.update(window=20, step=10)
    dash.ageing_button.clicks += 1
    scan = dash.ageing
    assert not dash.ageing_alert.visible, dash.ageing_alert.object
    np.testing.assert_array_equal(scan["first_frame"], [0, 10, 20])
    assert scan.attrs["law_D0_sample"] == fitted.nlsq.value("D0_sample")
    assert scan.attrs["errors"] == dash.errors
    assert "3 windows" in dash.ageing_status.object and "the NLSQ fit" in dash.ageing_status.object
    assert dash.ageing_text.object.startswith("[[Law]]")
    assert len(dash.ageing_view.object) == 3  # rates, velocity, fraction
    dash.window = 50  # longer than the data: refused, with the reason, on the tab
    dash.ageing_button.clicks += 1
    assert dash.ageing_alert.visible and "window" in shown(dash.ageing_alert)
    assert dash.ageing is scan
    dash.frames = (0, 30)  # a new selection drops the scan of the old one
    assert dash.ageing is None and dash.ageing_view.object is None


@pytest.mark.slow
def test_run_pressed_from_code_samples_and_judges_the_shards(fitted, tmp_path):
    fitted.param.update(shards=2, chains=2, warmup=60, samples=40)
    fitted.cmc_button.clicks += 1
    result = fitted.cmc
    assert result.info["shards"] == 2 and result.info["prior"] == "nlsq"
    assert result.diagnostics.sizes["shard"] == 2
    assert fitted.cmc_report.object == result._repr_html_()
    steps = 2 * 2 * (60 + 40)  # every draw of every chain, warmup included, was counted
    assert fitted.cmc_progress.value == steps and "shards: 2" in fitted.cmc_status.object
    assert abs(result.value("v0") - EXAMPLE_TRUTH["v0"]) < 0.05 * EXAMPLE_TRUTH["v0"]
    assert (
        fitted.cmc_alert.visible and fitted.cmc_alert.alert_type == "warning"
    ) != result.converged
    path = tmp_path / "posterior.nc"
    path.write_bytes(fitted.cmc_download.callback().getvalue())
    assert hd.open_result(path).diagnostics.identical(result.diagnostics)

    shards, by_parameter = diagnostics_tables(result)
    failed = result.failures()
    assert list(shards.data["verdict"]) == ["fail" if s in failed else "pass" for s in (0, 1)]
    limits = diagnostics.THRESHOLDS
    figures = result.diagnostics
    colours = by_parameter._compute().ctx
    columns = list(by_parameter.data.columns)
    for row, label in enumerate(by_parameter.data["parameter"]):
        rhat = float(figures["rhat"].isel(entry=row).max())
        passed = rhat < limits.rhat_max
        style = PASS_STYLE if passed else FAIL_STYLE
        assert colours[(row, columns.index("R-hat"))] == [tuple(style.split(": "))], label
        ess = float(figures["ess_bulk"].isel(entry=row).min())
        style = PASS_STYLE if ess >= limits.ess_per_chain_min * 2 else FAIL_STYLE
        assert colours[(row, columns.index("ESS bulk"))] == [tuple(style.split(": "))], label


def test_the_command_line_refuses_a_missing_file(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "missing.h5")]) == 1
    assert "heterodyne dashboard:" in capsys.readouterr().err


def test_data_tab_takes_a_time_origin_and_marks_frames_out_on_the_intensity_trace(tmp_path):
    """A file correlated from raw frame -400 (counted from the end) cannot place its
    frames: the page asks for t_start; a beam dump in the intensity trace is excluded."""
    n, frame_time = 20, 0.05
    matrices = [hd.simulate(EXAMPLE_TRUTH, n_frames=n, phi=0.0, noise=0.01)["c2"].values[0]]
    files, lzf = _files.boost_corr(
        [0.01], [0.0], [(0, 0)], matrices, frame_time, config={"begin_frame": -400}
    )
    trace = np.ones(n)
    trace[[12, 13]] = 0.1
    files[_files.INTENSITY] = np.stack([np.arange(n), trace])
    path = _files.write_h5(tmp_path / "tail.h5", files, lzf=lzf)
    dash = hd.dashboard(path)
    assert dash.data_alert.visible and "t_start=" in shown(dash.data_alert) and dash.data is None
    dash.t_start = 30.0
    assert not dash.data_alert.visible
    np.testing.assert_allclose(dash.data["t1"].values, 30.0 + frame_time * np.arange(n))
    assert "user: t_start = 30 s" in dash.summary.object
    curve = dash.intensity_view.object.Curve.Intensity
    np.testing.assert_array_equal(curve.dimension_values("intensity"), trace)
    assert len(dash.intensity_view.object.Scatter.Excluded) == 0

    dash.exclude = "12:14"
    expected = hd.load(path, t_start=30.0, exclude_frames=[12, 13])
    assert dash.data.identical(expected)
    assert dash.data.attrs["dropped_frames"] == 2
    assert "(2 dropped, masked)" in dash.summary.object and "12:14" in dash.summary.object
    marked = dash.intensity_view.object.Scatter.Excluded
    np.testing.assert_array_equal(marked.dimension_values("stored frame"), [12, 13])
    dash.exclude = "12-14"
    assert dash.data_alert.visible and "expected an index or a range" in shown(dash.data_alert)
    assert dash.data.identical(expected)  # the last data are kept


# ---- the server: binding, origins, file box, lazy data, escaping ---------------------


def test_file_text_in_an_alert_is_escaped_never_markup(tmp_path):
    beacon = "![](http://127.0.0.1:9/beacon.png) <img src=x onerror=alert(1)> [link](http://x)"
    ds = hd.simulate(EXAMPLE_TRUTH, **DATA, seed=3)
    ds.attrs["dt"] = beacon  # a text attribute where a number belongs: refused, quoted
    path = tmp_path / "hostile.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    dash = hd.dashboard(path)
    assert dash.data_alert.visible and "does not match the spacing" in shown(dash.data_alert)
    page = rendered(dash.data_alert)
    assert "<img" not in page and "<a " not in page and "href" not in page
    assert "![](http://127.0.0.1:9/beacon.png) &lt;img src=x" in page  # the text, as text
    assert beacon in shown(dash.data_alert)


def test_the_file_box_opens_only_files_under_the_root(tmp_path):
    inside = example_file(tmp_path / "root" / "a.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    outside = example_file(tmp_path / "b.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    dash = hd.dashboard(inside, root=tmp_path / "root")
    assert not dash.data_alert.visible and dash.data.sizes["t1"] == 20
    for path in (str(outside), str(tmp_path / "root" / ".." / "b.h5"), "/etc/passwd", "../b.h5"):
        dash.path = path
        assert dash.data_alert.visible and "opens only files under" in shown(dash.data_alert), path
        assert dash.data is None  # nothing loaded, nothing about the file told
    dash.path = str(tmp_path / "root" / "." / "a.h5")
    assert not dash.data_alert.visible and dash.data.sizes["t1"] == 20


def test_serve_refuses_bad_addresses_ports_and_roots(tmp_path):
    path = example_file(tmp_path / "a.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    with pytest.raises(hd.OptionError, match="neither an IP address nor a host name"):
        serve(path, address="999.999.999.999")
    with pytest.raises(hd.OptionError, match="port must be an integer >= 1 and <= 65535"):
        serve(path, port=70000)
    with pytest.raises(hd.OptionError, match="is not a folder"):
        serve(path, root=tmp_path / "nowhere")
    assert inspect.signature(serve).parameters["address"].default == "localhost"
    assert build_parser().parse_args(["dashboard", str(path)]).address == "localhost"


def _handshake(port: int, headers: dict, host: str = "127.0.0.1") -> str:
    """The status line the server answers a websocket upgrade of ``/ws`` with."""
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: bokeh, token",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return conn.recv(4096).decode(errors="replace").splitlines()[0]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The port of a dashboard served on the default address."""
    path = example_file(
        tmp_path_factory.mktemp("served") / "sample.h5", q=(0.01,), n_frames=20, phi=(0.0,)
    )
    with served(path) as port:
        yield port


def test_the_page_websocket_opens_only_from_a_served_page(default_server):
    port = default_server
    assert " 101 " in _handshake(port, {"Origin": f"http://localhost:{port}"})
    assert " 101 " in _handshake(port, {"Origin": f"http://127.0.0.1:{port}"})
    for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "http://localhost:1"}):
        assert " 403 " in _handshake(port, headers), headers


def test_the_server_listens_on_loopback_only(default_server):
    port = default_server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            own = probe.getsockname()[0]
        except OSError:
            own = "127.0.0.1"
    if own.startswith("127."):
        pytest.skip("this machine has no address beside loopback")
    with pytest.raises(OSError):
        socket.create_connection((own, port), timeout=5).close()


def test_plain_page_requests_do_not_read_the_file(tmp_path):
    """Each page request builds a session (what serve builds, recorded here); its file is
    read only once the page connects (its websocket), which a plain GET never does."""
    import panel as pn

    path = example_file(tmp_path / "sample.h5", q=(0.01,), n_frames=20, phi=(0.0,))
    built = []

    def session():
        built.append(_session(path, tmp_path))
        return built[-1]

    port = free_port()
    server = pn.serve({"/": session}, port=port, address="127.0.0.1", threaded=True, show=False)
    try:
        deadline = time.monotonic() + 30
        while len(built) < 4:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
                    assert response.status == 200
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        server.stop()
    assert [(dash.path, dash.data) for dash in built] == [("", None)] * 4


def test_joint_q_tab_fits_the_chosen_bins_of_a_multi_q_dataset():
    multi = hd.simulate(
        EXAMPLE_TRUTH, q=[0.006, 0.01, 0.014], phi=[[0, 45], [0, 90], [45, 90]],
        n_frames=40, noise=0.01, seed=4,
    )  # fmt: skip
    dash = hd.dashboard(multi)
    assert float(dash.data["q"]) == 0.006  # the Data tab shows one bin, with its angles
    np.testing.assert_array_equal(dash.data["phi"].values, [0.0, 45.0])
    dash.q = 0.014
    np.testing.assert_array_equal(dash.data["phi"].values, [45.0, 90.0])
    assert dash.joint_q == [0.006, 0.01, 0.014]
    dash.joint_q = [0.006, 0.014]
    dash.frames = (0, 30)
    dash.joint_button.clicks += 1
    result = dash.joint
    assert result is not None, shown(dash.joint_alert)
    np.testing.assert_array_equal(result.params["q"].values, [0.006, 0.014])
    assert result.data.sizes["t1"] == 30
    assert abs(result.value("v0") - EXAMPLE_TRUTH["v0"]) < 4 * result.error("v0")
    assert "[[Consistency]]" in dash.joint_text.object
    assert dash.joint_view.object is not None and not dash.joint_download.disabled
    dash.joint_q = []
    assert dash.joint is None and dash.joint_button.disabled


@pytest.mark.slow
def test_joint_q_tab_samples_the_joint_posterior_from_its_fit():
    """Run joint CMC waits for a joint fit, then samples every chosen bin with the CMC
    tab's settings, centred on that fit; a new joint fit drops the run."""
    multi = hd.simulate(
        EXAMPLE_TRUTH, q=[0.006, 0.014], phi=[[0, 45], [45, 90]], n_frames=24, noise=0.01,
        seed=4,
    )  # fmt: skip
    dash = hd.dashboard(multi)
    assert dash.joint_cmc_button.disabled
    dash.joint_cmc_button.clicks += 1  # pressed from code all the same: refused with the reason
    assert dash.joint_cmc is None and "Fit jointly" in shown(dash.joint_alert)
    dash.joint_button.clicks += 1
    assert dash.joint is not None and not dash.joint_cmc_button.disabled
    dash.param.update(shards=1, chains=2, warmup=60, samples=40)
    dash.joint_cmc_button.clicks += 1
    result = dash.joint_cmc
    assert result is not None, shown(dash.joint_alert)
    np.testing.assert_array_equal(result.q, [0.006, 0.014])
    assert result.info["shards"] == 2 and "shards: 2" in dash.joint_cmc_status.object
    assert [b.info["chains"] for b in result.bins] == [2, 2]
    assert abs(result.value("v0") - dash.joint.value("v0")) < 2 * dash.joint.error("v0")
    assert "[[Joint CMC fit]]" in dash.joint_cmc_text.object
    warned = dash.joint_alert.visible and dash.joint_alert.alert_type == "warning"
    assert warned != result.converged
    view, plot = dash.joint_cmc_view.object, result.plot()  # the run's own plot is shown
    assert type(view) is type(plot) and len(view) == len(plot) > 0
    dash.joint_button.clicks += 1
    assert dash.joint_cmc is None and dash.joint_cmc_text.object == ""
    assert dash.joint_cmc_view.object is None
