"""A full-precision fingerprint of a piece of work, to name checkpoint files.

A checkpoint may be reused only for the same work: :func:`digest` hashes everything that
can change an answer exactly (array bytes with their dtype and shape, floats by their
exact ``repr``, every field of a ``Parameters``, every coordinate, variable and
attribute of a Dataset, the package version), never a printed, rounded form.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr


def digest(*parts) -> str:
    """The SHA-256 hex digest of ``parts`` and the package version.

    ``parts`` may nest ``None``, bools, numbers, strings, paths, slices, numpy arrays,
    lists, tuples, dicts, ``xarray`` Datasets and DataArrays and ``Parameters``; any
    other object enters by its pickle.
    """
    from heterodyne import __version__

    sha = hashlib.sha256()
    _update(sha, ("heterodyne", __version__, parts))
    return sha.hexdigest()


def file_identity(path) -> tuple:
    """A file by its absolute path, size and modification time (nanoseconds): a file
    rewritten in place gets a new identity without reading its bytes."""
    info = os.stat(path)
    return (os.path.abspath(path), info.st_size, info.st_mtime_ns)


def _update(sha, value) -> None:
    from heterodyne.parameters import Parameters

    if isinstance(value, xr.Dataset | xr.DataArray):
        ds = value.to_dataset(name="__array__") if isinstance(value, xr.DataArray) else value
        _update(sha, ("Dataset", dict(ds.attrs)))
        for kind, names in (("coord", ds.coords), ("var", ds.data_vars)):
            for name in sorted(names, key=str):
                item = ds[name]
                _update(sha, (kind, str(name), item.dims, dict(item.attrs), item.values))
    elif isinstance(value, Parameters):
        # given/max_given decide whether a start or v0's bound comes from the data
        fields = [
            (n, p.value, p.given, p.vary, p.min, p.max, p.max_given) for n, p in value.items()
        ]
        _update(sha, ("Parameters", fields))
    elif isinstance(value, np.ndarray | np.generic):
        array = np.ascontiguousarray(value)
        if array.dtype.hasobject:
            _update(sha, ("object array", array.shape, array.tolist()))
        else:
            sha.update(f"array {array.dtype.str} {array.shape}:".encode())
            sha.update(array.tobytes())
    elif isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda item: repr(item[0]))
        _update(sha, ("dict", [(repr(k), v) for k, v in items]))
    elif isinstance(value, list | tuple):
        sha.update(f"{type(value).__name__} {len(value)}(".encode())
        for item in value:
            _update(sha, item)
        sha.update(b")")
    elif isinstance(value, slice):
        _update(sha, ("slice", value.start, value.stop, value.step))
    elif isinstance(value, Path):
        _update(sha, ("path", str(value)))
    elif value is None or isinstance(value, bool | int | float | complex | str | bytes):
        # repr of a float is its exact, round-tripping value
        sha.update(f"{type(value).__name__}:{value!r};".encode())
    else:  # any other object (an attribute): its pickle, which workers receive too
        try:
            sha.update(b"pickle:" + pickle.dumps(value, protocol=4))
        except Exception:  # unpicklable: its type and repr are what is known of it
            sha.update(f"{type(value).__qualname__}:{value!r};".encode())
