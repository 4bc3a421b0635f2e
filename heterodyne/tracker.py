"""Progress and cancellation of a CMC run, seen from inside its compiled chains.

A :class:`Tracker` passed as ``hd.fit_cmc(..., progress=tracker)`` counts the NUTS steps
(warmup and draws) of every chain as they are made, and carries a stop request: after
``tracker.cancel()`` each chain skips its remaining steps at its next report (every
:data:`REPORT_EVERY` steps) and the run raises :class:`heterodyne.errors.Cancelled`.

The compiled chain reaches the tracker through :func:`step`, a host callback keyed by the
tracker's integer ``token`` (a picklable job field). A chain that runs in another process
(``executor="processes"``, dask) finds no tracker there: it reports to nothing and cannot
be stopped from here.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

REPORT_EVERY = 10  # NUTS steps between a chain's reports (and checks for a stop request)

_trackers: dict[int, Tracker] = {}
_tokens = itertools.count(1)  # 0: no tracker
_lock = threading.Lock()


class Tracker:
    """The steps made by each chain of a run, out of ``total``, and a stop request.

    Parameters
    ----------
    total : int
        Steps of the whole run: shards x chains x (warmup + samples).

    Examples
    --------
    >>> tracker = Tracker(total=2 * 2 * 2500)
    >>> tracker.steps, tracker.cancelled
    (0, False)
    >>> tracker.cancel()
    >>> tracker.cancelled
    True
    """

    def __init__(self, total: int):
        self.total = int(total)
        self._done: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        with _lock:
            self.token = next(_tokens)
            _trackers[self.token] = self

    @property
    def steps(self) -> int:
        """Steps made so far by all chains (warmup included)."""
        return sum(self._done.values())

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        """Ask every chain of the run to stop at its next report."""
        self._stop.set()

    def close(self) -> None:
        """Stop receiving reports (the run is over)."""
        with _lock:
            _trackers.pop(self.token, None)

    def _report(self, shard: int, chain: int, steps: int) -> bool:
        self._done[shard, chain] = steps
        return self.cancelled


def step(token, shard, chain, steps) -> np.bool_:
    """The host callback of a compiled chain: chain ``chain`` of shard ``shard`` has made
    ``steps`` steps. Returns True when the run's tracker asks it to stop."""
    tracker = _trackers.get(int(token))
    if tracker is None:
        return np.bool_(False)
    return np.bool_(tracker._report(int(shard), int(chain), int(steps)))


def cancelled(token: int) -> bool:
    """Whether the run of ``token`` was asked to stop (False for no tracker)."""
    tracker = _trackers.get(int(token))
    return tracker is not None and tracker.cancelled
