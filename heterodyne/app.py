"""The panel dashboard: pick the data, look at it, fit it by NLSQ and CMC, download results.

``hd.dashboard(path_or_ds)`` returns a :class:`Dashboard`, one object for JupyterLab
(after ``pn.extension("tabulator", inline=True)`` in the notebook) and for a server
(:func:`serve`, ``heterodyne dashboard FILE``, or ``panel serve`` of a script that calls
``hd.dashboard(path).servable()``). Four tabs:

- Data: file, q-bin, angles and frame window, the time of stored frame 0 and frames to
  exclude; the file's intensity trace, ``c2`` heatmaps, one-time cuts, a summary;
- NLSQ: the parameter table (value, vary, min, max, editable), scaling, multistart, Fit;
  the report, the fit plots and the result as netCDF;
- CMC: shards, chains, warmup, samples, warm start from the NLSQ fit, Run; the report,
  the diagnostics coloured by their thresholds and the posterior as netCDF;
- Ageing: window and step in frames, Scan (:func:`heterodyne.age_scan`, against the
  laws of the NLSQ fit when there is one); the check against the law and the effective
  rates against age (:func:`heterodyne.plot.age`).
- Joint q: pick q-bins and fit them together (:mod:`heterodyne.joint`) with the NLSQ
  tab's table and options, every angle of each bin and the Data tab's frames and times;
  the report, the per-q consistency check and rates against q² and q, the result as
  netCDF; Run joint CMC samples the joint posterior from that fit
  (:mod:`heterodyne.joint_cmc`) with the CMC tab's shards per bin, chains, warmup,
  samples and seed. The source may be a multi-q Dataset (the Data tab then shows one
  bin of it).

A fit runs in a worker thread while the page stays live, with its elapsed time (and,
for CMC, the finished shards) shown. Errors (a bad file, bad parameters, a failed fit)
appear as an alert at the top of the page.
"""

from __future__ import annotations

import asyncio
import html
import io
import re
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
import xarray as xr
from bokeh.models import StringFormatter
from bokeh.server.auth_provider import AuthProvider
from panel.custom import JSComponent

from heterodyne import checks, diagnostics, plot, qbins
from heterodyne.cmc import PAIRS_PER_SHARD, SAMPLES, WARMUP, fit_cmc
from heterodyne.cmc_result import CMCResult
from heterodyne.data import select, time_origin, validate
from heterodyne.errors import Cancelled, FileFormatError, OptionError, ParameterError
from heterodyne.io import frame_list, intensity, load, q_values
from heterodyne.joint_cmc import JointCMCResult
from heterodyne.joint_result import JointResult
from heterodyne.nlsq import fit_nlsq
from heterodyne.nlsq_result import NLSQResult
from heterodyne.objective import SCALINGS
from heterodyne.parameters import PHYSICS, PHYSICS_NAMES, SCALING, SCALING_NAMES, Parameters
from heterodyne.results import entry_label, index_of
from heterodyne.tracker import Tracker
from heterodyne.uncertainty import ERRORS

AGE_WINDOW = 100  # frames per window of the Ageing tab's first scan
POLL_S = 0.25  # how often the page's progress is refreshed while a fit runs [s]
# A closed page's session (and its CMC run) ends within CLOSED_S + CHECK_S; a page has
# CLOSED_S from its request to open its websocket on a busy machine.
CLOSED_S = 4.0
CHECK_S = 1.0
CMC_LIMITS = {"shards": 1, "chains": 1, "warmup": 0, "samples": 4, "seed": 0}  # least values
BAD_INPUT = "input { background-color: #f8d7da; }"  # FAIL_STYLE's colour
TABLE_COLUMNS = ("name", "value", "vary", "min", "max", "unit")
REPORT_WIDTH = 900  # [px]: the widest a report gets; narrower windows wrap it
# Text reports keep their columns but wrap long lines (warnings) inside their card.
TEXT_STYLESHEET = "pre { font-size: 11px; white-space: pre-wrap; overflow-wrap: anywhere; }"
PASS_STYLE = "background-color: #d4edda"  # bootstrap's success/danger alert colours
FAIL_STYLE = "background-color: #f8d7da"


def dashboard(source, params=None, *, root=None) -> Dashboard:
    """The dashboard of a file or a Dataset: data views, NLSQ and CMC fits.

    Parameters
    ----------
    source : str, path-like or xarray.Dataset
        A file :func:`heterodyne.load` reads (APS-U / legacy HDF5, heterodyne netCDF), or
        a canonical Dataset.
    params : Parameters or dict, optional
        Start values, bounds and ``vary`` of the parameter table; default the MODEL.md
        table. ``contrast``/``offset`` take one value for all angles, or ``None`` to
        estimate them per angle from the data.
    root : path, optional
        A folder: the file box then opens only files under it (:func:`serve` sets it);
        default any file.

    Returns
    -------
    Dashboard
        A ``panel`` viewer: display it in JupyterLab, or serve it.

    Examples
    --------
    >>> import panel as pn
    >>> pn.extension("tabulator", inline=True)  # doctest: +SKIP
    >>> hd.dashboard("sample_0001.h5")  # doctest: +SKIP
    """
    return Dashboard(source, params, root=root)


def serve(
    source,
    *,
    port: int = 5006,
    address: str = "localhost",
    show: bool = False,
    root=None,
    t_start: float | None = None,
    **kwargs,
):
    """Serve the dashboard of ``source`` with ``pn.serve``, one :class:`Dashboard` per
    browser session, at ``http://ADDRESS:PORT/``.

    Safe by default: it listens on ``localhost`` only; the page's websocket is accepted
    only from pages of the served address (``websocket_origin``) and only with an
    ``Origin`` header (as browsers send); the file box opens only files under ``root``
    (default: the folder of ``source``); a session reads the file only once its page
    connects, so plain requests of the page load nothing. To reach it from another
    machine, forward the port over SSH (``ssh -L 5006:localhost:5006 HOST``) rather than
    listening on a network address.

    ``source`` is checked here, so that a bad file fails now rather than in the page;
    ``t_start`` is the time [s] of its stored frame 0 (:func:`heterodyne.load`). A closed
    page stops its session's CMC run within ``CLOSED_S + CHECK_S`` seconds.
    ``kwargs`` go to ``pn.serve`` (``threaded``, ``liveness``, ``start``...); the server
    (or its thread) is returned.
    """
    address = checks.host_address(address)
    port = checks.integer(port, "port", minimum=1, maximum=65535)
    checks.flag(show, "show")
    if isinstance(source, xr.Dataset):
        validate(source)
        folder = None if root is None else checks.file_path(root, "root", kind="folder")
    else:
        source = checks.readable_file(source, "source")
        q_values(source)
        folder = source.parent if root is None else checks.file_path(root, "root", kind="folder")
    if folder is not None and not folder.is_dir():
        raise OptionError(f"root {folder} is not a folder")
    origins = served_origins(address, port)
    root = None if folder is None else folder.resolve()

    def session():  # a function: panel calls it per session (a partial it would display)
        return _session(source, root, t_start)

    return pn.serve(
        {"/": session},
        port=port,
        address=address,
        show=show,
        title="heterodyne",
        # bokeh's allow-list does not parse bracketed IPv6 hosts
        websocket_origin=[origin for origin in origins if not origin.startswith("[")],
        auth_provider=BrowserPagesOnly(origins),
        **{
            "unused_session_lifetime_milliseconds": int(1000 * CLOSED_S),
            "check_unused_sessions_milliseconds": int(1000 * CHECK_S),
            **kwargs,
        },
    )


def served_origins(address: str, port: int) -> list[str]:
    """The ``HOST:PORT`` origins whose pages may open the websocket: the served address,
    and for a loopback or wildcard address the names of this machine's loopback."""
    local = [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"]
    if address in ("localhost", "127.0.0.1", "::1"):
        return local
    if address in ("0.0.0.0", "::"):
        return [*local, f"{socket.gethostname()}:{port}", f"{socket.getfqdn()}:{port}"]
    return [f"[{address}]:{port}" if ":" in address else f"{address}:{port}"]


class BrowserPagesOnly(AuthProvider):
    """Lets a websocket in only with an ``Origin`` header naming one of ``origins``.

    Tornado (and so bokeh's ``websocket_origin``) let a websocket without an ``Origin``
    header through, which any program can open; a page served here sends one. Plain HTTP
    requests (the page, its resources) pass: there is no user login.
    """

    def __init__(self, origins):
        self._origins = {origin.lower() for origin in origins}
        super().__init__()

    @property
    def get_user(self):
        return self._user

    @property
    def login_url(self):
        return "/"  # required with get_user by bokeh; a refused websocket gets a 403

    def _user(self, handler):
        request = handler.request
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return "local"
        origin = request.headers.get("Origin")
        if origin is None or urlparse(origin).netloc.lower() not in self._origins:
            return None
        return "local"


def _session(source, root, t_start=None):
    """The Dashboard of one browser session; a file is read once the page connects."""
    if isinstance(source, xr.Dataset):
        return Dashboard(source, root=root)
    dash = Dashboard(root=root, t_start=t_start)
    pn.state.onload(lambda: setattr(dash, "path", str(source)))
    pn.state.on_session_destroyed(lambda _context: dash.cancel())  # a closed page
    return dash


class TabRoles(JSComponent):
    """Gives the page's tab headers their ARIA roles, which bokeh's tabs lack: the header
    a ``tablist``, each tab a ``tab`` with ``aria-selected`` (screen readers, keyboard
    users and tests find the tabs by role). It draws nothing."""

    _esm = """
export function render({ el }) {
  el.style.display = "none";
  const options = {subtree: true, childList: true, attributes: true, attributeFilter: ["class"]};
  const seen = new WeakSet();
  let queued = false;
  const observer = new MutationObserver(() => {
    if (!queued) {
      queued = true;
      requestAnimationFrame(() => { queued = false; mark(document); });
    }
  });
  // bokeh draws inside shadow roots: walk them, and watch each once
  function mark(root) {
    for (const header of root.querySelectorAll(".bk-header")) {
      header.setAttribute("role", "tablist");
    }
    for (const tab of root.querySelectorAll(".bk-tab")) {
      tab.setAttribute("role", "tab");
      tab.setAttribute("aria-selected", String(tab.classList.contains("bk-active")));
    }
    for (const node of root.querySelectorAll("*")) {
      if (node.shadowRoot) {
        if (!seen.has(node.shadowRoot)) {
          seen.add(node.shadowRoot);
          observer.observe(node.shadowRoot, options);
        }
        mark(node.shadowRoot);
      }
    }
  }
  observer.observe(document.body, options);
  mark(document);
}
"""


class Dashboard(pn.viewable.Viewer):
    """Data, NLSQ, CMC and Ageing tabs over one file or Dataset; build it with
    :func:`dashboard`.

    The settings are ``param`` parameters, shared by the widgets and by code
    (``dash.multistart = 4``); the results are ``dash.data`` (the selected Dataset),
    ``dash.nlsq``, ``dash.cmc`` and ``dash.ageing``. ``dash.nlsq_button.clicks += 1``
    presses Fit (``ageing_button``: Scan).
    """

    path = param.String(default="", doc="File on the server; empty for an in-memory Dataset.")
    q = param.Selector(objects=[], doc="q-bin [1/Å].")
    phi = param.ListSelector(default=[], objects=[], doc="Angles to fit [deg].")
    frames = param.Range(default=(0, 3), bounds=(0, 3), doc="Frame window [a, b).")
    t_start = param.Number(
        default=None,
        allow_None=True,
        doc="Time [s] of the file's stored frame 0; empty: the file's.",
    )
    exclude = param.String(default="", doc="Stored frames to exclude, e.g. '40:43, 90'.")
    scaling = param.Selector(objects=list(SCALINGS), default="per_angle")
    multistart = param.Selector(
        objects=["auto", 0, 1, 2, 4, 8, 16],
        default="auto",
        doc="NLSQ starts: 'auto' (the data's best estimates) or extra starts from a design.",
    )
    errors = param.Selector(
        objects=list(ERRORS),
        default="nominal",
        doc="Error bars of NLSQ (and of CMC started from it): 'speckle' accounts for the "
        "correlated noise of two-time pairs, 'nominal' treats the pairs as independent.",
    )
    # No bounds here: a value out of range is kept, marked and explained beside the
    # inputs (CMC_LIMITS), never silently reset by the widget.
    shards = param.Integer(default=1)
    chains = param.Integer(default=2)
    warmup = param.Integer(default=WARMUP)
    samples = param.Integer(default=SAMPLES)
    seed = param.Integer(default=0)
    warm_start = param.Boolean(
        default=True,
        doc="Start CMC from the last NLSQ fit, with priors centred on it; unticked, from "
        "the table's values with uniform priors on its bounds.",
    )
    data = param.ClassSelector(class_=xr.Dataset, allow_None=True, doc="The selected Dataset.")
    nlsq = param.ClassSelector(class_=NLSQResult, allow_None=True, doc="The last NLSQ fit.")
    cmc = param.ClassSelector(class_=CMCResult, allow_None=True, doc="The last CMC run.")
    window = param.Integer(default=AGE_WINDOW, doc="Frames per window of the age scan.")
    step = param.Integer(default=AGE_WINDOW, doc="Frames between the age scan's windows.")
    ageing = param.ClassSelector(
        class_=xr.Dataset, allow_None=True, doc="The last age scan (hd.age_scan)."
    )
    joint_q = param.ListSelector(default=[], objects=[], doc="q-bins of the joint fit [1/Å].")
    joint = param.ClassSelector(class_=JointResult, allow_None=True, doc="The last joint fit.")
    joint_cmc = param.ClassSelector(
        class_=JointCMCResult, allow_None=True, doc="The last joint CMC run (of `joint`)."
    )

    def __init__(self, source=None, params=None, *, root=None, **kwargs):
        super().__init__(**kwargs)
        #: the folder the file box may read under; None: anywhere
        self._root = None if root is None else Path(root).expanduser().resolve()
        self._full = None  # the loaded q-bin, all angles and frames
        self._multi = None  # a multi-q Dataset given as the source
        self._resetting = False  # True while the selectors are reset to a new q-bin
        # one alert per tab, at its top: a CMC warning stays on the CMC tab
        alerts = (
            pn.pane.Alert(
                "",
                alert_type="danger",
                visible=False,
                css_classes=["hd-alert", f"hd-{tab}-alert"],
                sizing_mode="stretch_width",
            )
            for tab in ("data", "nlsq", "cmc", "ageing", "joint")
        )
        (self.data_alert, self.nlsq_alert, self.cmc_alert, self.ageing_alert, self.joint_alert) = (
            alerts
        )
        self._build_data_tab()
        self._build_nlsq_tab(Parameters.coerce(params))
        self._build_cmc_tab()
        self._build_ageing_tab()
        self._build_joint_tab()
        self._layout = pn.Column(
            pn.pane.Markdown("## heterodyne", margin=(0, 10)),
            TabRoles(),
            pn.Tabs(
                ("Data", self._data_tab),
                ("NLSQ", self._nlsq_tab),
                ("CMC", self._cmc_tab),
                ("Ageing", self._ageing_tab),
                ("Joint q", self._joint_tab),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )
        if qbins.is_multi_q(source):
            self._multi = qbins.validate_multi(source)
            q = [float(v) for v in source["q"].values]
            self.param.q.objects = {f"{v:.5g}": v for v in q}
            self._set_joint_bins(q)
            self._set_full(select(source, q=q[0]))
        elif isinstance(source, xr.Dataset):
            self._set_full(validate(source))
        elif source is not None:
            self.path = str(source)

    def __panel__(self):
        return self._layout

    # ---- Data ------------------------------------------------------------------------

    def _build_data_tab(self):
        self.file_input = pn.widgets.TextInput.from_param(
            self.param.path, name="file", placeholder="path of an HDF5 or netCDF file", width=500
        )
        self.q_select = pn.widgets.Select.from_param(self.param.q, name="q [1/Å]", width=150)
        self.phi_select = pn.widgets.CheckButtonGroup.from_param(
            self.param.phi, name="angles [deg]", button_type="primary", button_style="outline"
        )
        self.frames_slider = pn.widgets.IntRangeSlider.from_param(
            self.param.frames, name="frames [a, b)", throttled=True, width=300
        )
        self.t_start_input = pn.widgets.FloatInput.from_param(
            self.param.t_start, name="t_start [s] (frame 0)", width=150
        )
        self.exclude_input = pn.widgets.TextInput.from_param(
            self.param.exclude, name="exclude frames", placeholder="e.g. 40:43, 90", width=200
        )
        self.intensity_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-intensity"])
        self._trace = None  # the file's intensity trace, when it has one
        self.summary = pn.pane.HTML("", css_classes=["hd-summary"])
        self.c2_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-c2-plots"])
        self.cuts_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-cuts-plots"])
        self._data_tab = pn.Column(
            self.data_alert,
            pn.Row(self.file_input, self.q_select),
            pn.Row(
                pn.Column(pn.pane.Markdown("angles [deg]", margin=(0, 10)), self.phi_select),
                self.frames_slider,
            ),
            pn.Row(self.t_start_input, self.exclude_input),
            self.intensity_view,
            self.summary,
            self.c2_view,
            self.cuts_view,
            sizing_mode="stretch_width",
        )

    @param.depends("path", watch=True)
    def _open_file(self):
        try:
            self._check_under_root(self.path)
            qs = q_values(self.path)
            try:
                self._trace = intensity(self.path)
            except FileFormatError:
                self._trace = None
            self.param.q.objects = {f"{q:.5g}": float(q) for q in qs}
            self._set_joint_bins([float(q) for q in qs])
            self._resetting = True
            try:
                self.q = float(qs[0])
            finally:
                self._resetting = False
            self._load_q()
        except Exception as err:  # the page is where the user sees it
            self._fail(f"cannot open {self.path}", err, self.data_alert)
            self._forget()

    def _forget(self):
        """No data: empty the selectors and views of the previous file."""
        self._full = self._trace = None
        self._resetting = True
        try:
            self.param.phi.objects = {}
            self.param.update(phi=[], frames=(0, 0))
        finally:
            self._resetting = False
        self.intensity_view.object = None
        self.data = None

    def _check_under_root(self, path: str):
        """Raise ``OptionError`` for a path outside the folder this dashboard may read,
        before anything about it (even whether it exists) is looked up."""
        if self._root is None:
            return
        if not Path(path).expanduser().resolve().is_relative_to(self._root):
            raise OptionError(
                f"this dashboard opens only files under {self._root}; give a path there"
            )

    @param.depends("q", "t_start", "exclude", watch=True)
    def _load_q(self):
        if not self._resetting and self._multi is not None and not self.path:
            self._set_full(select(self._multi, q=self.q))
            return
        if self._resetting or not self.path:
            return
        try:
            excluded = frame_list(self.exclude)
            self._set_full(load(self.path, q=self.q, t_start=self.t_start, exclude_frames=excluded))
        except Exception as err:
            self._fail(
                f"cannot read q = {self.q:g} 1/Å of {self.path} (kept the last data)",
                err,
                self.data_alert,
            )
            return
        self.intensity_view.object = _intensity_plot(self._trace, excluded)

    def _set_full(self, ds: xr.Dataset):
        """Take ``ds`` as the loaded q-bin: reset the angle and frame selectors to all."""
        self._full = ds
        phi = [float(v) for v in ds["phi"].values]
        n = ds.sizes["t1"]
        self.param.phi.objects = {f"{v:g}": v for v in phi}
        self.param.frames.bounds = (0, n)
        if not self.path and self._multi is None:
            self.param.q.objects = {f"{float(ds['q']):.5g}": float(ds["q"])}
        self._resetting = True
        try:
            self.param.update(phi=phi, frames=(0, n), q=float(ds["q"]))
        finally:
            self._resetting = False
        self.file_input.disabled = self.t_start_input.disabled = not self.path
        self.exclude_input.disabled = not self.path
        self.q_select.disabled = len(self.param.q.objects) < 2
        self._select()

    @param.depends("phi", "frames", watch=True)
    def _select(self):
        if self._resetting or self._full is None:
            return
        try:
            if not self.phi:
                self.data = None  # no plot of an angle that is not selected
                raise OptionError("select at least one angle")
            a, b = (int(v) for v in self.frames)
            self.data = select(self._full, phi=self.phi, frames=slice(a, b))
        except Exception as err:
            self._fail("cannot select these data (kept the last selection)", err, self.data_alert)
            return
        self.data_alert.visible = False

    @param.depends("data", watch=True)
    def _show_data(self):
        self.nlsq = None
        self.cmc = None
        self.ageing = None
        ds = self.data
        ready = ds is not None
        self.nlsq_button.disabled = not ready or bool(self._problems)
        self.cmc_button.disabled = self.ageing_button.disabled = not ready
        self._check_cmc_settings()
        if not ready:
            self.summary.object, self.c2_view.object, self.cuts_view.object = "", None, None
            return
        n = ds.sizes["t1"]
        if self.window > n:  # a window of at most a fifth of the frames: five ages or more
            self.window = self.step = max(n // 5, 3)
        fitted = _pairs(ds) - int(ds.attrs.get("nan_pairs", 0))
        self.shards = max(1, -(-fitted // PAIRS_PER_SHARD))  # fit_cmc's shards="auto"
        self.summary.object = _summary_html(ds)
        self.c2_view.object = plot.c2(ds)
        self.cuts_view.object = plot.cuts(ds)

    # ---- NLSQ ------------------------------------------------------------------------

    def _build_nlsq_tab(self, params: Parameters):
        self._start = params.copy()
        numbers = ("value", "min", "max")
        self.table = pn.widgets.Tabulator(
            parameter_frame(params),
            show_index=False,
            # text editors: what was typed reaches the check as typed, never as a blank
            editors={"name": None, "unit": None, **dict.fromkeys(numbers, "input")},
            # numbers as typed (1e+07, never a cut "10,000,00"); blank: from the data
            formatters=dict.fromkeys(
                numbers, StringFormatter(text_align="right", nan_format="(data)")
            ),
            layout="fit_data_table",
            css_classes=["hd-parameters"],
        )
        self._problems = {}  # (row, column) -> why the cell cannot be used
        self.table.style.apply(self._mark_problems, axis=None)
        self.table.on_edit(lambda _event: self._check_table())
        self.table.param.watch(lambda _event: self._check_table(), "value")
        self.table_message = pn.pane.Alert(
            "", alert_type="danger", visible=False, css_classes=["hd-table-message"], width=300
        )
        self.nlsq_button = pn.widgets.Button(
            name="Fit", button_type="primary", disabled=True, width=120
        )
        self.nlsq_button.on_click(self._on_fit)
        self.from_fit_button = pn.widgets.Button(
            name="Start from the fit", disabled=True, width=160
        )
        self.from_fit_button.on_click(self._on_start_from_fit)
        self.nlsq_progress = pn.indicators.Progress(
            value=-1, active=False, visible=False, width=300, bar_color="primary"
        )
        self.nlsq_status = pn.pane.Markdown("", css_classes=["hd-nlsq-status"])
        self.nlsq_download = pn.widgets.FileDownload(
            callback=self._nlsq_netcdf,
            filename="heterodyne_nlsq.nc",
            label="Download the result (netCDF)",
            disabled=True,
            embed=False,
            width=260,
        )
        self.nlsq_report = pn.pane.HTML(
            "", css_classes=["hd-nlsq-report"], sizing_mode="stretch_width", max_width=REPORT_WIDTH
        )
        self.nlsq_text = pn.pane.Str("", stylesheets=[TEXT_STYLESHEET], sizing_mode="stretch_width")
        self.nlsq_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-nlsq-plots"])
        self.nlsq_cuts = pn.pane.HoloViews(None, backend="bokeh")
        controls = pn.Column(
            self.table_message,
            pn.widgets.RadioButtonGroup.from_param(self.param.scaling, name="scaling"),
            pn.widgets.RadioButtonGroup.from_param(
                self.param.errors, name="error bars", css_classes=["hd-errors"]
            ),
            pn.widgets.Select.from_param(
                self.param.multistart, name="multistart", width=120, css_classes=["hd-multistart"]
            ),
            pn.Row(self.nlsq_button, self.from_fit_button),
            self.nlsq_progress,
            self.nlsq_status,
            self.nlsq_download,
        )
        self._nlsq_tab = pn.Column(
            self.nlsq_alert,
            pn.FlexBox(self.table, controls, gap="10px"),
            self.nlsq_report,
            _text_card(self.nlsq_text),
            self.nlsq_view,
            self.nlsq_cuts,
            sizing_mode="stretch_width",
        )

    def _check_table(self):
        """Mark the cells that cannot be used and say why, as they are edited."""
        self._problems = table_problems(self.table.value)
        self.table_message.param.update(
            object="\n".join(f"- {markdown_text(m)}" for m in self._problems.values()),
            visible=bool(self._problems),
        )
        self.nlsq_button.disabled = bool(self._problems) or self.data is None

    def _mark_problems(self, frame: pd.DataFrame) -> pd.DataFrame:
        styles = pd.DataFrame("", index=frame.index, columns=frame.columns)
        for (row, column), _ in self._problems.items():
            if row < len(frame):
                styles.iloc[row, frame.columns.get_loc(column)] = FAIL_STYLE
        return styles

    def parameters(self) -> Parameters:
        """The parameter table as a ``Parameters`` (checked against the data's angles).

        Raises ``ParameterError`` for a value outside its bounds, a missing physics value
        or a bound that is not a number.
        """
        p = self._start.copy()
        for row in self.table.value.itertuples(index=False):
            entry = p[row.name]
            entry.vary = bool(row.vary)
            # only edited cells are set: an unedited v0 max stays the data's default bound
            low, high, value = _number(row.min), _number(row.max), _number(row.value)
            if low != entry.min:
                entry.min = low
            if high != entry.max:
                entry.max = high
            if np.isnan(value):
                # blank: contrast/offset per angle, physics from the data (hd.fit_nlsq)
                if row.name in SCALING_NAMES:
                    entry.value = None
            elif not (entry.given and np.ndim(entry.value) == 0 and entry.value == value):
                entry.value = value
        p.validate(None if self.data is None else self.data.sizes["phi"])
        return p

    def fit_options(self) -> dict:
        """The NLSQ tab's options of ``fit_nlsq``: scaling, multistart, error bars."""
        return {"scaling": self.scaling, "multistart": self.multistart, "errors": self.errors}

    async def _on_fit(self, _event=None):
        ds = self.data
        try:
            params = self.parameters()
            options = self.fit_options()
            self._busy(True)
            self.nlsq_progress.param.update(visible=True, active=True, value=-1)

            def report(seconds):
                self.nlsq_status.object = f"fitting... {seconds:.0f} s"

            result, seconds = await self._in_thread(
                lambda: fit_nlsq(ds, params, progress=False, **options), report
            )
        except Exception as err:
            self._fail("the NLSQ fit failed", err, self.nlsq_alert)
            self.nlsq_status.object = ""
            return
        finally:
            self.nlsq_progress.param.update(visible=False, active=False)
            self._busy(False)
        verdict = result.verdict
        self.nlsq_status.object = (
            f"fitted in {seconds:.1f} s: verdict **{verdict.status.upper()}**, reduced χ² = "
            f"{result.reduced_chi2:.4g}"
        )
        if verdict.status == "ok":
            self.nlsq_alert.visible = False
        else:
            self._warn(
                f"NLSQ verdict {verdict.status.upper()}: {'; '.join(verdict.reasons)}",
                self.nlsq_alert,
            )
        await self._publish(
            (self.nlsq_report, self.nlsq_text, self.nlsq_view, self.nlsq_cuts), nlsq=result
        )

    def _on_start_from_fit(self, _event=None):
        frame = self.table.value.copy()
        for k, name in enumerate(frame["name"]):
            if name in PHYSICS_NAMES:
                frame.loc[k, "value"] = self.nlsq.value(name)
        self.table.value = frame

    @param.depends("nlsq", watch=True)
    def _show_nlsq(self):
        result = self.nlsq
        self.nlsq_download.disabled = self.from_fit_button.disabled = result is None
        if result is None:
            self.nlsq_report.object = self.nlsq_text.object = ""
            self.nlsq_view.object = self.nlsq_cuts.object = None
            return
        self.nlsq_report.object = result._repr_html_()
        self.nlsq_text.object = result.report()
        self.nlsq_view.object = result.plot()
        self.nlsq_cuts.object = plot.cuts(result.data, result)

    def _nlsq_netcdf(self):
        return _netcdf_bytes(self.nlsq)

    # ---- CMC -------------------------------------------------------------------------

    def _build_cmc_tab(self):
        def number(name, **kwargs):
            self.cmc_inputs[name] = pn.widgets.IntInput.from_param(
                self.param[name], width=110, css_classes=[f"hd-cmc-{name}"], **kwargs
            )
            return self.cmc_inputs[name]

        self.cmc_inputs = {}
        self.cmc_message = pn.pane.Alert(
            "", alert_type="danger", visible=False, css_classes=["hd-cmc-message"]
        )

        self.cmc_warm = pn.widgets.Checkbox.from_param(
            self.param.warm_start,
            name="warm start from the NLSQ fit",
            css_classes=["hd-cmc-warm-start"],
        )
        self.cmc_button, self.cmc_cancel = self._run_buttons("Run", 120, self._on_run)
        self._tracker = None  # the running CMC run's, while it runs
        self._running = None  # its Cancel button and status pane, while it runs
        self.cmc_progress = pn.indicators.Progress(
            value=0, max=1, visible=False, width=300, bar_color="primary"
        )
        self.cmc_status = pn.pane.Markdown("", css_classes=["hd-cmc-status"])
        self.cmc_download = pn.widgets.FileDownload(
            callback=self._cmc_netcdf,
            filename="heterodyne_cmc.nc",
            label="Download the posterior (netCDF)",
            disabled=True,
            embed=False,
            width=260,
        )
        self.cmc_report = pn.pane.HTML(
            "", css_classes=["hd-cmc-report"], sizing_mode="stretch_width", max_width=REPORT_WIDTH
        )
        self.cmc_text = pn.pane.Str("", stylesheets=[TEXT_STYLESHEET], sizing_mode="stretch_width")
        self.cmc_shards = pn.pane.HTML("", css_classes=["hd-cmc-diagnostics"])
        self.cmc_parameters = pn.pane.HTML("", css_classes=["hd-cmc-parameters"])
        self.cmc_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-cmc-plots"])
        self._cmc_tab = pn.Column(
            self.cmc_alert,
            pn.Row(
                number("shards"),
                number("chains"),
                number("warmup", step=100),
                number("samples", step=100),
                number("seed"),
            ),
            self.cmc_message,
            self.cmc_warm,
            pn.Row(self.cmc_button, self.cmc_cancel),
            self.cmc_progress,
            self.cmc_status,
            self.cmc_download,
            pn.FlexBox(
                pn.Column(
                    pn.pane.Markdown("#### Diagnostics by shard"),
                    self.cmc_shards,
                    pn.pane.Markdown("#### Diagnostics by parameter (worst shard)"),
                    self.cmc_parameters,
                ),
                self.cmc_report,
                gap="10px",
            ),
            _text_card(self.cmc_text),
            self.cmc_view,
            sizing_mode="stretch_width",
        )

    async def _on_run(self, _event=None):
        ds = self.data
        try:
            init = None
            params = None
            if self.warm_start:
                if self.nlsq is None:
                    raise OptionError(
                        "warm start needs an NLSQ fit: run it in the NLSQ tab first, or "
                        "untick the warm start (the chains then start at the table's values "
                        "with uniform priors on its bounds)"
                    )
                init = self.nlsq
            else:
                params = self.parameters()
            options = self.cmc_options(scaling=None if init is not None else self.scaling)
            steps = self.shards * self.chains * (self.warmup + self.samples)
            self._busy(True)
            self.cmc_progress.param.update(visible=True, value=0, max=steps)

            def report(seconds, tracker):
                done = tracker.steps
                self.cmc_progress.value = done
                if done < steps:
                    self.cmc_status.object = (
                        f"sampling... {done:,} of {steps:,} draws ({self.shards} shard(s) x "
                        f"{self.chains} chains x {self.warmup} warmup + {self.samples}), "
                        f"{seconds:.0f} s"
                    )
                else:
                    self.cmc_status.object = (
                        f"sampled {steps:,} draws; combining the shards and computing the "
                        f"diagnostics... {seconds:.0f} s"
                    )

            result, seconds = await self._sample(
                lambda tracker: fit_cmc(ds, init, params=params, progress=tracker, **options),
                steps,
                self.cmc_cancel,
                self.cmc_status,
                report,
            )
        except Cancelled:
            self.cmc_alert.visible = False
            return
        except Exception as err:
            self._fail("the CMC run failed", err, self.cmc_alert)
            self.cmc_status.object = ""
            return
        finally:
            self.cmc_progress.visible = False
            self._busy(False)
        n_shards = result.info["shards"]
        failed = result.failures()
        if failed:
            self._warn(
                f"CMC did not converge: {len(failed)} of {n_shards} shard(s) fail their "
                f"diagnostics (shard {', '.join(map(str, failed))}, counted from 0; red in the "
                "tables below); do not use this posterior as is",
                self.cmc_alert,
            )
        else:
            self.cmc_alert.visible = False
        self.cmc_status.object = f"sampled in {seconds:.1f} s; drawing the report and plots..."
        await self._publish((self.cmc_report, self.cmc_view, self.cmc_shards), cmc=result)
        self.cmc_status.object = f"sampled in {seconds:.1f} s; shards: {n_shards}"

    @param.depends("shards", "chains", "warmup", "samples", "seed", watch=True)
    def _check_cmc_settings(self):
        """Mark the CMC settings out of range, say why beside them, and hold Run."""
        n_frames = None if self.data is None else self.data.sizes["t1"]
        problems = cmc_setting_problems(
            {name: getattr(self, name) for name in CMC_LIMITS}, n_frames
        )
        for name, box in self.cmc_inputs.items():
            box.stylesheets = [BAD_INPUT] if name in problems else []
        self.cmc_message.param.update(
            object="\n".join(f"- {markdown_text(m)}" for m in problems.values()),
            visible=bool(problems),
        )
        self.cmc_button.disabled = bool(problems) or self.data is None

    def cmc_options(self, **more) -> dict:
        """The CMC tab's settings as options of :func:`heterodyne.fit_cmc` (and the NLSQ
        tab's error bars), with ``more``."""
        names = ("shards", "chains", "warmup", "samples", "seed", "errors")
        return {**{name: getattr(self, name) for name in names}, **more}

    def cancel(self):
        """Stop the running CMC run at its chains' next report (the Cancel button; a
        closed page); nothing if none runs."""
        if self._tracker is not None:
            self._tracker.cancel()
            cancel, status = self._running
            cancel.disabled = True
            status.object = "cancelling..."

    @param.depends("cmc", watch=True)
    def _show_cmc(self):
        result = self.cmc
        self.cmc_download.disabled = result is None
        if result is None:
            self.cmc_report.object = self.cmc_text.object = ""
            self.cmc_shards.object = self.cmc_parameters.object = ""
            self.cmc_view.object = None
            return
        self.cmc_report.object = result._repr_html_()
        self.cmc_text.object = result.report()
        shards, by_parameter = diagnostics_tables(result)
        self.cmc_shards.object = shards.to_html()
        self.cmc_parameters.object = by_parameter.to_html()
        self.cmc_view.object = result.plot()

    def _cmc_netcdf(self):
        return _netcdf_bytes(self.cmc)

    # ---- Ageing ----------------------------------------------------------------------

    def _build_ageing_tab(self):
        self.ageing_button = pn.widgets.Button(
            name="Scan", button_type="primary", disabled=True, width=120
        )
        self.ageing_button.on_click(self._on_scan)
        self.ageing_status = pn.pane.Markdown("", css_classes=["hd-ageing-status"])
        self.ageing_text = pn.pane.Str(
            "", stylesheets=[TEXT_STYLESHEET], sizing_mode="stretch_width"
        )
        self.ageing_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-ageing"])
        controls = pn.Row(
            pn.widgets.IntInput.from_param(self.param.window, name="window [frames]", width=140),
            pn.widgets.IntInput.from_param(self.param.step, name="step [frames]", width=140),
            pn.Column(pn.layout.Spacer(height=18), self.ageing_button),
        )
        self._ageing_tab = pn.Column(
            self.ageing_alert,
            pn.pane.Markdown(
                "Windows of frames along the diagonal, each fitted with constant rates "
                "(the laws frozen): the effective rates against age, checked against the "
                "laws of the NLSQ fit (or of a fit of the whole selection when there is "
                "none). Errors as chosen on the NLSQ tab.",
                max_width=REPORT_WIDTH,
            ),
            controls,
            self.ageing_status,
            self.ageing_view,
            _text_card(self.ageing_text),
            sizing_mode="stretch_width",
        )

    async def _on_scan(self, _event=None):
        from heterodyne.ageing import age_scan

        ds, law = self.data, self.nlsq
        options = {"window": self.window, "step": self.step, "law": law, "errors": self.errors}
        try:
            self._busy(True)

            def report(seconds):
                self.ageing_status.object = f"scanning... {seconds:.0f} s"

            scan, seconds = await self._in_thread(
                lambda: age_scan(ds, progress=False, **options), report
            )
        except Exception as err:
            self._fail("the age scan failed", err, self.ageing_alert)
            self.ageing_status.object = ""
            return
        finally:
            self._busy(False)
        self.ageing_status.object = (
            f"{scan.sizes['age']} windows in {seconds:.1f} s, against the laws of "
            f"{'the NLSQ fit' if law is not None else 'a fit of the whole selection'}"
        )
        self.ageing_alert.visible = False
        await self._publish((self.ageing_text, self.ageing_view), ageing=scan)

    @param.depends("ageing", watch=True)
    def _show_ageing(self):
        from heterodyne.ageing import report

        scan = self.ageing
        self.ageing_text.object = "" if scan is None else report(scan)
        self.ageing_view.object = None if scan is None else plot.age(scan)

    # ---- Joint q ---------------------------------------------------------------------

    def _build_joint_tab(self):
        self.joint_select = pn.widgets.CheckButtonGroup.from_param(
            self.param.joint_q, name="q-bins [1/Å]", button_type="primary", button_style="outline"
        )
        self.joint_button = pn.widgets.Button(
            name="Fit jointly", button_type="primary", disabled=True, width=140
        )
        self.joint_button.on_click(self._on_joint_fit)
        self.joint_status = pn.pane.Markdown("", css_classes=["hd-joint-status"])
        self.joint_download = pn.widgets.FileDownload(
            callback=lambda: _netcdf_bytes(self.joint),
            filename="heterodyne_joint.nc",
            label="Download the result (netCDF)",
            disabled=True,
            embed=False,
            width=260,
        )
        self.joint_text = pn.pane.Str(
            "", stylesheets=[TEXT_STYLESHEET], sizing_mode="stretch_width"
        )
        self.joint_view = pn.pane.HoloViews(None, backend="bokeh", css_classes=["hd-joint-plots"])
        self.joint_cmc_button, self.joint_cmc_cancel = self._run_buttons(
            "Run joint CMC", 140, self._on_joint_cmc
        )
        self.joint_cmc_status = pn.pane.Markdown("", css_classes=["hd-joint-cmc-status"])
        self.joint_cmc_text = pn.pane.Str(
            "", stylesheets=[TEXT_STYLESHEET], sizing_mode="stretch_width"
        )
        self.joint_cmc_view = pn.pane.HoloViews(
            None, backend="bokeh", css_classes=["hd-joint-cmc-plots"]
        )
        self._joint_tab = pn.Column(
            self.joint_alert,
            pn.pane.Markdown(
                "Fit the chosen q-bins together: the physics shared, contrast and offset per "
                "bin and angle. The parameters, scaling, error bars and starts are the NLSQ "
                "tab's; each bin keeps all its angles; frames and times are the Data tab's.",
                margin=(0, 10),
            ),
            pn.Column(pn.pane.Markdown("q-bins [1/Å]", margin=(0, 10)), self.joint_select),
            pn.Row(self.joint_button, self.joint_download),
            self.joint_status,
            _text_card(self.joint_text),
            self.joint_view,
            pn.pane.Markdown(
                "Sample the joint posterior from this fit: every bin split into the CMC "
                "tab's shards, with its chains, warmup, samples and seed; error bars as "
                "chosen on the NLSQ tab.",
                margin=(0, 10),
            ),
            pn.Row(self.joint_cmc_button, self.joint_cmc_cancel),
            self.joint_cmc_status,
            _text_card(self.joint_cmc_text),
            self.joint_cmc_view,
            sizing_mode="stretch_width",
        )

    def _set_joint_bins(self, q: list[float]):
        """Offer the q-bins ``q`` [1/Å] to the joint fit, all chosen."""
        self.param.joint_q.objects = {f"{v:.5g}": v for v in q}
        self.joint_q = list(q)

    @param.depends("joint_q", "data", watch=True)
    def _joint_ready(self):
        self.joint_button.disabled = self.data is None or not self.joint_q
        self.joint = None

    def joint_data(self) -> xr.Dataset:
        """The chosen q-bins (:attr:`joint_q`) as one multi-q Dataset, over the Data tab's
        frame window (and, for a file, its time of frame 0 and excluded frames)."""
        if not self.joint_q:
            raise OptionError("choose at least one q-bin")
        a, b = (int(v) for v in self.frames)
        if self.path:
            ds = load(
                self.path,
                q=sorted(self.joint_q),
                t_start=self.t_start,
                exclude_frames=frame_list(self.exclude),
            )
        else:
            ds = self._multi
        return select(ds, q=sorted(self.joint_q), frames=slice(a, b))

    async def _on_joint_fit(self, _event=None):
        try:
            params = self.parameters()
            ds = self.joint_data()
            options = self.fit_options()
            self._busy(True)
            self.joint_button.disabled = True

            def report(seconds):
                self.joint_status.object = f"fitting {ds.sizes['q']} q-bins... {seconds:.0f} s"

            result, seconds = await self._in_thread(
                lambda: fit_nlsq(ds, params, progress=False, **options), report
            )
        except Exception as err:
            self._fail("the joint fit failed", err, self.joint_alert)
            self.joint_status.object = ""
            return
        finally:
            self._busy(False)
            self.joint_button.disabled = self.data is None or not self.joint_q
        flagged = result.inconsistent()
        self.joint_status.object = (
            f"fitted {result.info['n_bins']} q-bins in {seconds:.1f} s: reduced χ² = "
            f"{result.reduced_chi2:.4g}"
        )
        if flagged:
            self._warn(
                "bins inconsistent with the joint fit: " + "; ".join(flagged), self.joint_alert
            )
        else:
            self.joint_alert.visible = False
        await self._publish((self.joint_text, self.joint_view), joint=result)

    @param.depends("joint", watch=True)
    def _show_joint(self):
        result = self.joint
        self.joint_download.disabled = result is None
        self.joint_text.object = "" if result is None else result.report()
        self.joint_view.object = None if result is None else result.plot()
        self.joint_cmc_button.disabled = result is None
        self.joint_cmc = None

    async def _on_joint_cmc(self, _event=None):
        init = self.joint
        try:
            if init is None:
                raise OptionError("the joint CMC starts from a joint fit: press Fit jointly first")
            steps = int(init.info["n_bins"]) * self.shards * self.chains
            steps *= self.warmup + self.samples
            options = self.cmc_options()
            self._busy(True)
            self.joint_cmc_button.disabled = True

            def report(seconds, tracker):
                self.joint_cmc_status.object = (
                    f"sampling {init.info['n_bins']} q-bins... {tracker.steps:,} of "
                    f"{steps:,} draws, {seconds:.0f} s"
                )

            result, seconds = await self._sample(
                lambda tracker: fit_cmc(init.data, init, progress=tracker, **options),
                steps,
                self.joint_cmc_cancel,
                self.joint_cmc_status,
                report,
            )
        except Cancelled:
            return
        except Exception as err:
            self._fail("the joint CMC run failed", err, self.joint_alert)
            self.joint_cmc_status.object = ""
            return
        finally:
            self._busy(False)
            self.joint_cmc_button.disabled = self.joint is None
        failed = result.failures()
        if failed:
            self._warn(
                "joint CMC did not converge: "
                + "; ".join(f"q = {q:.4g}: shard {s}" for q, s in failed)
                + " fail their diagnostics (counted from 0; see the report); do not use "
                "this posterior as is",
                self.joint_alert,
            )
        self.joint_cmc_status.object = (
            f"sampled in {seconds:.1f} s; shards: {result.info['shards']}"
        )
        await self._publish((self.joint_cmc_text, self.joint_cmc_view), joint_cmc=result)

    @param.depends("joint_cmc", watch=True)
    def _show_joint_cmc(self):
        result = self.joint_cmc
        self.joint_cmc_text.object = "" if result is None else result.report()
        self.joint_cmc_view.object = None if result is None else result.plot()

    # ---- running and reporting -------------------------------------------------------

    def _run_buttons(self, name: str, width: int, on_run):
        """A Run button named ``name`` (disabled until there is something to run) that
        calls ``on_run``, and a Cancel button (shown by :meth:`_sample`) that stops the
        running CMC run."""
        run = pn.widgets.Button(name=name, button_type="primary", disabled=True, width=width)
        run.on_click(on_run)
        cancel = pn.widgets.Button(name="Cancel", button_type="warning", visible=False, width=120)
        cancel.on_click(lambda _event: self.cancel())
        return run, cancel

    async def _sample(self, run, steps: int, cancel, status, report):
        """``run(tracker)``, a CMC run of ``steps`` draws counted by ``tracker``, in a
        worker thread (:meth:`_in_thread`, with ``report(seconds, tracker)``), with
        ``cancel`` shown and :meth:`cancel` able to stop it. Returns ``(result, seconds)``;
        a cancelled run says so in ``status`` and raises :class:`Cancelled`."""
        self._tracker = tracker = Tracker(total=steps)
        self._running = (cancel, status)
        cancel.param.update(visible=True, disabled=False)
        try:
            return await self._in_thread(lambda: run(tracker), lambda s: report(s, tracker))
        except Cancelled:
            status.object = (
                f"cancelled after {tracker.steps:,} of {steps:,} draws; nothing was kept"
            )
            raise
        finally:
            tracker.close()
            self._tracker = None
            cancel.visible = False

    async def _in_thread(self, work, report):
        """Run ``work()`` in a worker thread; call ``report(seconds)`` every ``POLL_S``
        on the event loop (where the page's widgets may be changed) until it ends.
        Returns ``(work(), seconds)``."""
        future = asyncio.get_running_loop().run_in_executor(None, work)
        start = time.perf_counter()
        while True:
            report(time.perf_counter() - start)
            if future.done():
                return future.result(), time.perf_counter() - start
            await asyncio.wait([future], timeout=POLL_S)

    async def _publish(self, panes, **values):
        """Set the parameters ``values`` (a new result), with ``panes`` shown busy while the
        watchers rebuild them; the page sees them busy first."""
        for pane in panes:
            pane.loading = True
        await asyncio.sleep(POLL_S)
        try:
            self.param.update(**values)
        finally:
            for pane in panes:
                pane.loading = False

    def _busy(self, busy: bool):
        ready = not busy and self.data is not None
        self.cmc_button.disabled = self.ageing_button.disabled = not ready
        if ready:
            self._check_cmc_settings()
        self.nlsq_button.disabled = not ready or bool(self._problems)
        for widget in (self.file_input, self.q_select, self.phi_select, self.frames_slider):
            widget.disabled = busy
        self.t_start_input.disabled = self.exclude_input.disabled = busy or not self.path
        if not busy:
            self.file_input.disabled = not self.path
            self.q_select.disabled = len(self.param.q.objects) < 2

    def _fail(self, what: str, err: Exception, alert: pn.pane.Alert):
        alert.param.update(
            object=f"**{markdown_text(what)}**: {markdown_text(type(err).__name__)}: "
            f"{markdown_text(str(err))}",
            alert_type="danger",
            visible=True,
        )

    def _warn(self, text: str, alert: pn.pane.Alert):
        alert.param.update(object=markdown_text(text), alert_type="warning", visible=True)


# The characters that open Markdown or HTML markup (images, links, raw HTML, entities,
# code, emphasis, tables, math) and those bare links are recognised by (":", "."; the
# pane links www.host.org and http://...); CommonMark lets a backslash escape each.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()<>!&#|~{}$:.])")


def markdown_text(text: str) -> str:
    """``text`` escaped for a Markdown pane: shown as is, never as markup, HTML, an image
    or a link (file names, attributes and messages may hold anything)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def parameter_frame(params: Parameters) -> pd.DataFrame:
    """The parameter table as a DataFrame: ``name, value, vary, min, max, unit``.

    ``contrast``/``offset`` show one value for all angles, NaN (blank) for "estimate per
    angle"; per-angle values that differ cannot be shown in one cell and raise
    ``ParameterError``.
    """
    rows = []
    for spec in PHYSICS + SCALING:
        entry = params[spec.name]
        value = entry.value
        if value is None or params.from_data(spec.name):
            value = np.nan  # estimated: per angle, or from the data (hd.fit_nlsq)
        elif np.ndim(value):
            values = np.ravel(np.asarray(value, dtype=np.float64))
            if np.ptp(values) > 0:
                raise ParameterError(
                    f"{spec.name}: the dashboard takes one value for all angles or None "
                    f"(estimated per angle); got {values.tolist()}"
                )
            value = values[0]
        rows.append((spec.name, float(value), bool(entry.vary), entry.min, entry.max, spec.unit))
    frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    # cells of any type: text typed into a number cell stays text, shown and checked
    return frame.astype({"value": object, "min": object, "max": object})


def diagnostics_tables(result: CMCResult) -> tuple[pd.io.formats.style.Styler, ...]:
    """The CMC diagnostics as two styled tables, each figure green where it passes its
    threshold and red where it fails (:data:`heterodyne.diagnostics.THRESHOLDS`).

    By shard: the verdict table of :func:`heterodyne.diagnostics.verdict` (pairs,
    seconds, worst R-hat and least ESS over the quantities, least BFMI over chains,
    divergences, the shard's verdict), coloured by its pass columns. By quantity: the
    worst R-hat and least ESS over shards, by :func:`heterodyne.diagnostics.pass_rules`
    (a NaN fails).
    """
    figures = result.diagnostics
    passes = diagnostics.pass_rules(figures)
    verdict = diagnostics.verdict(figures)
    judged = [column for column, _, _ in diagnostics.VERDICT_FIGURES]
    shards = verdict[["shard", "pairs", "seconds", *judged, "verdict"]]
    by_parameter = pd.DataFrame(
        {
            "parameter": [entry_label(*entry) for entry in index_of(figures)],
            "R-hat": figures["rhat"].max("shard", skipna=False).values,
            "ESS bulk": figures["ess_bulk"].min("shard", skipna=False).values,
            "ESS tail": figures["ess_tail"].min("shard", skipna=False).values,
        }
    )
    checks = {
        "verdict": lambda v: v == "pass",
        "R-hat": passes["rhat"],
        "ESS bulk": passes["ess_bulk"],
        "ESS tail": passes["ess_tail"],
    }

    formats = {
        "seconds": "{:.1f}",
        "divergent %": "{:.3g}",
        "min BFMI": "{:.3f}",
        "max R-hat": "{:.4f}",
        "R-hat": "{:.4f}",
        **{c: "{:.0f}" for c in ("min ESS bulk", "min ESS tail", "ESS bulk", "ESS tail")},
    }

    def styled(frame, judged=None):
        shown = {c: f for c, f in formats.items() if c in frame.columns}
        style = frame.style.hide(axis="index").format(shown, na_rep="nan")
        for column in frame.columns:
            if judged is not None and f"{column} ok" in judged.columns:
                colours = np.where(judged[f"{column} ok"], PASS_STYLE, FAIL_STYLE)
                style = style.apply(lambda _, c=colours: c, subset=[column])
            elif column in checks:
                ok = checks[column]
                style = style.map(
                    lambda v, ok=ok: PASS_STYLE if ok(v) else FAIL_STYLE, subset=[column]
                )
        return style

    return styled(shards, verdict), styled(by_parameter)


def _text_card(text: pn.pane.Str) -> pn.Card:
    """A collapsed card of a text report, as wide as the page up to ``REPORT_WIDTH``."""
    return pn.Card(
        text,
        title="text report",
        collapsed=True,
        sizing_mode="stretch_width",
        max_width=REPORT_WIDTH,
    )


def _summary_html(ds: xr.Dataset) -> str:
    t = ds["t1"].values
    rows = {
        "source": ds.attrs.get("source", "-"),
        "q": f"{float(ds['q']):.5g} {ds['q'].attrs.get('units', '1/Å')}",
        "angles": f"{', '.join(f'{v:g}' for v in ds['phi'].values)} deg",
        "frames": f"{t.size}: t = {t[0]:.4g} ... {t[-1]:.4g} s, dt = {float(ds.attrs['dt']):.4g} s"
        f" ({int(ds.attrs.get('dropped_frames', 0))} dropped, masked)",
        "pairs t1 < t2": f"{_pairs(ds)} ({int(ds.attrs.get('nan_pairs', 0))} non-finite, masked)",
        "excluded frames": ds.attrs.get("excluded_frames", "none"),
        "times": time_origin(ds),
        "uncertainties": "sigma given" if "sigma" in ds.data_vars else "none (noise estimated)",
    }
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def _intensity_plot(trace: xr.DataArray | None, excluded: np.ndarray):
    """The mean intensity per frame, excluded frames marked; None without a trace."""
    if trace is None:
        return None
    frame = hv.Dimension("frame", label="stored frame")
    value = hv.Dimension("intensity", label="mean intensity")
    out = np.isin(trace["frame"].values, excluded)
    points = (trace["frame"].values[out], trace.values[out])
    return (
        hv.Curve((trace["frame"].values, trace.values), frame, value, label="intensity")
        * hv.Scatter(points, frame, value, label="excluded").opts(color="red", size=6)
    ).opts(width=700, height=200, title="intensity per frame: exclude beam dumps and spikes")


def _pairs(ds: xr.Dataset) -> int:
    """Number of pairs ``t1 < t2`` over all angles."""
    n = ds.sizes["t1"]
    return ds.sizes["phi"] * n * (n - 1) // 2


def cmc_setting_problems(settings: dict, n_frames: int | None) -> dict[str, str]:
    """The CMC settings out of range, ``{name: why}`` (:data:`CMC_LIMITS`; a shard holds
    at least two of the ``n_frames`` rows)."""
    problems = {}
    for name, value in settings.items():
        low = CMC_LIMITS[name]
        high = max(n_frames // 2, 1) if name == "shards" and n_frames else None
        try:
            checks.integer(value, name, minimum=low, maximum=high)
        except OptionError as err:
            problems[name] = str(err)
    return problems


def table_problems(frame: pd.DataFrame) -> dict[tuple[int, str], str]:
    """The cells of a parameter table that cannot be used, ``{(row, column): why}``: text
    that is not a number, a missing bound, ``min > max``, a value outside its bounds. A
    blank value is allowed (from the data; per angle for contrast and offset)."""
    problems = {}
    for k, row in enumerate(frame.itertuples(index=False)):
        numbers = {}
        for column in ("value", "min", "max"):
            cell = getattr(row, column)
            numbers[column] = _number(cell)
            blank = cell is None or (isinstance(cell, str) and not cell.strip())
            blank = blank or (isinstance(cell, float) and np.isnan(cell))
            if np.isnan(numbers[column]) and not blank:
                problems[k, column] = f"{row.name} {column}: {cell!r} is not a number"
            elif blank and column != "value":
                problems[k, column] = f"{row.name} {column}: give a number (inf for none)"
        value, low, high = numbers["value"], numbers["min"], numbers["max"]
        if low > high:
            problems[k, "min"] = f"{row.name}: min {low:g} is above max {high:g}"
        elif not np.isnan(value) and not low <= value <= high:
            problems.setdefault(
                (k, "value"), f"{row.name}: value {value:g} is outside [{low:g}, {high:g}]"
            )
    return problems


def _number(value) -> float:
    """A table cell as a float; an empty cell is NaN."""
    number = pd.to_numeric(value, errors="coerce")
    return float("nan") if number is None or pd.isna(number) else float(number)


def _netcdf_bytes(result) -> io.BytesIO:
    """``result.to_netcdf`` written to a temporary file, as bytes for a download."""
    with tempfile.TemporaryDirectory() as folder:
        path = result.to_netcdf(Path(folder) / "result.nc")
        return io.BytesIO(path.read_bytes())
