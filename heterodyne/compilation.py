"""How JAX runs the package's code: float64, and a persistent compilation cache.

Imported by :mod:`heterodyne.model`, so before any of the package's arrays exist. JAX
compiles each function once per shape and keeps the program in memory; the persistent
cache also keeps it on disk, so that a new process (a notebook restarted, the command
line, a Dask worker, every fit of a survey) reads it back instead of compiling again.

The cache is on by default, in a per-user folder (:func:`default_folder`). The
environment variable ``HETERODYNE_CACHE`` names another folder, or turns it off with
``off``; :func:`set_compilation_cache` (``hd.set_compilation_cache``) moves or disables
it in a running process. Processes may share the folder: reads and writes of its entries
are serialised by a lock file (JAX's least-recently-used cache, which also keeps the
folder under ``CACHE_SIZE`` bytes).

The folder must be writable by you alone: JAX runs the programs it finds there.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

# The model's rates span many decades (q² D t ~ 1e-4 .. 1e3): float64 everywhere.
jax.config.update("jax_enable_x64", True)

CACHE_VARIABLE = "HETERODYNE_CACHE"
#: values of ``HETERODYNE_CACHE`` that turn the cache off
OFF = ("off", "0", "false", "no", "none")
#: bytes the cache folder may hold; the least recently used programs are removed beyond
CACHE_SIZE = 2 * 10**9


def default_folder() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/heterodyne/jax`` (``~/.cache`` when
    unset) on Linux, ``~/Library/Caches/heterodyne/jax`` on macOS,
    ``%LOCALAPPDATA%/heterodyne/jax`` on Windows."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "heterodyne" / "jax"


def cache_folder() -> Path | None:
    """The folder of the persistent compilation cache now in use; ``None`` when off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    folder = jax.config.jax_compilation_cache_dir
    return Path(folder) if folder else None


def set_compilation_cache(folder: str | os.PathLike | None) -> Path | None:
    """Keep compiled programs in ``folder`` from now on; ``None`` turns the cache off.

    Parameters
    ----------
    folder : str, path or None
        A folder writable by you alone (created if missing), e.g. on a fast local disk
        of a cluster node; ``None`` compiles in memory only, as JAX does by default.

    Returns
    -------
    Path or None
        The folder now in use: ``None`` when off, or when ``folder`` cannot be created or
        written (a warning says why; fits still run, compiling in memory).

    Notes
    -----
    The same as setting ``HETERODYNE_CACHE`` before the import (a folder, or ``off``).
    Programs already compiled in this process stay in its memory either way.

    Examples
    --------
    >>> import heterodyne as hd
    >>> hd.set_compilation_cache("/scratch/me/jax-cache")  # doctest: +SKIP
    """
    compilation_cache.reset_cache()
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(
            f"the compilation cache folder {str(path)!r} cannot be created or written; "
            "compiled programs are kept in memory only. Set HETERODYNE_CACHE to a writable "
            "folder, or to 'off'",
            stacklevel=2,
        )
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every program: most of the package's take well under JAX's default 1 s to compile,
    # and dozens of them make up the first fit
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_SIZE)
    jax.config.update("jax_enable_compilation_cache", True)
    return path


def folder_from_environment() -> Path | None:
    """The folder ``HETERODYNE_CACHE`` names; when it is unset or empty, JAX's own
    ``jax_compilation_cache_dir`` if set, else :func:`default_folder`; ``None`` when it
    turns the cache off."""
    setting = os.environ.get(CACHE_VARIABLE, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting)
    # a folder set through JAX's own option (JAX_COMPILATION_CACHE_DIR) is kept
    return Path(jax.config.jax_compilation_cache_dir or default_folder())


set_compilation_cache(folder_from_environment())
