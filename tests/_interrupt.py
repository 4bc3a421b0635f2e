"""Ctrl-C pressed in the middle of long work, for the tests of interrupted runs."""

import _thread
import contextlib
import signal
import threading
import time
from pathlib import Path


@contextlib.contextmanager
def ctrl_c_once(folder: Path, pattern: str, count: int):
    """While the block runs, a watcher thread presses Ctrl-C (SIGINT, which Python's own
    handler turns into ``KeyboardInterrupt`` in the main thread) as soon as ``count``
    files matching ``pattern`` exist in ``folder``."""
    running = threading.Event()
    running.set()

    def watch():
        while running.is_set():
            if len(list(folder.glob(pattern))) >= count:
                _thread.interrupt_main(signal.SIGINT)
                return
            time.sleep(0.002)

    # Python's own SIGINT handler, whatever the test runner installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        running.clear()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
