"""The dashboard's first fit as a user meets it: a fresh server, a real browser, one click.

A beamline file (``hd.examples.example_file``: one q-bin, ``--frames`` frames x 3 angles)
is served by ``heterodyne.app.serve`` in a fresh process, as ``heterodyne dashboard FILE``
does. Headless Chromium (Playwright, Debian's ``/usr/bin/chromium``) opens the page,
waits for the data's summary, opens the NLSQ tab and clicks Fit; the time is taken in
the browser from the click to the status line that says the fit is done and to its
report and plots drawn, and to the status line of a second click once the page is idle
(the tenth fit's speed). The first server of a run starts with an
empty compilation cache of its own (``cold``); the ``--repeats`` after it read that
cache (``cache``: a user's second session). Prints, per server: the server's start
(process start to ``/liveness``), the page (load to the data's plots drawn), the first
and the second fit, the time each fit reports for itself, and the first fit's report
and plots shown; then the medians of the
cache-warm servers.

    .venv/bin/python benchmarks/dashboard_first_fit.py [--frames 150] [--repeats 5]

The machine load (``os.getloadavg``) is printed before and after: other processes on the
same cores slow every number down.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from heterodyne.examples import example_file

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
TIMEOUT_MS = 300_000
SERVER = "from heterodyne.app import serve; serve({path!r}, port={port}, liveness=True)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server(path: Path, cache: Path):
    """A fresh server process of ``path`` with its compilation cache in ``cache``: the
    process, its port and the seconds until its liveness endpoint answered."""
    port = free_port()
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(path=str(path), port=port)],
        env={**os.environ, "HETERODYNE_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/liveness", timeout=1):
                return process, port, time.perf_counter() - start
        except OSError:
            if process.poll() is not None or time.perf_counter() - start > 120:
                process.kill()
                raise RuntimeError("the dashboard server did not start") from None
            time.sleep(0.05)


def fit_once(page) -> tuple[float, float]:
    """Click Fit; the seconds from the click until the status line reports a new fit,
    and the seconds that line reports. The line is emptied first (in the page, as a
    marker), so that a fit reported in the same words is still seen as new."""
    status = page.locator(".hd-nlsq-status p").first
    if status.count():
        status.evaluate("(line) => { line.textContent = ''; }")
    start = time.perf_counter()
    page.get_by_role("button", name="Fit", exact=True).click()
    page.locator(".hd-nlsq-status p", has_text="fitted in").first.wait_for(timeout=TIMEOUT_MS)
    seen = time.perf_counter() - start
    reported = re.search(r"fitted in ([0-9.]+) s", status.inner_text())
    return seen, float(reported.group(1)) if reported else float("nan")


def session(browser, path: Path, cache: Path) -> dict:
    process, port, started = server(path, cache)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        start = time.perf_counter()
        page.goto(f"http://localhost:{port}/")
        page.locator(".hd-summary table").first.wait_for(timeout=TIMEOUT_MS)
        page.locator(".hd-cuts-plots canvas").first.wait_for(timeout=TIMEOUT_MS)
        loaded = time.perf_counter() - start
        page.get_by_role("tab", name="NLSQ").click()
        page.wait_for_timeout(1000)  # the page idle, as a user's first click finds it
        start = time.perf_counter()
        first, first_own = fit_once(page)
        page.locator(".hd-nlsq-report table").first.wait_for(timeout=TIMEOUT_MS)
        page.locator(".hd-nlsq-plots canvas").first.wait_for(timeout=TIMEOUT_MS)
        shown = time.perf_counter() - start
        page.wait_for_timeout(2000)  # every figure of the first fit drawn
        second, second_own = fit_once(page)
        page.close()
    finally:
        process.kill()
        process.wait()
    return dict(
        server=started, page=loaded, first=first, first_own=first_own, shown=shown,
        second=second, second_own=second_own,
    )  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        path = example_file(
            Path(folder) / "sample.h5", q=(0.01,), n_frames=args.frames, phi=(-45.0, 0.0, 45.0)
        )
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        header = f"{'cache':>6} {'server s':>9} {'page s':>7} {'first fit s':>12} "
        header += f"{'(own)':>6} {'shown s':>8} {'second fit s':>13} {'(own)':>6}"
        print(f"{args.frames} frames x 3 angles\n{header}")
        runs = []
        for k in range(args.repeats + 1):
            run = session(browser, path, Path(folder) / "cache")
            kind = "cold" if k == 0 else "warm"
            print(
                f"{kind:>6} {run['server']:9.2f} {run['page']:7.2f} {run['first']:12.2f} "
                f"{run['first_own']:6.2f} {run['shown']:8.2f} {run['second']:13.2f} "
                f"{run['second_own']:6.2f}",
                flush=True,
            )
            runs += [run] if k else []
        browser.close()
    if runs:
        medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"median of {len(runs)} cache-warm servers: server {medians['server']:.2f} s, "
            f"page {medians['page']:.2f} s, first fit {medians['first']:.2f} s "
            f"({medians['first_own']:.2f} s its own; report and plots shown at "
            f"{medians['shown']:.2f} s), second fit {medians['second']:.2f} s"
        )
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
