"""A dashboard served on a free local port, ready when its liveness endpoint answers."""

import socket
import time
import urllib.request
from contextlib import contextmanager

from heterodyne.app import serve


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(source, **kwargs):
    """``serve(source, port=a free port, threaded=True, **kwargs)``; yields the port once
    ``/liveness`` answers and stops the server on exit."""
    port = free_port()
    server = serve(source, port=port, threaded=True, show=False, liveness=True, **kwargs)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/liveness", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        server.stop()
