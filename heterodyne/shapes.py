"""Shapes that repeat: sizes rounded up to a few classes, so that compiled code is reused.

JAX compiles a function once for each shape of its arguments. A new frame window of a
Dataset (the explorer, the dashboard), the q-bins of a survey with different numbers of
missing pairs and the windows of an age scan would each compile again. The compiled
functions are therefore called with their sizes rounded up to a *size class*: ``n``
itself when it has at most ``BITS`` significant binary digits, else the next number that
has (16, 18, 20, ..., 30, 32, 36, 40, ..., 120, 128, 144, 160, ...), at least ``MINIMUM``.
A class is at most ``2**(1 - BITS)`` (12.5 %) larger than the size, so a pass over
``N x N`` pairs costs at most ~27 % more; about ``2**(BITS - 1)`` classes span each
doubling.

The number of angles is rounded up the same way, to a power of two (:func:`angle_class`:
1, 2, 4, 8, ...), so that a subset of the angles (``hd.select(ds, phi=...)``, the
explorer's and the dashboard's choice, q-bins with different angle counts) reuses the
code of any earlier fit of as many angles up to the class.

The padding is masked, never fitted: padded frames repeat the last frame time (no time
passes, so every per-frame quantity stays that of the last frame, finite) and carry no
pair; padded pairs have weight 0; padded angles repeat the last angle, hold no pair and
carry weight 0, and their contrast and offset are no parameter of the solver.
"""

from __future__ import annotations

import numpy as np

#: significant binary digits of a size class
BITS = 4
#: the smallest class
MINIMUM = 16


def size_class(n: int) -> int:
    """The smallest size class ``>= n``: ``ceil(n / 2**k) 2**k`` with ``2**k`` the place
    of the ``BITS``-th significant binary digit of ``n``; at least :data:`MINIMUM`."""
    n = max(int(n), MINIMUM)
    shift = max(n.bit_length() - BITS, 0)
    return -(-n >> shift) << shift


def angle_class(n: int) -> int:
    """The smallest power of two ``>= n`` (at least 1): the number of angles a compiled
    call is given for ``n`` angles. At most ``2n - 1``; one angle stays one."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pad_edge(values, size: int) -> np.ndarray:
    """``values`` (1-D) padded to ``size`` by repeating the last one: frame times whose
    padding is no time at all, angles whose padding is a copy of the last."""
    values = np.asarray(values)
    return np.concatenate([values, np.full(size - values.shape[0], values[-1], values.dtype)])


def pad_zeros(values, size: int, axis: int = -1) -> np.ndarray:
    """``values`` padded with zeros to ``size`` along ``axis``: weights and data of
    padding that counts for nothing."""
    values = np.asarray(values)
    widths = [(0, 0)] * values.ndim
    widths[axis] = (0, size - values.shape[axis])
    return np.pad(values, widths)
