"""Will the work fit in memory? Checked before big allocations, from a per-value estimate.

Data too large for the machine then give a message naming the memory needed, the memory
available and what to do, instead of the kernel's out-of-memory kill. The available figure
is the tighter of the system's and the cgroup's (container or batch job) and can be
overridden by ``HETERODYNE_MEMORY_LIMIT``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from heterodyne import shapes
from heterodyne.errors import DataError, OptionError

MEMORY_LIMIT_VARIABLE = "HETERODYNE_MEMORY_LIMIT"
_SIZE_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NO_LIMIT = 2**60  # cgroup v1 reports "no limit" as a number near 2**63
WINDOW_REMEDY = (
    "read fewer frames, hd.load(path, frames=slice(a, b)) or hd.select(ds, "
    "frames=slice(a, b)) (memory grows as frames²: half the frames need a quarter of the "
    "memory), or bin frames upstream"
)
# Peak memory of fit_nlsq beyond its Dataset: a part that does not grow with the data
# (compiled code, libraries) and bytes per value of the c2 grid (n_phi x N x N; a fitted
# pair is two values). The nominal fit holds the fast path's float32 copy of the upper
# triangle of the data (2 bytes per value of the size class, up to 27 % more values) and
# the evaluation's temporaries; the result's model and residual grids (float32) are made
# only when read. The peak RSS of fresh processes that read the data with hd.load rose by
# 0.22-0.34 GB at 2000 frames x 4 angles (16 M values) and 0.36-0.39 GB at 5000 x 2 (50 M
# values) above the Dataset and the libraries, taken as 0.8 GB + 4 bytes per value.
# errors="speckle" also builds the flat pairs and their residuals and adds ~56 bytes per
# value and ~240 per value of one N x N matrix (its Jacobian grids are built one angle at
# a time), taken as 70 and 290. CMC builds the flat pairs and the rows of its shards: 0.8
# GB + 30 bytes per value.
FIT_MEMORY = {
    "nominal": {"per_value": 4.0, "fixed": 0.8e9},
    "speckle": {"per_value": 70.0, "per_angle": 290.0, "fixed": 0.8e9},
    "cmc": {"per_value": 30.0, "fixed": 0.8e9},
}


def fit_needs(errors: str, n_phi: int) -> dict:
    """The :data:`FIT_MEMORY` figures of a least-squares fit of ``n_phi`` angles (keywords
    of :func:`check_memory`): the fit's copy of the data holds the angles padded to their
    size class (:func:`heterodyne.shapes.angle_class`), up to twice as many values."""
    needs = dict(FIT_MEMORY[errors])
    needs["per_value"] *= shapes.angle_class(n_phi) / n_phi
    return needs


# JAX takes a host array without copying it when its memory is aligned to this many
# bytes (jax.device_put(..., may_alias=True) on the CPU); numpy aligns to 16
ALIGNMENT = 64


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero array whose memory JAX can take over without a copy: handed to
    ``jax.device_put(array, may_alias=True)`` on the CPU, an array of the data's size is
    held once, not twice while it is copied. Nothing may write to it after."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n_bytes + ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip : skip + n_bytes].view(dtype).reshape(shape)


def check_memory(
    shape: tuple[int, ...],
    *,
    per_value: float,
    per_angle: float = 0.0,
    fixed: float = 0.0,
    what: str,
    remedy: str = WINDOW_REMEDY,
) -> None:
    """Raise ``DataError`` when work on a ``c2`` grid of ``shape`` would not fit in memory.

    Called before a big allocation or compile, so that data too large for the machine give
    a message instead of the kernel's out-of-memory kill.

    Parameters
    ----------
    shape : tuple
        ``(n_phi, N, N)``, the grid of the work.
    per_value : float
        Peak bytes per value of the grid, beyond what exists before the work.
    per_angle : float
        Further peak bytes per value of one angle's ``N x N`` matrix, for work done one
        angle at a time.
    fixed : float
        Peak bytes that do not grow with the grid (compiled code).
    what : str
        The work, named in the message (with the file for a load).
    remedy : str
        What to do instead, named in the message.

    Notes
    -----
    ``needed = fixed + N² (n_phi per_value + per_angle)`` is compared with
    :func:`available_memory`; the check is skipped where that is unknown.
    """
    n_phi, n_frames = int(shape[0]), int(shape[-1])
    needed = fixed + n_frames**2 * (n_phi * per_value + per_angle)
    available = available_memory()
    if available is None or needed <= available[0]:
        return
    raise DataError(
        f"{what} needs about {_size(needed)} for {n_phi} angle(s) x {n_frames}² frame pairs, "
        f"but {_size(available[0])} is available ({available[1]}); {remedy}. The "
        f"environment variable {MEMORY_LIMIT_VARIABLE} overrides the available figure."
    )


def _size(n_bytes: float) -> str:
    """``n_bytes`` to three significant digits in kB, MB, GB or TB (powers of 1000)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes / 1e3:.3g} kB"


def available_memory() -> tuple[float, str] | None:
    """Bytes that heterodyne may allocate now, and where that figure comes from.

    ``HETERODYNE_MEMORY_LIMIT``, when set, is the figure: a number of bytes, optionally with
    a suffix ``k``, ``M``, ``G`` or ``T`` (powers of 1000, a trailing ``B`` allowed), e.g.
    ``8G``. Set it on a shared node to keep heterodyne within a share of the memory, or above
    the detected figure to overrule the check. Otherwise the lesser of ``MemAvailable`` of
    ``/proc/meminfo`` (else the free physical pages that ``os.sysconf`` reports) and the
    headroom of the process's cgroup (the memory limit of a container or batch job, less
    what the group holds beyond reclaimable file cache). ``None`` when neither is known.
    """
    setting = os.environ.get(MEMORY_LIMIT_VARIABLE, "").strip()
    if setting:
        return _parse_bytes(setting), f"{MEMORY_LIMIT_VARIABLE}={setting}"
    system = _mem_available()
    found = [] if system is None else [system]
    group = cgroup_headroom(_read_text(Path("/proc/self/cgroup")), Path("/sys/fs/cgroup"))
    if group is not None:
        found.append((group, "cgroup memory limit less usage"))
    return min(found) if found else None


def _parse_bytes(setting: str) -> float:
    text = setting.lower().removesuffix("b")
    suffix = text[-1:] if text[-1:] in _SIZE_SUFFIXES else ""
    try:
        value = float(text.removesuffix(suffix)) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        value = np.nan
    if not np.isfinite(value) or value <= 0:
        raise OptionError(
            f"{MEMORY_LIMIT_VARIABLE}={setting!r}; expected a positive number of bytes, "
            "optionally with a suffix k, M, G or T (e.g. 8G)"
        )
    return value


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _mem_available() -> tuple[float, str] | None:
    for line in (_read_text(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024, "MemAvailable"  # reported in KiB
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return float(pages * os.sysconf("SC_PAGE_SIZE")), "free physical pages"
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_headroom(membership: str | None, root: Path) -> float | None:
    """Least headroom (limit less non-reclaimable usage) over the memory cgroups, and
    their ancestors, that ``membership`` (the text of ``/proc/self/cgroup``) names under
    ``root``; ``None`` without a limit.

    cgroup v2 lines read ``0::PATH``, v1 lines ``N:memory:PATH``. A container sees its own
    group at ``root``; a batch job (Slurm) sees ``root/PATH``, with the limit set on an
    ancestor of the process's group.
    """
    headroom = []
    for line in (membership or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        controllers, inner = fields[1:]
        if controllers == "":
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / inner.strip("/")
        for level in [folder, *folder.parents]:
            value = _group_headroom(level, names)
            if value is not None:
                headroom.append(value)
            if level == base:
                break
    return min(headroom) if headroom else None


def _group_headroom(folder: Path, names: tuple[str, str, str]) -> float | None:
    """``limit - usage + inactive file cache`` of one cgroup folder; ``None`` without a
    limit or where the files are missing or unreadable."""
    limit, usage, stat = (_read_text(folder / name) for name in (*names[:2], "memory.stat"))
    try:
        if limit is None or usage is None or limit.strip() == "max" or int(limit) >= _NO_LIMIT:
            return None
        cache = dict(row.split() for row in (stat or "").splitlines()).get(names[2], 0)
        return float(int(limit) - int(usage) + int(cache))
    except ValueError:
        return None
