"""The dashboard served and driven in a real browser (headless chromium via Playwright).

Needs Debian's chromium and the playwright package (``apt-get install chromium; pip
install playwright``; never ``playwright install``): without them these tests skip, or
fail when ``HETERODYNE_REQUIRE_BROWSER=1`` (as in CI).
"""

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from _served import served

from heterodyne.app import CHECK_S, CLOSED_S
from heterodyne.examples import EXAMPLE_TRUTH, example_file

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL = "apt-get install chromium; pip install playwright"
VIEWPORT = {"width": 1280, "height": 900}  # a laptop window
FIT_TIMEOUT_MS = 120_000  # a fit, compile included, on a loaded 2-core runner
PAGE_TIMEOUT_MS = 30_000
NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
IDLE_CORES = 0.2  # a server with no work left: below a fifth of a core


@pytest.fixture(scope="module")
def browser():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        missing.append(f"chromium ({CHROMIUM})")
    if missing:
        message = f"browser tests need {' and '.join(missing)}: {INSTALL}"
        if os.environ.get("HETERODYNE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    executable = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """The dashboard of a small beamline file, served on a free local port."""
    path = example_file(
        tmp_path_factory.mktemp("data") / "sample.h5",
        q=(0.01,),
        n_frames=40,
        phi=(-45.0, 0.0, 45.0),
    )
    with served(path, address="127.0.0.1") as port:
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url)
    page.locator(".hd-summary table").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    yield page
    page.close()


def fit_nlsq(page):
    """Open the NLSQ tab, press Fit and wait for the report; return v0 as shown."""
    page.get_by_role("tab", name="NLSQ").click()
    page.get_by_role("button", name="Fit", exact=True).click()
    page.locator(".hd-nlsq-status p", has_text="fitted in").wait_for(timeout=FIT_TIMEOUT_MS)
    report = page.locator(".hd-nlsq-report table").first
    report.wait_for(timeout=PAGE_TIMEOUT_MS)
    row = report.locator("tr").filter(has=page.locator("td", has_text=re.compile(r"^v0$")))
    return float(row.locator("td").nth(1).inner_text())


def screenshot(page, plots, path):
    """A full-page screenshot once bokeh has drawn the figures of ``plots``."""
    page.locator(f"{plots} canvas").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(500)
    page.screenshot(path=path, full_page=True)


def scrolls_sideways(page) -> bool:
    """Whether the page is wider than the window (a horizontal scroll bar)."""
    return page.evaluate("document.documentElement.scrollWidth > window.innerWidth")


def test_fit_in_the_browser_shows_the_report_with_v0(page, tmp_path):
    assert "40: t = 0.1 ... 4 s" in page.locator(".hd-summary table").first.inner_text()
    screenshot(page, ".hd-cuts-plots", tmp_path / "data.png")
    assert not scrolls_sideways(page)

    v0 = fit_nlsq(page)
    assert abs(v0 - EXAMPLE_TRUTH["v0"]) < 0.05 * EXAMPLE_TRUTH["v0"]
    assert not page.locator(".hd-alert").first.is_visible()
    screenshot(page, ".hd-nlsq-plots", tmp_path / "nlsq.png")
    page.get_by_text("text report").first.click()  # open the card: its lines wrap
    page.wait_for_timeout(500)
    for width in (1280, 1920):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(500)
        assert not scrolls_sideways(page), width


@pytest.mark.slow
def test_cmc_in_the_browser_shows_the_diagnostics(page, tmp_path):
    # The settings of tests/test_dashboard.py: run in one process, the two share compiles.
    run_cmc(page, shards=2, chains=2, warmup=60, samples=40)
    table = page.locator(".hd-cmc-diagnostics table").first
    table.wait_for(timeout=FIT_TIMEOUT_MS)
    assert table.locator("th").all_inner_texts()[-1] == "verdict"
    assert table.locator("td").last.inner_text() in ("pass", "fail")
    assert "sampled in" in page.locator(".hd-cmc-status p").first.inner_text()
    screenshot(page, ".hd-cmc-plots", tmp_path / "cmc.png")
    assert not scrolls_sideways(page)


def cpu_load(seconds: float) -> float:
    """Cores this process (the server's threads) kept busy over ``seconds``."""
    start = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - start) / seconds


def run_cmc(page, **settings):
    """Fit, then type ``settings`` into the CMC tab and press Run."""
    fit_nlsq(page)
    page.get_by_role("tab", name="CMC").click()
    for name, value in settings.items():
        box = page.locator(f".hd-cmc-{name} input")
        box.fill(str(value))
        box.press("Enter")
    page.get_by_role("button", name="Run", exact=True).click()


def start_long_cmc(page):
    """Fit, then start a CMC run of minutes; return once its first draws are counted."""
    run_cmc(page, shards=1, chains=2, warmup=100, samples=100_000)
    status = page.locator(".hd-cmc-status p", has_text=re.compile(r"sampling\.\.\. [1-9]"))
    status.wait_for(timeout=FIT_TIMEOUT_MS)
    assert "of 200,200 draws" in status.inner_text()


@pytest.mark.slow
def test_cancel_and_a_closed_page_stop_a_cmc_run(browser, url):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url)
    page.locator(".hd-summary table").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    start_long_cmc(page)
    assert cpu_load(1.0) > IDLE_CORES  # sampling
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.locator(".hd-cmc-status p", has_text="cancelled after").wait_for(timeout=PAGE_TIMEOUT_MS)
    assert cpu_load(2.0) < IDLE_CORES
    assert page.get_by_role("button", name="Run", exact=True).is_enabled()

    page.get_by_role("button", name="Run", exact=True).click()
    page.locator(".hd-cmc-status p", has_text=re.compile(r"sampling\.\.\. [1-9]")).wait_for(
        timeout=FIT_TIMEOUT_MS
    )
    page.close()  # the session ends, and its run with it, within CLOSED_S + CHECK_S
    time.sleep(CLOSED_S + CHECK_S)
    loads = [cpu_load(1.0) for _ in range(3)]
    assert min(loads) < IDLE_CORES, loads


def test_a_bad_cell_is_marked_with_its_message_as_it_is_edited(page):
    page.get_by_role("tab", name="NLSQ").click()
    name = page.locator(".tabulator-cell[tabulator-field='name']", has_text=re.compile(r"^v0$"))
    cell = page.locator(".tabulator-row").filter(has=name).locator("[tabulator-field='min']")
    cell.click()
    cell.locator("input").fill("fast")
    cell.locator("input").press("Enter")
    message = page.locator(".hd-table-message")
    message.get_by_text("v0 min: 'fast' is not a number").wait_for(timeout=PAGE_TIMEOUT_MS)
    assert cell.inner_text() == "fast"  # shown as typed, not as a blank
    assert cell.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(248, 215, 218)"
    assert page.get_by_role("button", name="Fit", exact=True).is_disabled()
    tabs = page.get_by_role("tab")
    assert tabs.all_inner_texts() == ["Data", "NLSQ", "CMC", "Ageing", "Joint q"]
    assert [t.get_attribute("aria-selected") for t in tabs.all()] == [
        "false",
        "true",
        "false",
        "false",
        "false",
    ]


@pytest.mark.slow
def test_a_notebook_exported_to_html_draws_its_plots_offline(browser, tmp_path):
    """Notebook 01's setup cell and a plot, run and exported as JupyterLab does (nbconvert,
    lab template), open with every network request refused (a beamline network): bokeh
    is inline, so the figure is drawn."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nbconvert = pytest.importorskip("nbconvert")
    notebook = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
    setup = next(c for c in notebook.cells if "hv.extension" in "".join(c.source))
    small = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(setup.source),
            nbformat.v4.new_code_cell('hd.plot.c2(hd.simulate({"v0": 500.0}, n_frames=20))'),
        ]
    )
    nbclient.NotebookClient(small, kernel_name="python3", timeout=300).execute()
    html, _ = nbconvert.HTMLExporter(template_name="lab").from_notebook_node(small)
    path = tmp_path / "small.html"
    path.write_text(html, encoding="utf-8")

    page = browser.new_page(viewport=VIEWPORT)
    refused = []

    def offline(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    page.route("**/*", offline)
    page.goto(path.as_uri())
    page.locator(".bk-Canvas, canvas").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    assert refused  # the page did try the network (CDN scripts of the template)
    page.close()
