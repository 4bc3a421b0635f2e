"""Slider-to-plot latency of ``hd.explore``, measured live in a real browser.

The explorer's figures (``Explorer.figure``: data and model heatmaps, one-time cuts) are
served on a Panel page next to a Panel slider that sets the explorer's ``f0`` slider, so a
step runs the explorer's own path: the model computed, written into the figures' data
sources, sent over the websocket and drawn. Headless Chromium
(Playwright, Debian's ``/usr/bin/chromium``) presses the arrow key on the slider handle
``--presses`` times; each press is timed in the page from the key event to the second
animation frame after the page received the new image (the frame that shows it). Prints
the median and the quartiles.

    .venv/bin/python benchmarks/explorer_latency.py [--frames 200] [--presses 30]

The machine load (``os.getloadavg``) is printed before and after: other processes on the
same cores slow every number down.
"""

import argparse
import os
import socket
import time
import urllib.request

import numpy as np
import panel as pn

import heterodyne as hd

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}

# In the page: one press, from the key event on the slider handle to the second frame
# after a ColumnDataSource of the figures changed (the first frame that draws it).
PRESS = """
(handle) => new Promise((resolve) => {
    const start = performance.now();
    window.heterodyneDrawn = () => requestAnimationFrame(() => requestAnimationFrame(
        () => resolve(performance.now() - start)));
    handle.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true}));
})
"""
LISTEN = """
() => {
    for (const doc of Bokeh.documents) {
        doc.on_change((event) => {
            const model = event.model ?? event.column_source;
            if (model && model.data !== undefined && window.heterodyneDrawn) {
                const drawn = window.heterodyneDrawn;
                window.heterodyneDrawn = null;
                drawn();
            }
        });
    }
}
"""


def page(frames: int):
    ds = hd.simulate(TRUTH, n_frames=frames, phi=[-45, 0, 45], noise=0.01, seed=0)
    explorer = hd.explore(ds, TRUTH)
    f0 = explorer.sliders["f0"]
    slider = pn.widgets.FloatSlider(name="f0", start=0.0, end=1.0, step=0.01, value=f0.value)
    slider.param.watch(lambda event: setattr(f0, "value", event.new), "value")
    return pn.Column(slider, pn.pane.Bokeh(explorer.figure))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames of the data")
    parser.add_argument("--presses", type=int, default=30, help="slider steps timed")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(f"load before: {os.getloadavg()}")
    server = pn.serve(
        {"/": lambda: page(args.frames)},
        port=port,
        address="127.0.0.1",
        threaded=True,
        show=False,
        websocket_origin=[f"127.0.0.1:{port}"],
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(f"http://127.0.0.1:{port}/")
            tab.locator("canvas").first.wait_for(timeout=60_000)
            tab.wait_for_timeout(2000)  # the first draw settles
            tab.evaluate(LISTEN)
            handle = tab.locator(".noUi-handle").first.element_handle()
            times = []
            for _ in range(args.presses + 2):  # the first two warm the compiled model
                times.append(tab.evaluate(PRESS, handle))
                tab.wait_for_timeout(100)
            browser.close()
    finally:
        server.stop()
    live = np.array(times[2:])
    q1, median, q3 = np.percentile(live, [25, 50, 75])
    print(
        f"explorer, {args.frames} frames x 3 angles, {len(live)} slider steps in chromium: "
        f"median {median:.0f} ms (quartiles {q1:.0f}-{q3:.0f} ms, max {live.max():.0f} ms) "
        "from the key press to the frame that draws the new model"
    )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
