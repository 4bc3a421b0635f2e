"""Where independent tasks (CMC shards, survey fits, age-scan windows) run.

``executor`` is accepted in one of four forms everywhere in the package:

- ``None``: sequentially, in this process;
- ``"processes"``: local worker processes (``spawn``: JAX does not survive ``fork``);
- ``"dask://HOST:PORT"`` (or ``"tcp://HOST:PORT"``): the workers of a running
  ``dask.distributed`` scheduler, e.g. one started by dask-jobqueue on PBS or Slurm;
- any ``concurrent.futures.Executor``, such as ``distributed.Client(...).get_executor()``.

Tasks must be picklable (plain numpy arrays and builtins) for the last three.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager

from tqdm.auto import tqdm

from heterodyne.errors import OptionError

_DASK_SCHEMES = ("dask://", "tcp://")
CONNECT_S = 10  # seconds to reach a dask scheduler before giving up


def check(executor) -> None:
    """Raise ``OptionError`` unless ``executor`` has one of the accepted forms."""
    if executor is None or isinstance(executor, Executor):
        return
    if isinstance(executor, str) and executor == "processes":
        return
    if isinstance(executor, str) and executor.startswith(_DASK_SCHEMES):
        _host_port(executor)
        return
    raise OptionError(
        f"executor must be None, 'processes', 'dask://HOST:PORT' or a "
        f"concurrent.futures.Executor; got {executor!r}"
    )


def _host_port(executor: str) -> tuple[str, int]:
    """``(host, port)`` of ``"dask://HOST:PORT"``; ``OptionError`` without a port."""
    host, _, port = executor.split("://", 1)[1].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"executor={executor!r}: expected dask://HOST:PORT, PORT 1 to 65535")
    return host.strip("[]"), int(port)


@contextmanager
def _opened(executor):
    if executor == "processes":
        pool = ProcessPoolExecutor(
            max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")
        )
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    elif isinstance(executor, str):
        from distributed import Client

        host, port = _host_port(executor)
        try:  # fails at once for a refused connection, where dask retries for 30 s
            socket.create_connection((host, port), timeout=CONNECT_S).close()
            client = Client(f"tcp://{host}:{port}", timeout=CONNECT_S)
        except OSError as err:
            raise OptionError(
                f"executor={executor!r}: cannot reach a dask scheduler at {host}:{port} "
                f"({err}); start one (dask scheduler, dask-jobqueue) or check the address"
            ) from err
        with client:
            yield client.get_executor()
    else:
        yield executor


def run(
    fn: Callable, tasks: Iterable, executor=None, *, progress: bool = True, desc: str = "tasks"
) -> Iterator[tuple[int, object]]:
    """Run ``fn(task)`` for each task; yield ``(index, result)`` as tasks finish.

    Sequential runs yield in order. An interrupt or a failed task cancels the tasks
    not yet started; the ones already yielded stay with the caller.
    """
    check(executor)
    tasks = list(tasks)
    bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not progress)
    try:
        if executor is None:
            for index, task in enumerate(tasks):
                result = fn(task)
                bar.update(1)
                yield index, result
            return
        with _opened(executor) as pool:
            futures = {pool.submit(fn, task): index for index, task in enumerate(tasks)}
            try:
                for future in as_completed(futures):
                    bar.update(1)
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()
    finally:
        bar.close()
