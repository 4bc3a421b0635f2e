"""Hostile files: ``hd.load`` gives the right Dataset or a FileFormatError, never a crash.

Hypothesis writes APS-U, APS legacy and netCDF files of random structure, laid out as
their writers lay them out (tests/_files.py: q-maps with empty cells and their index
mapping, averaged, strided and offset frames, a negative first frame with or without a
user's t_start, legacy g2_/c2_ names numbered by bin or in sequence; sizes, dtypes and
shapes of the lists, matrices stored as one triangle or whole, NaN, inf and zero blocks,
gzip or lzf) and adds at most one defect from a catalogue (missing groups, wrong dtypes,
non-square or ragged matrices, bins past the lists or the grid, a missing mapping, a
GIXPCS map, a matrix never written, bad frame times or configuration, ...). What was
written says independently what a correct reader returns, or which problem the error
must name: the message must name the file, the path inside it and what was expected.
Whole-file damage (truncation, random bytes, directories) must raise the same error type
naming the file.
"""

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from typing import NamedTuple

import _files
import h5py
import numpy as np
import pytest
import xarray as xr
from _files import (
    APS_U_BINS,
    APS_U_C2,
    APS_U_PHI,
    APS_U_Q,
    CONFIG,
    EXPOSURE_PERIOD,
    FRAME_TIME,
    LEGACY_BINS,
    LEGACY_C2,
    LEGACY_PHI,
    LEGACY_Q,
    MAP_NAMES,
    MAPPING,
    write_h5,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import heterodyne as hd
from heterodyne.errors import HeterodyneError

SETTINGS = {"derandomize": True, "deadline": None, "database": None}
# Mostly the sizes a fit needs; sometimes too few frames, which load must refuse.
FRAMES = st.sampled_from((3, 4, 5, 6, 7) * 3 + (0, 1, 2))
STORAGE = ("upper", "lower", "full", "upper, NaN below", "lower, NaN above")
MATRIX_DTYPES = ("<f8", "<f4", ">f8", "<f2")
LIST_DTYPES = ("<f8", "<f4", ">f8")


class Problem(NamedTuple):
    """A problem of a file: the words its error must contain."""

    words: tuple[str, ...]
    meta: bool = True  # seen in metadata alone, so q_values fails too


@dataclass
class Case:
    """A file to write and what a correct reader makes of it."""

    files: dict
    q_value: float  # the q asked for, as stored
    c2: np.ndarray
    phi: np.ndarray
    t: np.ndarray
    dt: float
    q_bins: np.ndarray  # what q_values returns
    names: list  # path of each matrix in the file
    members: list  # index (in names) of each matrix of the q-bin read
    problems: list = field(default_factory=list)
    gzip: tuple = ()
    lzf: tuple = ()
    t_start: float | None = None  # passed to load
    layout: dict = field(default_factory=dict)  # processed bins or bin numbers


def _matrix(draw, n):
    """One matrix: its symmetric float64 values and the array stored in the file.

    NaN, inf and zero blocks are placed symmetrically; a one-triangle storage keeps the
    block's part in that triangle, the other triangle is zero or NaN. A zero off the
    diagonal is a pair never written: missing (NaN) in the values a reader returns.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lag = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    noise = rng.normal(0.0, 0.01, (n, n))
    dtype = draw(st.sampled_from(MATRIX_DTYPES))
    full = (1.0 + 0.3 * np.exp(-lag / 3.0) + (noise + noise.T) / 2).astype(dtype)
    for _ in range(draw(st.integers(0, 2))):
        rows = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
        cols = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
        block = np.zeros((n, n), dtype=bool)
        block[slice(*rows), slice(*cols)] = True
        full[block | block.T] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))
    storage = draw(st.sampled_from(STORAGE))
    keep = np.ones((n, n), dtype=bool)
    if storage != "full":
        keep = np.triu(keep) if storage.startswith("upper") else np.tril(keep)
    fill = np.nan if "NaN" in storage else 0.0
    logical = full.astype(np.float64)
    logical[(logical == 0) & ~np.eye(n, dtype=bool)] = np.nan
    return logical, np.where(keep, full, fill).astype(dtype)


def _stored_list(draw, values):
    """A q or phi list as a beamline might store it: dtype and (n,), (1, n) or (n, 1)."""
    stored = np.asarray(values).astype(draw(st.sampled_from(LIST_DTYPES)))
    return draw(st.sampled_from([stored, stored[None, :], stored[:, None]]))


def _frame_time(draw):
    """Stored frame time (scalar, (1,) or (1, 1); float64 or float32) and its value."""
    dt = draw(st.sampled_from([1e-3, 0.0123, 0.05, 1.0, 7.5]))
    stored = np.asarray(dt, dtype=draw(st.sampled_from(["<f8", "<f4"])))
    stored = draw(st.sampled_from([stored, stored[None], stored[None, None]]))
    return stored, float(stored.ravel()[0])


def _expect(files, logical, names, members, *, phis, q_value, dt, t, q_bins):
    """The Dataset a correct reader returns for the matrices ``members``, at times ``t``;
    its problems."""
    order = sorted(members, key=lambda k: phis[k])
    n = len(t)
    c2 = np.stack([logical[k] for k in order]) if order else np.empty((0, n, n))
    problems = []
    if n < 3:
        problems.append(Problem(("at least 3",), meta=False))
    upper = np.triu_indices(n, 1)
    for k in order:
        if not np.isfinite(logical[k][upper]).any():
            problems.append(Problem(("all NaN/inf", names[k]), meta=False))
            problems.append(Problem((names[k], "holds no correlation"), meta=False))
    return Case(
        files=files,
        q_value=q_value,
        c2=c2,
        phi=np.array([phis[k] for k in order]),
        t=np.asarray(t, dtype=np.float64),
        dt=dt,
        q_bins=q_bins,
        names=names,
        members=members,
        problems=problems,
    )


def _matrix_group_defects(group):
    """The group of c2_NNNNN matrices or one matrix is malformed (both beamline layouts)."""

    def drop_matrices(case):
        for key in [key for key in case.files if key.startswith(group + "/")]:
            del case.files[key]

    def empty_group(draw, case):
        drop_matrices(case)
        case.files[group] = {}
        return Problem((group, "holds no", "_NNNNN correlation matrices"))

    def group_is_dataset(draw, case):
        drop_matrices(case)
        case.files[group] = np.ones((4, 4))
        return Problem((group, "is a dataset; expected a group"))

    def broken_group_link(draw, case):
        drop_matrices(case)
        case.files[group] = h5py.SoftLink("/nowhere")
        return Problem((group, "broken link; expected a group"))

    def no_group(draw, case):
        drop_matrices(case)
        return Problem(("unknown layout", group))

    def matrix_is_group(draw, case):
        name = draw(st.sampled_from(case.names))
        case.files[name] = {}
        return Problem((name, "is a group; expected a dataset"))

    def matrix_dtype(draw, case):
        name = draw(st.sampled_from(case.names))
        dtype = draw(st.sampled_from(["<i4", "?", "<c16", "S4"]))
        case.files[name] = np.ones(np.shape(case.files[name]), dtype=dtype)
        return Problem((name, "expected floating-point"))

    def matrix_shape(draw, case):
        name = draw(st.sampled_from(case.names))
        n = case.c2.shape[-1]
        shape = draw(st.sampled_from([(n, n + 1), (n + 2,), (2, n, n), (1, n + 1)]))
        case.files[name] = draw(st.sampled_from([np.ones(shape), h5py.Empty("<f8")]))
        return Problem((name, "expected a square (N, N) matrix"))

    def ragged(draw, case):
        assume(len(case.names) >= 2)
        name = draw(st.sampled_from(case.names))
        n = case.c2.shape[-1] + draw(st.sampled_from([-1, 1, 2]))
        assume(n >= 0)
        case.files[name] = np.ones((n, n))
        return Problem((group, "differ in size"))

    return {
        "empty matrix group": empty_group,
        "matrix group is a dataset": group_is_dataset,
        "matrix group is a broken link": broken_group_link,
        "no matrix group": no_group,
        "matrix is a group": matrix_is_group,
        "matrix of wrong dtype": matrix_dtype,
        "matrix not square": matrix_shape,
        "ragged matrices": ragged,
    }


def _vector_defects(inner):
    """A q, phi or bin list that is not a finite numeric vector."""

    def wrong_dtype(draw, case):
        n = np.size(case.files[inner])
        case.files[inner] = draw(
            st.sampled_from([np.full(n, b"0.01"), np.ones(n, dtype="?"), np.ones(n, "<c16")])
        )
        return Problem((inner, "expected numbers"))

    def matrix_not_vector(draw, case):
        case.files[inner] = np.ones((2, np.size(case.files[inner]) + 1))
        return Problem((inner, "expected a vector"))

    def empty(draw, case):
        case.files[inner] = draw(st.sampled_from([np.ones(0), h5py.Empty("<f8")]))
        return Problem((inner, "empty", "expected"))

    def non_finite(draw, case):
        values = np.array(case.files[inner], dtype=np.float64)
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        case.files[inner] = values
        return Problem((inner, "non-finite", "expected finite numbers"))

    def missing(draw, case):
        case.files[inner] = draw(st.sampled_from([None, h5py.SoftLink("/nowhere")]))
        if case.files[inner] is None:
            del case.files[inner]
        return Problem((inner, "is missing; expected a dataset"))

    return {
        f"{inner} of wrong dtype": wrong_dtype,
        f"{inner} not a vector": matrix_not_vector,
        f"{inner} empty": empty,
        f"{inner} not finite": non_finite,
        f"{inner} missing": missing,
    }


def _frame_time_defects(inner, looked_for):
    def missing(draw, case):
        for key in looked_for:
            case.files.pop(key, None)
        return Problem(("no frame spacing found", *looked_for))

    def bad_value(draw, case):
        value, words = draw(
            st.sampled_from(
                [
                    (0.0, "expected one positive frame time"),
                    (-case.dt, "expected one positive frame time"),
                    (np.array([case.dt, case.dt]), "expected one positive frame time"),
                    (np.nan, "expected finite numbers"),
                    (np.inf, "expected finite numbers"),
                    (np.bytes_(b"0.05"), "expected numbers"),
                    (h5py.Empty("<f8"), "empty dataspace; expected numbers"),
                ]
            )
        )
        case.files[inner] = value
        return Problem((inner, words))

    return {"no frame time": missing, "bad frame time": bad_value}


def _q_not_positive(q_path, index_of_bin):
    def defect(draw, case):
        values = np.array(case.files[q_path])
        k = draw(st.integers(0, len(case.names) - 1))
        values.flat[index_of_bin(case, k)] = draw(st.sampled_from([0.0, -0.01]))
        case.files[q_path] = values
        return Problem((q_path, "expected q > 0"))

    return defect


def _all_nan_angle(draw, case):
    k = draw(st.sampled_from(case.members))
    n = case.c2.shape[-1]
    case.files[case.names[k]] = np.full((n, n), draw(st.sampled_from([np.nan, np.inf])))
    if n < 3:
        return Problem(("at least 3",), meta=False)
    return Problem(("all NaN/inf", case.names[k]), meta=False)


def _aps_u_phi_twice(draw, case):
    # Found only when the q-bin is read, so q_values does not see it.
    assume(len(case.members) >= 2)
    first, second = draw(st.permutations(case.members))[:2]
    phi = np.array(case.files[APS_U_PHI])
    phi.flat[case.layout["processed"][second][1]] = phi.flat[case.layout["processed"][first][1]]
    case.files[APS_U_PHI] = phi
    return Problem((APS_U_PHI, "same phi", "expected one bin per angle"), meta=False)


def _aps_u_q_bin(case, k):
    return case.layout["processed"][k][0]


def _aps_u_bins_past(draw, case):
    bins = np.array(case.files[APS_U_BINS], dtype=np.int64)
    n_bins = np.size(case.files[APS_U_Q]) * np.size(case.files[APS_U_PHI])
    bins[draw(st.integers(0, bins.size - 1))] = draw(st.sampled_from([0, -3, n_bins + 1]))
    case.files[APS_U_BINS] = bins
    return Problem((APS_U_BINS, "past the", "bins are numbered from 1"))


def _aps_u_bins_fractional(draw, case):
    bins = np.array(case.files[APS_U_BINS], dtype=np.float64)
    bins[draw(st.integers(0, bins.size - 1))] += 0.5
    case.files[APS_U_BINS] = bins
    return Problem((APS_U_BINS, "non-integer", "expected bin numbers"))


def _aps_u_matrix_count(draw, case):
    count = len(case.names)
    if draw(st.booleans()) or count == 1:
        case.files[f"{APS_U_C2}/c2_{count + 1:05d}"] = np.ones(case.c2.shape[1:])
    else:
        del case.files[draw(st.sampled_from(case.names))]
    return Problem((APS_U_C2, f"expected c2_00001..c2_{count:05d}"))


def _aps_u_no_mapping(draw, case):
    """A q-map without dynamic_index_mapping: the formula holds only without empty cells,
    which a processed bin n0 * n1 proves; otherwise the reader must refuse."""
    case.files.pop(MAPPING)
    n_cells = np.size(case.files[APS_U_Q]) * np.size(case.files[APS_U_PHI])
    if case.layout["empty"] or int(np.max(case.files[APS_U_BINS])) != n_cells:
        return Problem((MAPPING, "is missing", "empty"))
    return None


def _aps_u_mapping_past(draw, case):
    n_cells = np.size(case.files[APS_U_Q]) * np.size(case.files[APS_U_PHI])
    mapping = np.array(case.files[MAPPING])
    mapping[int(case.files[APS_U_BINS][draw(st.integers(0, len(case.names) - 1))]) - 1] = draw(
        st.sampled_from([-1, n_cells, n_cells + 5])
    )
    case.files[MAPPING] = mapping
    return Problem((MAPPING, "outside the", "cells of the q-map"))


def _aps_u_gixpcs(draw, case):
    names = draw(st.sampled_from([("x", "y"), ("q", "none"), ("qr", "qz"), ("phi", "q")]))
    case.files[MAP_NAMES] = np.array([name.encode() for name in names])
    return Problem((MAP_NAMES, "not by (q, phi)"))


def _aps_u_bad_config(draw, case):
    name = draw(st.sampled_from(["avg_frame", "stride_frame"]))
    value, words = draw(
        st.sampled_from(
            [
                (np.int64(0), "expected an integer >= 1"),
                (np.int64(-2), "expected an integer >= 1"),
                (np.float64(1.5), "non-integer"),
                (np.array([1, 2]), "expected one"),
            ]
        )
    )
    case.files[f"{CONFIG}/{name}"] = value
    return Problem((f"{CONFIG}/{name}", words))


def _never_written(draw, case):
    """A matrix of the q-bin read holds zeros only (declared but never written); with
    fewer than 3 frames the frame count may be named instead (see _expect)."""
    k = draw(st.sampled_from(case.members))
    shape = np.shape(case.files[case.names[k]])
    case.files[case.names[k]] = np.zeros(shape, dtype=draw(st.sampled_from(["<f4", "<f8"])))
    return Problem((case.names[k], "holds no correlation", "phi="), meta=False)


APS_U_DEFECTS = {
    **_matrix_group_defects(APS_U_C2),
    **_vector_defects(APS_U_Q),
    **_vector_defects(APS_U_PHI),
    **_vector_defects(APS_U_BINS),
    **_frame_time_defects(FRAME_TIME, (FRAME_TIME,)),
    "two bins at one phi": _aps_u_phi_twice,
    "q not positive": _q_not_positive(APS_U_Q, _aps_u_q_bin),
    "all-NaN angle": _all_nan_angle,
    "bin past the lists": _aps_u_bins_past,
    "fractional bin": _aps_u_bins_fractional,
    "matrix count differs from bins": _aps_u_matrix_count,
    "no index mapping": _aps_u_no_mapping,
    "mapping past the grid": _aps_u_mapping_past,
    "not a (q, phi) map": _aps_u_gixpcs,
    "bad averaging or stride": _aps_u_bad_config,
    "matrix never written": _never_written,
}


def _config(draw, frame_time, n):
    """The correlator's configuration, the frame spacing, the times of the ``n`` stored
    frames (or None when the file cannot place them) and the problem that leaves."""
    config = {}
    avg, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    begin = draw(st.sampled_from([0, 0, 7, 400, -1, -300]))
    for name, value, default in (("begin_frame", begin, 0), ("avg_frame", avg, 1)):
        if value != default or draw(st.booleans()):
            config[name] = value
    if stride != 1 or draw(st.booleans()):
        config["stride_frame"] = stride
    if draw(st.booleans()):
        config["end_frame"] = -1
    # stored frame k averages raw frames begin + stride (avg k + j), j < avg; raw frame m
    # ends at (m + 1) frame_time (FILES.md)
    raw = begin + stride * (avg * np.arange(n)[:, None] + np.arange(avg)[None, :])
    t = frame_time * (raw + 1).mean(axis=1) if begin >= 0 else None
    return config, frame_time * (stride * avg), t


@st.composite
def aps_u_cases(draw, defect):
    """An APS-U file of random structure, spoilt by ``defect`` (a good file for None)."""
    n_q, n_phi = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    q_list = 0.002 * 1.6 ** np.array(draw(st.permutations(range(6)))[:n_q])
    phi_list = -90.0 + 20.0 * np.array(draw(st.permutations(range(10)))[:n_phi])
    pairs = st.tuples(st.integers(0, n_q - 1), st.integers(0, n_phi - 1))
    # boost_corr correlates bins in increasing roi order, which is the cells' flat order
    processed = sorted(draw(st.lists(pairs, min_size=1, max_size=n_q * n_phi, unique=True)))
    others = [(a, b) for a in range(n_q) for b in range(n_phi) if (a, b) not in processed]
    empty = draw(st.sets(st.sampled_from(others))) if others else set()
    n = draw(FRAMES)
    logical, stored = zip(*[_matrix(draw, n) for _ in processed], strict=True)
    frame_time, stored_time = _frame_time(draw)
    config, dt, t = _config(draw, stored_time, n)
    q_stored, phi_stored = _stored_list(draw, q_list), _stored_list(draw, phi_list)
    map_names = draw(st.sampled_from([("q", "phi"), ("Q", "Phi"), None]))
    files = _files.aps_u(
        q_stored,
        phi_stored,
        processed,
        stored,
        frame_time,
        empty=empty,
        map_names=map_names,
        config=config,
    )
    files[APS_U_BINS] = files[APS_U_BINS].astype(draw(st.sampled_from(["<i8", "<i4", "<u2"])))
    if draw(st.booleans()):
        files[f"{APS_U_C2}/c2_average"] = np.ones((2, 2))
        files["entry/sample/name"] = np.bytes_(b"latex spheres")
    names = [f"{APS_U_C2}/c2_{k + 1:05d}" for k in range(len(processed))]
    q_values = q_stored.ravel().astype(np.float64)[[iq for iq, _ in processed]]
    phis = phi_stored.ravel().astype(np.float64)[[ip for _, ip in processed]]
    iq = draw(st.sampled_from(sorted({iq for iq, _ in processed})))
    members = [k for k, (jq, _) in enumerate(processed) if jq == iq]
    t_start = None
    if t is None and draw(st.booleans()):
        t_start = draw(st.sampled_from([0.0, 3.5, -2.0]))
    if t_start is not None:
        t = t_start + dt * np.arange(n)
    case = _expect(
        files,
        logical,
        names,
        members,
        phis=phis,
        q_value=float(q_values[members[0]]),
        dt=dt,
        t=dt * np.arange(n) if t is None else t,
        q_bins=np.unique(q_values),
    )
    if t is None:
        case.problems.append(Problem(("begin_frame is negative", "t_start="), meta=False))
    case.t_start = t_start
    case.layout.update(processed=processed, empty=empty)
    if n >= 1:
        compression = draw(st.sampled_from(["gzip", "lzf", None]))
        if compression is not None:
            setattr(case, compression, tuple(names))
    return _with_defect(draw, case, defect)


def _with_defect(draw, case, defect):
    if defect is not None:
        problem = defect(draw, case)
        if problem is not None:
            case.problems.append(problem)
    return case


def _legacy_bin(case, k):
    return case.layout["numbers"][k] - 1


def _legacy_add_matrix(case, bin_number, matrix):
    """Add a matrix for ``bin_number`` the way the case's writer names it."""
    number = bin_number
    if LEGACY_BINS in case.files:
        listed = np.ravel(case.files[LEGACY_BINS])
        case.files[LEGACY_BINS] = np.r_[listed, bin_number].astype(np.int64)[:, None]
        number = listed.size + 1 if case.layout["sequential"] else bin_number
    case.files[f"{LEGACY_C2}/{case.layout['prefix']}_{number:05d}"] = matrix


def _legacy_phi_twice(draw, case):
    """A second bin with the (q, phi) of a bin read, and a matrix for it."""
    k = draw(st.sampled_from(case.members))
    index = _legacy_bin(case, k)
    q, phi = (np.ravel(case.files[inner]) for inner in (LEGACY_Q, LEGACY_PHI))
    case.files[LEGACY_Q], case.files[LEGACY_PHI] = np.r_[q, q[index]], np.r_[phi, phi[index]]
    _legacy_add_matrix(case, q.size + 1, case.files[case.names[k]])
    return Problem((LEGACY_PHI, "same phi", "expected one bin per angle"), meta=False)


def _legacy_lists_differ(draw, case):
    values = np.ravel(case.files[LEGACY_PHI])
    shorter = values.size > 1 and draw(st.booleans())
    case.files[LEGACY_PHI] = values[:-1] if shorter else np.r_[values, 0.0]
    return Problem((LEGACY_Q, LEGACY_PHI, "expected one (q, phi) per bin"))


def _legacy_matrix_past(draw, case):
    number = draw(st.sampled_from([0, np.size(case.files[LEGACY_Q]) + 1]))
    _legacy_add_matrix(case, number, np.ones(case.c2.shape[1:]))
    return Problem((LEGACY_C2, "past the", "bins are numbered from 1"))


def _legacy_list_disagrees(draw, case):
    """xpcs/qphi_bin_to_process that lists one bin past the lists: the matrices' numbers
    match neither writer's numbering, or (one matrix, numbered 1) the bin is past."""
    case.files[LEGACY_BINS] = np.array([np.size(case.files[LEGACY_Q]) + 5], dtype=np.uint64)
    case.problems.append(Problem((LEGACY_C2, "past the", "bins are numbered from 1")))
    return Problem((LEGACY_BINS, "expected"))


LEGACY_DEFECTS = {
    **_matrix_group_defects(LEGACY_C2),
    **_vector_defects(LEGACY_Q),
    **_vector_defects(LEGACY_PHI),
    **_frame_time_defects(EXPOSURE_PERIOD, (EXPOSURE_PERIOD, FRAME_TIME)),
    "two bins at one (q, phi)": _legacy_phi_twice,
    "q not positive": _q_not_positive(LEGACY_Q, _legacy_bin),
    "all-NaN angle": _all_nan_angle,
    "list lengths differ": _legacy_lists_differ,
    "matrix past the lists": _legacy_matrix_past,
    "bin list disagrees": _legacy_list_disagrees,
    "matrix never written": _never_written,
}


@st.composite
def legacy_cases(draw, defect):
    """An APS legacy file of random structure, spoilt by ``defect``."""
    n_q, n_phi = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    q_grid = 0.002 * 1.6 ** np.array(draw(st.permutations(range(6)))[:n_q])
    phi_grid = -90.0 + 20.0 * np.array(draw(st.permutations(range(10)))[:n_phi])
    pairs = st.tuples(st.integers(0, n_q - 1), st.integers(0, n_phi - 1))
    bins = draw(st.lists(pairs, min_size=1, max_size=n_q * n_phi, unique=True))
    numbers = sorted(draw(st.sets(st.integers(1, len(bins)), min_size=1)))
    n = draw(FRAMES)
    logical, stored = zip(*[_matrix(draw, n) for _ in numbers], strict=True)
    frame_time, dt = _frame_time(draw)
    q_stored = _stored_list(draw, q_grid[[iq for iq, _ in bins]])
    phi_stored = _stored_list(draw, phi_grid[[ip for _, ip in bins]])
    path = draw(st.sampled_from([EXPOSURE_PERIOD, FRAME_TIME]))
    prefix, sequential = draw(st.sampled_from(["g2", "c2"])), draw(st.booleans())
    files = _files.legacy(
        q_stored,
        phi_stored,
        dict(zip(numbers, stored, strict=True)),
        frame_time,
        path,
        prefix=prefix,
        sequential=sequential,
    )
    if not sequential and draw(st.booleans()):
        files[LEGACY_BINS] = np.array(numbers)[:, None]  # xpcs-eigen keeps its input list
    if path == EXPOSURE_PERIOD and draw(st.booleans()):
        files[FRAME_TIME] = 3 * dt  # the exposure period takes precedence
    names = [
        f"{LEGACY_C2}/{prefix}_{k + 1 if sequential else number:05d}"
        for k, number in enumerate(numbers)
    ]
    q_values = q_stored.ravel().astype(np.float64)[np.array(numbers) - 1]
    phis = phi_stored.ravel().astype(np.float64)[np.array(numbers) - 1]
    q_value = draw(st.sampled_from(sorted(set(q_values.tolist()))))
    members = [k for k in range(len(numbers)) if q_values[k] == q_value]
    case = _expect(
        files,
        logical,
        names,
        members,
        phis=phis,
        q_value=q_value,
        dt=dt,
        t=dt * np.arange(1, n + 1),
        q_bins=np.unique(q_values),
    )
    case.layout.update(numbers=numbers, prefix=prefix, sequential=sequential)
    return _with_defect(draw, case, defect)


def _check_beamline(case, path):
    """Load the file written from ``case``; "dataset" or "error", as the case says."""
    write_h5(path, case.files, gzip=case.gzip, lzf=case.lzf)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zero pairs masked: checked below
            ds = hd.load(path, q=case.q_value, t_start=case.t_start)
    except HeterodyneError as err:
        _assert_names(err, path, case.problems)
        outcome = "error"
    else:
        assert not case.problems, f"no error; expected one naming {case.problems}"
        hd.validate(ds)
        np.testing.assert_array_equal(ds["c2"].values, case.c2)
        np.testing.assert_array_equal(ds["phi"].values, case.phi)
        np.testing.assert_allclose(ds["t1"].values, case.t, rtol=1e-13)
        np.testing.assert_array_equal(ds["t2"].values, ds["t1"].values)
        assert float(ds["q"]) == case.q_value
        assert ds.attrs["dt"] == case.dt
        assert ds.attrs["nan_pairs"] == _nan_pairs(case.c2)
        assert ds.attrs["dropped_frames"] == _dropped_frames(case.c2)
        outcome = "dataset"
        if ds.attrs["nan_pairs"]:
            outcome = "dataset with masked pairs"
    # q_values reads only metadata: it fails on exactly the problems metadata shows.
    if any(problem.meta for problem in case.problems):
        with pytest.raises(HeterodyneError, match=re.escape(str(path))):
            hd.q_values(path)
    else:
        np.testing.assert_array_equal(hd.q_values(path), case.q_bins)
    return outcome


def _dropped_frames(c2):
    """Frames with no finite value off the diagonal, at any angle."""
    n = c2.shape[-1]
    finite = np.isfinite(c2) & ~np.eye(n, dtype=bool)
    return int(np.sum(~finite.any(axis=(0, 2))))


def _nan_pairs(c2):
    i, j = np.triu_indices(c2.shape[-1], 1)
    return int((~np.isfinite(c2[:, i, j])).sum())


def _assert_names(err, path, problems):
    """The message names the file and, for one of ``problems``, all of its words."""
    message = str(err)
    assert problems, f"unexpected error: {message}"
    assert str(path) in message
    assert any(all(word in message for word in problem.words) for problem in problems), (
        f"{message!r} names none of {[problem.words for problem in problems]}"
    )


@dataclass
class NetcdfCase:
    """A Dataset to write with xarray and what a correct reader returns."""

    written: xr.Dataset
    expected: xr.Dataset
    problems: list


def _nc_nan_pairs_stale(draw, ds):
    # Written by another tool: the count is not trusted, the reader makes it again.
    if draw(st.booleans()):
        del ds.attrs["nan_pairs"]
    else:
        ds.attrs["nan_pairs"] = ds.attrs["nan_pairs"] + 7
    return ds, None


def _nc_text_coordinate(draw, ds):
    name = draw(st.sampled_from(["t1", "phi", "q"]))
    text = ds[name].values.astype(str)
    return ds.assign_coords({name: (ds[name].dims, text, ds[name].attrs)}), Problem(
        (f"coordinate {name!r}", "expected numbers")
    )


def _nc_no_coordinate(draw, ds):
    name = draw(st.sampled_from(["t1", "t2", "phi", "q"]))
    return ds.drop_vars(name), Problem((f"no coordinate {name!r}",))


def _nc_bad_q(draw, ds):
    q = draw(st.sampled_from([0.0, -0.01, np.nan, np.inf]))
    return ds.assign_coords(q=((), q, ds["q"].attrs)), Problem(("q must be positive",))


def _nc_bad_times(draw, ds):
    t = ds["t1"].values.copy()
    kind = draw(st.sampled_from(["uneven", "decreasing", "t2 differs"]))
    if kind == "t2 differs":
        return ds.assign_coords(t2=t + ds.attrs["dt"]), Problem(("t1 and t2 differ",))
    t[-1] += ds.attrs["dt"] / 2 if kind == "uneven" else -2 * ds.attrs["dt"]
    problem = Problem((f"t1 is not {'uniformly spaced' if kind == 'uneven' else 'increasing'}",))
    return ds.assign_coords(t1=t, t2=t), problem


def _nc_bad_dt(draw, ds):
    ds.attrs["dt"] = draw(st.sampled_from([2 * ds.attrs["dt"], "fast", -1.0]))
    return ds, Problem(("attrs['dt']",))


def _nc_phi_not_finite(draw, ds):
    phi = ds["phi"].values.copy()
    phi[draw(st.integers(0, phi.size - 1))] = np.nan
    return ds.assign_coords(phi=phi), Problem(("phi holds non-finite",))


def _nc_sigma_not_positive(draw, ds):
    sigma = np.full(ds["c2"].shape, 0.01)
    sigma[draw(st.integers(0, sigma.shape[0] - 1)), 0, -1] = draw(st.sampled_from([0.0, -0.01]))
    ds["sigma"] = (("phi", "t1", "t2"), sigma)
    return ds, Problem(("sigma must be > 0",))


def _nc_c2_malformed(draw, ds):
    kind = draw(st.sampled_from(["transposed", "integer", "all NaN", "two frames"]))
    if kind == "transposed":
        return ds.transpose("t1", "phi", "t2"), Problem(("c2 has dims", "expected ('phi'"))
    if kind == "integer":
        ds["c2"] = (ds["c2"].dims, np.ones(ds["c2"].shape, dtype=np.int32))
        return ds, Problem(("c2 has dtype int32", "expected floating point"))
    if kind == "all NaN":
        ds["c2"][draw(st.integers(0, ds.sizes["phi"] - 1))] = np.nan
        return ds, Problem(("c2 is all NaN/inf",))
    return ds.isel(t1=slice(0, 2), t2=slice(0, 2)), Problem(("c2 has 2 frames", "at least 3"))


def _nc_no_c2(draw, ds):
    return ds.rename(c2="g2"), Problem(("unknown layout", "c2 (netcdf)"))


NETCDF_DEFECTS = {
    "stale nan_pairs": _nc_nan_pairs_stale,
    "text coordinate": _nc_text_coordinate,
    "missing coordinate": _nc_no_coordinate,
    "bad q": _nc_bad_q,
    "bad times": _nc_bad_times,
    "bad dt attribute": _nc_bad_dt,
    "phi not finite": _nc_phi_not_finite,
    "sigma not positive": _nc_sigma_not_positive,
    "malformed c2": _nc_c2_malformed,
    "no c2": _nc_no_c2,
}


@st.composite
def netcdf_cases(draw, defect):
    """A canonical Dataset written by xarray, spoilt by ``defect``."""
    n, n_phi = draw(st.integers(3, 7)), draw(st.integers(1, 3))
    c2 = np.stack([_matrix(draw, n)[0] for _ in range(n_phi)])
    upper = np.triu_indices(n, 1)
    assume(np.isfinite(c2[:, upper[0], upper[1]]).any(axis=1).all())
    phi = -90.0 + 20.0 * np.array(draw(st.permutations(range(10)))[:n_phi])
    dt = draw(st.sampled_from([1e-3, 0.05, 1.0]))
    t = dt * (draw(st.integers(0, 50)) + np.arange(1, n + 1))
    sigma = np.full(c2.shape, 0.01) if draw(st.booleans()) else None
    expected = hd.from_arrays(c2, t, phi, 0.002 * 1.6 ** draw(st.integers(0, 5)), sigma=sigma)
    if defect is None:
        return NetcdfCase(expected, expected, [])
    written, problem = defect(draw, expected.copy(deep=True))
    return NetcdfCase(written, expected, [] if problem is None else [problem])


def _check_netcdf(case, path):
    """Load the netCDF file written from ``case``; "dataset" or "error", as it says."""
    case.written.to_netcdf(path, engine="h5netcdf")
    try:
        ds = hd.load(path)
    except HeterodyneError as err:
        _assert_names(err, path, case.problems)
        outcome = "error"
    else:
        assert not case.problems, f"no error; expected one naming {case.problems}"
        hd.validate(ds)
        xr.testing.assert_identical(ds, case.expected)
        outcome = "dataset"
    try:
        q_bins = hd.q_values(path)
    except HeterodyneError as err:
        assert str(path) in str(err)
    else:
        if not case.problems:
            np.testing.assert_array_equal(q_bins, [float(case.expected["q"])])
    return outcome


def _run(strategy, check, max_examples, tmp_path):
    """Check ``max_examples`` files drawn from ``strategy``; count the outcomes."""
    outcomes = Counter()
    paths = (tmp_path / f"case{k}.h5" for k in count())

    @settings(max_examples=max_examples, **SETTINGS)
    @given(strategy)
    def run(case):
        outcomes[check(case, next(paths))] += 1

    run()
    return outcomes


@pytest.fixture(scope="module")
def tally():
    """Outcomes per kind of file over the module, printed at its end (``pytest -s``)."""
    outcomes = {}
    yield outcomes
    total = sum(outcomes.values(), Counter())
    print()
    for kind, counts in [*outcomes.items(), ("all", total)]:
        print(
            f"hostile files, {kind}: {counts.total()} cases, {counts.total() - counts['error']} "
            f"correct Datasets ({counts['dataset with masked pairs']} with masked pairs), "
            f"{counts['error']} clear errors"
        )


BEAMLINE = [
    (layout, strategy, name, defect)
    for layout, strategy, catalogue in [
        ("aps_u", aps_u_cases, APS_U_DEFECTS),
        ("aps_legacy", legacy_cases, LEGACY_DEFECTS),
    ]
    for name, defect in [("good file", None), *catalogue.items()]
]


@pytest.mark.parametrize(
    "layout, strategy, defect",
    [(layout, strategy, defect) for layout, strategy, _, defect in BEAMLINE],
    ids=[f"{layout}: {name}" for layout, _, name, _ in BEAMLINE],
)
def test_beamline_file_loads_right_or_raises_a_clear_error(
    tmp_path, tally, layout, strategy, defect
):
    examples = 80 if defect is None else 6
    outcomes = _run(strategy(defect), _check_beamline, examples, tmp_path)
    tally.setdefault(layout, Counter()).update(outcomes)
    assert outcomes.total() == examples


@pytest.mark.parametrize(
    "defect", [None, *NETCDF_DEFECTS.values()], ids=["good file", *NETCDF_DEFECTS]
)
def test_netcdf_file_loads_right_or_raises_a_clear_error(tmp_path, tally, defect):
    examples = 20 if defect is None else 5
    outcomes = _run(netcdf_cases(defect), _check_netcdf, examples, tmp_path)
    tally.setdefault("netcdf", Counter()).update(outcomes)
    assert outcomes.total() == examples


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
WHOLE_FILE_WORDS = ("is not an HDF5 file", "cannot be read as HDF5", "truncated", "is a directory")


@st.composite
def wrecked_files(draw, good):
    """Bytes of a damaged file (or ``None`` for a directory); ``good`` maps names to bytes."""
    kind = draw(st.sampled_from(["truncated", "random", "signature", "text", "directory"]))
    if kind == "truncated":
        raw = good[draw(st.sampled_from(sorted(good)))]
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind in ("random", "signature"):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        noise = rng.bytes(draw(st.integers(0, 4096)))
        return HDF5_SIGNATURE + noise if kind == "signature" else noise
    if kind == "text":
        return draw(st.text(max_size=200)).encode()
    return None


def _check_wreck(raw, path):
    if raw is None:
        path.mkdir()
    else:
        path.write_bytes(raw)
    for read in (hd.load, hd.q_values):
        with pytest.raises(HeterodyneError) as info:
            read(path)
        _assert_names(info.value, path, [Problem((words,)) for words in WHOLE_FILE_WORDS])
    return "error"


def test_damaged_files_raise_a_clear_error(tmp_path, tally):
    n = 6
    good = {
        "aps_u.h5": _files.aps_u([0.01], [0.0], [(0, 0)], [np.ones((n, n))], 0.1),
        "legacy.h5": _files.legacy([0.01], [0.0], {1: np.ones((n, n))}, 0.1),
    }
    raw = {name: write_h5(tmp_path / name, files).read_bytes() for name, files in good.items()}
    ds = hd.from_arrays(np.ones((1, n, n)), 0.1 * np.arange(1, n + 1), [0.0], 0.01)
    raw["data.nc"] = hd.to_netcdf(ds, tmp_path / "data.nc").read_bytes()
    outcomes = _run(wrecked_files(raw), _check_wreck, 80, tmp_path)
    tally["damaged"] = outcomes
    assert outcomes["error"] == 80
