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

The persistent cache saves the compilation, not the tracing and lowering that come
before it: JAX runs the Python function again to find the program it looks up. For the
programs of the first fit that cost most there (:func:`exported`), the traced program
is kept too, as JAX's serialized export (StableHLO) in the ``exported`` subfolder,
keyed by the function, the shapes and types of its arguments, its static arguments, the
package's source code and the JAX version: a new process reads it back and runs the
function's Python code only for a shape never seen. These files are small (tens of kB
each) and are not counted in ``CACHE_SIZE``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from functools import cache, wraps
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


def exported(fun, static_argnums: tuple[int, ...] = ()):
    """``jax.jit(fun, static_argnums=...)`` whose traced program is also kept in the
    cache folder (module docstring), so that a new process neither traces nor lowers
    ``fun`` for a shape an earlier one ran; the compiled program comes from the
    persistent cache as before. Arguments are pytrees of arrays, and hashable static
    values at ``static_argnums``. Called inside another traced function, or with the
    cache off, it is the plain ``jax.jit``."""
    jitted = jax.jit(fun, static_argnums=static_argnums)
    programs = {}

    @wraps(fun)
    def call(*args):
        static = tuple(args[k] for k in static_argnums)
        dynamic = [a for k, a in enumerate(args) if k not in static_argnums]
        leaves, tree = jax.tree.flatten(dynamic)
        folder = cache_folder()
        if folder is None or any(isinstance(v, jax.core.Tracer) for v in leaves):
            return jitted(*args)
        types = tuple(_signature(v) for v in leaves)
        key = (folder, len(args), static, str(tree), types)
        if key not in programs:
            programs[key] = _program(fun, len(args), static_argnums, static, tree, leaves, folder)
        return programs[key](*leaves)

    return call


def _signature(value) -> tuple:
    aval = jax.typeof(value)
    return aval.shape, aval.dtype.str, bool(getattr(aval, "weak_type", False))


def _program(fun, n_args: int, static_argnums, static, tree, leaves, folder: Path):
    """``fun`` at these static values and argument types, as a compiled function of the
    flat array arguments: read from the file of its exported program, else traced,
    exported and written there (atomically: concurrent writers each write it whole)."""
    from heterodyne.files import atomic_write

    signature = repr((static, str(tree), [_signature(v) for v in leaves]))
    name = f"{fun.__module__}.{fun.__qualname__}"
    digest = hashlib.sha256(
        "\n".join([name, signature, _source_digest(), jax.__version__]).encode()
    ).hexdigest()[:40]
    path = folder / "exported" / f"{name}-{digest}"
    try:
        program = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception:  # missing, partly deleted or unreadable: trace it again
        program = None
    if program is None:

        def flat(*values):
            dynamic = iter(jax.tree.unflatten(tree, values))
            fixed = dict(zip(static_argnums, static, strict=True))
            return fun(*(fixed[k] if k in fixed else next(dynamic) for k in range(n_args)))

        program = jax.export.export(jax.jit(flat))(*leaves)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            data = program.serialize()
            atomic_write(lambda tmp: tmp.write_bytes(data), path, overwrite=True)
        except (OSError, ValueError):
            # a read-only cache, or results JAX cannot serialize (a pytree of a type not
            # registered with jax.export): the program runs, traced in each process
            pass

    def run(*values):
        return program.call(*values)

    # compiled under the function's own name (as jax.jit(fun) would be)
    run.__name__, run.__qualname__ = fun.__name__, fun.__qualname__
    return jax.jit(run)


@cache
def _source_digest() -> str:
    """A digest of the package's source files: an exported program of older code is
    never used."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


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
