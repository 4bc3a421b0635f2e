"""Checks of the arguments of the public functions, run before any work.

Every public entry point (``load``, ``simulate``, ``fit_nlsq``, ``fit_cmc``, ``survey``,
the command line and the dashboard) calls the checkers here first, so that a wrong type
or value raises a :class:`~heterodyne.errors.HeterodyneError` subclass naming the
argument, what was given and what is expected, before any JIT compilation, file read or
file write. The small checkers (:func:`integer`, :func:`number`, :func:`numbers`,
:func:`flag`, :func:`choice`, :func:`frame_window`, :func:`file_path`) are shared; the
``check_*`` functions gather them per entry point.
"""

from __future__ import annotations

import errno
import ipaddress
import numbers as _abc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from heterodyne.errors import FileFormatError, OptionError, ParameterError
from heterodyne.tracker import Tracker

SEED_MAX = 2**32 - 1  # numpy and JAX both take seeds in [0, 2**32)
NAME_MAX = 255  # bytes of one path component on common file systems (ext4, xfs, apfs)

if TYPE_CHECKING:  # xarray is imported where a Dataset is checked: the command line's
    import xarray as xr  # argument parsing (and --help) does without it

# The options of scipy.optimize.least_squares that fit_nlsq passes through, with what each
# accepts; jac and bounds are fit_nlsq's own. method="lm" takes no bounds. loss: fit_nlsq
# hands scipy the compressed n+1-row problem (nlsq.Compressed), whose optimum is the plain
# least-squares one whatever the loss, so a robust loss would silently do nothing.
LEAST_SQUARES_METHODS = ("trf", "dogbox")
LEAST_SQUARES_TOLERANCES = ("ftol", "xtol", "gtol")
TR_SOLVERS = ("exact", "lsmr")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _describe(value) -> str:
    """``value`` for a message: short, and without Python's internal spellings."""
    if isinstance(value, slice):
        return f"slice({value.start}, {value.stop})"
    text = repr(value)
    return text if len(text) <= 80 else f"{type(value).__name__} {text[:60]}..."


def integer(value, name: str, *, minimum=None, maximum=None, error=OptionError) -> int:
    """``value`` as an ``int``; a bool, a float or a string is refused."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, _abc.Integral):
        raise error(f"{name} must be an integer; got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise error(
            f"{name} must be an integer {' and '.join(filter(None, (low, high)))}; got {value}",
        )
    return value


def number(
    value, name: str, *, positive=False, minimum=None, finite=True, error=OptionError
) -> float:
    """``value`` as a ``float``: a real number (not a bool or a string), finite unless
    ``finite=False`` (NaN is refused either way), ``> 0`` with ``positive``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, _abc.Real):
        raise error(f"{name} must be a number; got {_describe(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise error(f"{name} = {_describe(value)} is too large for a float64") from None
    if np.isnan(out):
        raise error(f"{name} is NaN; expected a number")
    if finite and not np.isfinite(out):
        raise error(f"{name} must be a finite number; got {out!r}")
    if positive and not out > 0:
        raise error(f"{name} must be > 0; got {out!r}")
    if minimum is not None and out < minimum:
        raise error(f"{name} must be >= {minimum}; got {out!r}")
    return out


def numbers(value, name: str, *, positive=False, empty=False, error=OptionError) -> np.ndarray:
    """``value`` (one number or a sequence) as a finite float64 vector; ``> 0`` with
    ``positive``; an empty one only with ``empty=True``."""
    if isinstance(value, str | bytes) or value is None:
        raise error(f"{name} must be a number or a sequence of numbers; got {_describe(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise error(
            f"{name} must be a number or a sequence of numbers; got {_describe(value)}"
        ) from None
    if array.dtype.kind not in "iuf" or array.ndim > 1:
        raise error(
            f"{name} must be a number or a flat sequence of real numbers; got "
            f"{_describe(value)} (dtype {array.dtype}, shape {array.shape})",
        )
    with np.errstate(over="ignore"):
        array = np.atleast_1d(array.astype(np.float64))
    if not array.size and not empty:
        raise error(f"{name} is empty; give at least one number")
    if not np.all(np.isfinite(array)):
        raise error(f"{name} must hold finite numbers; got {array.tolist()}")
    if positive and np.any(array <= 0):
        raise error(f"{name} must hold numbers > 0; got {array.tolist()}")
    return array


def flag(value, name: str, *, error=OptionError) -> bool:
    """``value`` as a ``bool``: only ``True`` or ``False`` (numpy's too)."""
    if not isinstance(value, bool | np.bool_):
        raise error(f"{name} must be True or False; got {_describe(value)}")
    return bool(value)


def choice(value, name: str, options: tuple, *, error=OptionError):
    """``value`` if it is one of ``options`` (compared as strings only to strings)."""
    if not isinstance(value, str) or value not in options:
        raise error(
            f"{name} must be one of {', '.join(map(repr, options))}; got {_describe(value)}"
        )
    return value


def seed_value(value, name: str = "seed") -> int:
    """A seed: an integer in ``[0, 2**32)``."""
    return integer(value, name, minimum=0, maximum=SEED_MAX)


def frame_window(frames, name: str = "frames") -> slice | None:
    """``None`` or a contiguous ``slice(a, b)`` of integer frame indices, not empty when
    both ends have the same sign."""
    if frames is None:
        return None
    if not isinstance(frames, slice):
        raise OptionError(f"{name} must be a slice(a, b) of frame indices; got {_describe(frames)}")
    for end in (frames.start, frames.stop):
        if end is not None:
            integer(end, f"{name} (the ends of the slice)")
    if frames.step not in (None, 1):
        raise OptionError(
            f"{name} must be contiguous (step 1), the model needs uniform frame spacing; got "
            f"step {frames.step!r}"
        )
    a, b = frames.start, frames.stop
    if a is not None and b is not None and (a >= 0) == (b >= 0) and b - a < 3:
        raise OptionError(
            f"{name}={_describe(frames)} leaves {max(b - a, 0)} frames; need >= 3: give "
            "slice(a, b) with b >= a + 3"
        )
    return frames


def file_path(value, name: str, *, kind: str = "file", error=OptionError) -> Path:
    """``value`` as a ``Path``: a ``str`` or path-like, none of whose components is longer
    than the file system allows; ``kind`` ("file", "folder") words the message."""
    if not isinstance(value, str | os.PathLike) or isinstance(value, bytes):
        raise error(f"{name} must be a {kind} path (str or pathlib.Path); got {_describe(value)}")
    path = Path(value).expanduser()
    if not str(path).strip():
        raise error(f"{name} is an empty path")
    if "\x00" in str(path):
        raise error(f"{name} {str(path)!r} holds a NUL character, which no file name may")
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise error(
                f"{name}: the name {part[:40]}... has {len(os.fsencode(part))} bytes; file "
                f"systems allow {NAME_MAX}; choose a shorter name",
            )
    return path


def readable_file(value, name: str = "path") -> Path:
    """:func:`file_path`, and a file that exists is one this process may read: a
    permission problem raises ``FileFormatError`` instead of ``PermissionError``. A
    missing file is left to the reader, which names the layouts it reads."""
    path = file_path(value, name)
    try:
        path.stat()
    except FileNotFoundError:
        return path
    except OSError as err:
        raise FileFormatError(f"{path}: cannot be reached ({_reason(err)})") from err
    if not path.is_dir() and not os.access(path, os.R_OK):
        raise FileFormatError(f"{path}: permission denied; this user cannot read the file")
    return path


def _reason(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied on it or on a folder above it"
    return err.strerror or type(err).__name__


def writable_folder(folder, name: str = "folder") -> Path:
    """Create ``folder`` if needed and check that files can be created in it; raise
    ``OptionError`` naming the folder and the reason otherwise."""
    folder = file_path(folder, name, kind="folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OptionError(f"{name} {folder} is a file or lies under one; give a folder") from None
    except OSError as err:
        raise OptionError(f"{name} {folder} cannot be created ({_reason(err)})") from err
    if not folder.is_dir():
        raise OptionError(f"{name} {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{name} {folder}: permission denied; this user cannot write there")
    return folder


def host_address(text) -> str:
    """``text`` if it is an IP address or a host name (RFC 1123 labels); a dotted quad
    out of range (``999.999.999.999``) is neither."""
    if not isinstance(text, str):
        raise OptionError(f"address must be a string; got {_describe(text)}")
    try:
        ipaddress.ip_address(text.strip("[]"))
        return text
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if (
        0 < len(text) <= 253
        and not all(label.isdigit() for label in labels)
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
    ):
        return text
    raise OptionError(
        f"address {text!r} is neither an IP address nor a host name (e.g. localhost, 127.0.0.1)"
    )


def parameters(params, *, fix=(), n_phi=None):
    """``params`` coerced to a ``Parameters`` with ``fix`` applied and validated
    (:meth:`heterodyne.parameters.Parameters.validate`)."""
    from heterodyne.parameters import Parameters

    p = Parameters.coerce(params)
    if isinstance(fix, str):
        fix = (fix,)
    if not isinstance(fix, list | tuple | set | frozenset):
        raise ParameterError(
            f"fix must be a parameter name or a sequence of names; got {_describe(fix)}"
        )
    for name in fix:
        if not isinstance(name, str):
            raise ParameterError(f"fix holds {_describe(name)}; expected parameter names")
    p.fix(*fix)
    p.validate(n_phi)
    return p


def fitted_quantities(p, n_phi: int, scaling: str) -> int:
    """Number of quantities a fit varies: physics parameters, and contrast/offset per
    angle (``scaling="per_angle"``) or shared."""
    from heterodyne.parameters import SCALING_NAMES

    per = n_phi if scaling == "per_angle" else 1
    return len(p.varied) + per * sum(bool(p[name].vary) for name in SCALING_NAMES)


def check_problem(ds: xr.Dataset, p, scaling: str) -> None:
    """Something varies, and fewer quantities than finite pairs."""
    from heterodyne.data import count_nan_pairs

    n_varied = fitted_quantities(p, ds.sizes["phi"], scaling)
    if n_varied == 0:
        raise ParameterError("no parameter varies; nothing to fit (set p[name].vary = True on one)")
    n = ds.sizes["t1"]
    n_pairs = ds.sizes["phi"] * n * (n - 1) // 2 - count_nan_pairs(ds)
    if n_varied >= n_pairs:
        raise ParameterError(
            f"{n_varied} varied quantities but only {n_pairs} finite pairs t1 < t2; fix "
            "parameters, use scaling='shared', or give more frames"
        )


def least_squares_options(options: Mapping) -> dict:
    """The ``**least_squares_options`` of ``fit_nlsq``, checked against what
    ``scipy.optimize.least_squares`` accepts with bounds and fit_nlsq's own Jacobian."""
    for key in ("jac", "bounds"):
        if key in options:
            raise OptionError(
                f"{key} is set by fit_nlsq (exact JAX Jacobian, bounds from the Parameters); "
                "set bounds with p[name].min / .max"
            )
    known = (
        *LEAST_SQUARES_TOLERANCES,
        "max_nfev",
        "x_scale",
        "method",
        "loss",
        "f_scale",
        "tr_solver",
        "verbose",
    )
    for key, value in options.items():
        if key not in known:
            raise OptionError(
                f"unknown option {key}={_describe(value)}; fit_nlsq takes "
                f"{', '.join(known)} for scipy.optimize.least_squares"
            )
        if key in LEAST_SQUARES_TOLERANCES and value is not None:
            number(value, key, minimum=0.0)
        elif key == "max_nfev" and value is not None:
            integer(value, key, minimum=1)
        elif key == "method":
            choice(value, key, LEAST_SQUARES_METHODS)
        elif key == "loss" and not (isinstance(value, str) and value == "linear"):
            raise OptionError(
                f"loss={_describe(value)} is not supported, only 'linear': fit_nlsq solves "
                "the compressed normal equations (n + 1 rows), on which a robust loss "
                "would not act on the residuals; mask outlier pairs (set c2 to NaN) instead"
            )
        elif key == "f_scale":
            number(value, key, positive=True)
        elif key == "tr_solver":
            choice(value, key, TR_SOLVERS)
        elif key == "verbose":
            integer(value, key, minimum=0, maximum=2)
        elif key == "x_scale" and not (isinstance(value, str) and value == "jac"):
            numbers(value, key, positive=True)
    return dict(options)


def check_fit_nlsq(ds, params, *, fix, multistart, seed, scaling, errors, progress, options):
    """All the arguments of :func:`heterodyne.fit_nlsq`, before any compilation (of a
    multi-q Dataset: against each of its q-bins)."""
    from heterodyne import qbins
    from heterodyne.data import validate
    from heterodyne.objective import SCALINGS
    from heterodyne.uncertainty import ERRORS

    if qbins.is_multi_q(ds):
        parts = qbins.checked_bins(ds)
    else:
        parts = [validate(ds)]
    choice(scaling, "scaling", SCALINGS)
    choice(errors, "errors", ERRORS)
    if not (isinstance(multistart, str) and multistart == "auto"):
        integer(multistart, "multistart", minimum=0)
    seed_value(seed)
    flag(progress, "progress")
    least_squares_options(options)
    for one in parts:
        p = parameters(params, fix=fix, n_phi=one.sizes["phi"])
        check_problem(one, p, scaling)


def check_fit_cmc(
    ds, init, params, *, shards, chains, warmup, samples, seed, scaling, errors,
    checkpoint, likelihood, progress,
):  # fmt: skip
    """All the arguments of :func:`heterodyne.fit_cmc` but ``executor``, before any
    compilation: shards that hold at least two rows each, finite bounds of every varied
    quantity (CMC samples inside them); of a multi-q Dataset, against each q-bin."""
    from heterodyne import qbins
    from heterodyne.cmc import LIKELIHOODS
    from heterodyne.data import validate
    from heterodyne.joint_result import JointResult
    from heterodyne.nlsq_result import NLSQResult
    from heterodyne.objective import SCALINGS
    from heterodyne.uncertainty import ERRORS

    if qbins.is_multi_q(ds):
        parts = qbins.checked_bins(ds)
        if init is not None and not isinstance(init, JointResult):
            raise OptionError(
                "init of a multi-q Dataset must be a JointResult (hd.fit_nlsq of the same "
                f"Dataset) or None; got {type(init).__name__}"
            )
        if init is not None and not np.array_equal(init.params["q"].values, ds["q"].values):
            raise OptionError(
                f"init was fitted to the q-bins {init.params['q'].values.tolist()} 1/Å; ds "
                f"has {ds['q'].values.tolist()}"
            )
        inits = list(init.bins) if init is not None else [None] * len(parts)
    else:
        parts = [validate(ds)]
        if init is not None and not isinstance(init, NLSQResult):
            raise OptionError(
                f"init must be an NLSQResult (from hd.fit_nlsq) or None; got {type(init).__name__}"
            )
        inits = [init]
    n_frames = ds.sizes["t1"]
    if not (isinstance(shards, str) and shards == "auto"):
        most = max(n_frames // 2, 1)
        integer(
            shards,
            "shards ('auto' or an integer: a shard holds at least two of the "
            f"{n_frames} rows of the two-time matrix)",
            minimum=1,
            maximum=most,
        )
    integer(chains, "chains", minimum=1)
    integer(warmup, "warmup", minimum=0)
    integer(samples, "samples (R-hat splits each chain in halves)", minimum=4)
    seed_value(seed)
    if scaling is not None:
        choice(scaling, "scaling", SCALINGS)
    if errors is not None:
        choice(errors, "errors", ERRORS)
    choice(likelihood, "likelihood", LIKELIHOODS)
    if not isinstance(progress, Tracker):
        flag(progress, "progress (True, False or a heterodyne.tracker.Tracker)")
    if checkpoint is not None:
        folder = file_path(checkpoint, "checkpoint", kind="folder")
        if folder.exists() and not folder.is_dir():
            raise OptionError(f"checkpoint must be a folder; {folder} is a file")
    if init is not None:
        scaling = init.info["scaling"] if scaling is None else scaling
    for one, one_init in zip(parts, inits, strict=True):
        given = one_init.parameters() if one_init is not None and params is None else params
        p = parameters(given, n_phi=one.sizes["phi"])
        for name in p.varied:
            low, high = p[name].min, p[name].max
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ParameterError(
                    f"{name}: CMC samples inside finite bounds; got [{low:g}, {high:g}] "
                    "(set finite bounds, or fix the parameter)"
                )
        check_problem(one, p, scaling or "per_angle")


def check_load(path, *, q, phi, frames) -> Path:
    """The arguments of :func:`heterodyne.load`: a readable path, ``q`` one finite
    number > 0, a list of them or ``"all"``, ``phi`` finite angles, ``frames`` a window."""
    path = readable_file(path, "path")
    if isinstance(q, str):
        if q != "all":
            raise OptionError(f"q must be a number, a list of numbers or 'all'; got {q!r}")
    elif q is not None and np.ndim(q) > 0:
        values = numbers(q, "q [1/Å]")
        if values.size == 0 or np.any(values <= 0):
            raise OptionError(f"q must list positive wavevectors [1/Å]; got {values.tolist()}")
    elif q is not None:
        number(q, "q [1/Å]", positive=True)
    if phi is not None:
        numbers(phi, "phi [deg]")
    frame_window(frames)
    return path


def check_survey(sources, *, method, q, phi, frames, params, checkpoint, executor, progress,
                 options):  # fmt: skip
    """The arguments of :func:`heterodyne.survey`, before any file is read; returns the
    sources as a list."""
    from heterodyne import executors
    from heterodyne.survey import METHODS

    choice(method, "method", METHODS)
    executors.check(executor)
    flag(progress, "progress")
    listed = list(sources) if isinstance(sources, list | tuple) else [sources]
    if not listed:
        raise OptionError("sources is empty: give a file, a Dataset or a list of them")
    import xarray as xr

    for source in listed:
        if not isinstance(source, xr.Dataset):
            readable_file(source, "sources (a file path or a Dataset)")
    if q is not None:
        numbers(q, "q [1/Å]", positive=True)
    if phi is not None:
        numbers(phi, "phi [deg]")
    frame_window(frames)
    checkpoint_folder(checkpoint)
    for key in ("progress", "params", "ds"):
        if key in options:
            raise OptionError(f"{key} is set by survey; it cannot be passed to the fit")
    fit = fit_options(options, ("fix", "multistart", "seed", "scaling", "errors"))
    parameters(params, fix=fit.get("fix", ()))
    return listed


def checkpoint_folder(checkpoint) -> None:
    """``None`` or a folder path (created when missing), not a file."""
    if checkpoint is not None:
        folder = file_path(checkpoint, "checkpoint", kind="folder")
        if folder.exists() and not folder.is_dir():
            raise OptionError(
                f"checkpoint={str(folder)!r} is a file; give a folder (created if missing)"
            )


def fit_options(options: Mapping, known: tuple) -> dict:
    """The :func:`heterodyne.fit_nlsq` options among ``known`` in ``options``, checked,
    the rest checked as ``least_squares`` options; returns the ``known`` ones."""
    from heterodyne.objective import SCALINGS
    from heterodyne.uncertainty import ERRORS

    fit = {key: value for key, value in options.items() if key in known}
    least_squares_options({k: v for k, v in options.items() if k not in known})
    choice(fit.get("scaling", "per_angle"), "scaling", SCALINGS)
    multistart = fit.get("multistart", 0)
    if not (isinstance(multistart, str) and multistart == "auto"):
        integer(multistart, "multistart", minimum=0)
    seed_value(fit.get("seed", 0))
    choice(fit.get("errors", "nominal"), "errors", ERRORS)
    return fit


def check_age_scan(ds, *, window, step, law, params, errors, checkpoint, executor, progress,
                 options) -> tuple[int, int]:  # fmt: skip
    """The arguments of :func:`heterodyne.age_scan`, before any fit; returns
    ``(window, step)`` as integers (``step`` defaults to half the window)."""
    from heterodyne import executors
    from heterodyne.data import validate
    from heterodyne.nlsq_result import NLSQResult
    from heterodyne.parameters import Parameters
    from heterodyne.uncertainty import ERRORS

    validate(ds)
    n = ds.sizes["t1"]
    window = integer(window, "window (frames per window)", minimum=3, maximum=n)
    step = max(window // 2, 1) if step is None else integer(step, "step (frames)", minimum=1)
    choice(errors, "errors", ERRORS)
    executors.check(executor)
    flag(progress, "progress")
    checkpoint_folder(checkpoint)
    if isinstance(law, NLSQResult):
        same = law.data.sizes["t1"] == n and np.array_equal(law.data["t1"].values, ds["t1"].values)
        if not same:
            raise OptionError(
                "law is a fit of other frames than ds (its times differ): fit this "
                "Dataset (hd.fit_nlsq(ds)), give Parameters or pass law=None"
            )
    elif law is not None and not isinstance(law, Parameters):
        raise OptionError(
            f"law must be an NLSQResult of the whole matrix, Parameters or None; got "
            f"{_describe(law)}"
        )
    elif law is not None:
        law.validate()
    for key in ("progress", "ds", "fix"):
        if key in options:
            raise OptionError(
                f"{key} is set by age_scan for each window; it cannot be passed to the fits"
            )
    fit_options(options, ("multistart", "seed", "scaling"))
    parameters(params)
    return window, step
