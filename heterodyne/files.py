"""Files that appear whole or not at all.

Every writer in heterodyne (Datasets, results, reports, plots, checkpoints) goes through
:func:`atomic_write`: a crash, a kill or a concurrent writer never leaves a truncated file
under the name a user or a later run will read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from heterodyne import checks
from heterodyne.errors import FileFormatError, OptionError, OverwriteError

_TMP_STEM = 200  # bytes of the target's name kept in its temporary file's name


def atomic_write(write, path, *, overwrite: bool = False) -> Path:
    """Run ``write(tmp_path)`` then publish the file at ``path`` in one atomic step.

    A process killed mid-write leaves any old file intact and no half-written file under
    ``path``. Refuses to replace an existing file unless ``overwrite=True``: raises
    :class:`~heterodyne.errors.OverwriteError`, a ``FileExistsError``.

    ``tmp_path`` is a new file ``.NAME.PID.<random>.tmp`` (``tempfile``) in the folder of
    ``path``, unique to each writer, so that writers in threads or processes never share
    it: hidden, ending in ``.tmp`` (no ``*.nc`` or ``*.h5`` pattern matches it) and
    published only once complete. With ``overwrite=True`` it is renamed onto ``path``
    (the last of concurrent writers wins, each file whole); otherwise it is hard-linked
    to ``path``, which fails if ``path`` exists, so of concurrent writers exactly one
    succeeds and the others raise ``OverwriteError`` (a file system without hard links
    falls back to creating ``path`` exclusively, then renaming onto it). A process killed
    by SIGKILL leaves the temporary file behind, half written; delete it by hand. The
    file's data and then the folder's entry are flushed to disk (``fsync``) around the
    publication, so that a power cut too leaves either the old file or the whole new one.
    """
    path = checks.file_path(path, "path")
    checks.flag(overwrite, "overwrite")
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise OverwriteError(f"{path} exists; pass overwrite=True to replace it")
    checks.writable_folder(path.parent, "the folder of the file")
    # The temporary name keeps a prefix of the target's: a 255-byte target name still
    # leaves room for the process id, the random part and the suffix.
    stem = path.name
    while len(os.fsencode(stem)) > _TMP_STEM:
        stem = stem[:-1]
    prefix = f".{stem}.{os.getpid()}."
    try:
        descriptor, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OptionError(f"cannot create a file in {path.parent}: {err.strerror}") from err
    os.close(descriptor)
    tmp = Path(name)
    try:
        write(tmp)
        _sync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
        _sync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the complete file ``tmp`` the name ``path`` unless ``path`` exists, in one
    step that concurrent writers cannot both pass."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OverwriteError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # no hard links here (some network and FAT file systems)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise OverwriteError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def _sync(path: Path) -> None:
    """``fsync`` a file or a folder (where the system allows opening a folder)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # a file system that cannot sync (some network mounts): the rename still holds
    finally:
        os.close(descriptor)
