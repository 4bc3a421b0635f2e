"""The fitted pairs of a Dataset and the weighted residual on them.

MODEL.md, "Fitting conventions": each independent pair ``t_i < t_j`` of each angle is
fitted once, the diagonal never; pairs whose ``c2`` (or ``sigma``) is not finite are
masked. The residual of a pair is ``(model - data) / sigma``, or ``model - data`` when
the Dataset has no ``sigma``. The fitted quantities are packed in one vector ``z =
[physics (14), contrast (n_scale), offset (n_scale)]`` with ``n_scale = n_phi``
(per-angle scaling) or 1 (shared).

The pairs come as :class:`Pairs` (flattened over angles; the NLSQ path and the pairwise
reference of CMC) or as :class:`Rows` (whole rows of the matrices; CMC's fast path).
:mod:`heterodyne.objective` builds on them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import xarray as xr

from heterodyne import model, shapes
from heterodyne.errors import DataError
from heterodyne.parameters import PHYSICS_NAMES


class Pairs(NamedTuple):
    """The fitted pairs of a Dataset, flattened over angles (a JAX pytree)."""

    t: jax.Array  #: frame times [s], (N,)
    phi: jax.Array  #: angles [deg], (n_phi,)
    q: jax.Array  #: wavevector [1/Å], ()
    angle: jax.Array  #: angle index of each pair, (n_pairs,)
    i: jax.Array  #: first frame index (i < j), (n_pairs,)
    j: jax.Array  #: second frame index, (n_pairs,)
    c2: jax.Array  #: measured c2, (n_pairs,), in float32 (``STORAGE``)
    weight: jax.Array  #: 1 / sigma, or 1 without sigma, (n_pairs,)

    @property
    def n_pairs(self) -> int:
        return int(self.c2.shape[0])


# The data of a fit are stored in float32, as beamline files store c2: the rounding,
# ~6e-8 of |c2|, is far below any measured noise, and every sum is taken in float64.
STORAGE = np.float32


def fitted_pairs(ds: xr.Dataset, dtype=STORAGE) -> Pairs:
    """The pairs ``t_i < t_j`` of every angle with finite ``c2`` (and ``sigma``) of a
    Dataset its caller has validated (:meth:`Objective.build` does); ``c2`` stored as
    ``dtype``.

    Built one angle and one array at a time, each array handed to JAX as soon as it is
    filled: beyond the result, memory holds one angle's pairs and one per-pair array.
    """
    n_phi, n = ds.sizes["phi"], ds.sizes["t1"]
    i, j = (v.astype(np.int32) for v in np.triu_indices(n, 1))
    c2_values = ds["c2"].values
    sigma_values = ds["sigma"].values if "sigma" in ds.data_vars else None

    def finite(a):
        keep = np.isfinite(c2_values[a][i, j])
        if sigma_values is not None:
            keep &= np.isfinite(sigma_values[a][i, j])
        return keep

    keep = np.stack([finite(a) for a in range(n_phi)])
    counts = keep.sum(axis=1)
    if not counts.any():
        raise DataError("no finite c2 pairs to fit")

    def per_pair(values_of, dtype):
        out = np.empty(int(counts.sum()), dtype=dtype)
        ends = np.cumsum(counts)
        for a in range(n_phi):
            out[ends[a] - counts[a] : ends[a]] = values_of(a)[keep[a]]
        return jax.device_put(out)

    return Pairs(
        t=jax.device_put(np.asarray(ds["t1"].values, dtype=np.float64)),
        phi=jax.device_put(np.asarray(ds["phi"].values, dtype=np.float64)),
        q=jax.device_put(np.asarray(float(ds["q"].values))),
        angle=jax.device_put(np.repeat(np.arange(n_phi, dtype=np.int32), counts)),
        i=per_pair(lambda a: i, np.int32),
        j=per_pair(lambda a: j, np.int32),
        c2=per_pair(lambda a: c2_values[a][i, j], dtype),
        weight=(
            jax.device_put(np.ones(int(counts.sum())))
            if sigma_values is None
            else per_pair(lambda a: 1.0 / sigma_values[a][i, j], np.float64)
        ),
    )


def fitted_rows(ds: xr.Dataset, angle: int, start: int, stop: int, storage=STORAGE):
    """The rows ``start .. stop - 1`` of one angle's fitted pairs, as stored for a fit:
    ``(c2, weight)``, each ``(stop - start, N)``; ``c2`` rounded to ``storage`` (as
    float64 numbers), ``weight`` ``1 / sigma`` (or 1) on the fitted pairs ``t_i < t_j`` with finite
    ``c2`` (and ``sigma``), 0 elsewhere, with ``c2`` 0 there too."""
    c2 = ds["c2"].values[angle, start:stop].astype(storage).astype(np.float64)
    keep = np.isfinite(c2)
    keep &= np.arange(c2.shape[-1])[None, :] > np.arange(start, stop)[:, None]
    if "sigma" in ds.data_vars:
        with np.errstate(divide="ignore"):
            weight = 1.0 / ds["sigma"].values[angle, start:stop]
        keep &= np.isfinite(weight)
        np.copyto(weight, 0.0, where=~keep)
    else:
        weight = keep.astype(np.float64)
    np.copyto(c2, 0.0, where=~keep)
    return c2, weight


def pair_counts(ds: xr.Dataset, rows: int = 256) -> np.ndarray:
    """The number of fitted pairs of each angle (:func:`fitted_rows`), counted ``rows``
    rows at a time."""
    n_phi, n = ds.sizes["phi"], ds.sizes["t1"]
    return np.array(
        [
            sum(
                int(np.count_nonzero(fitted_rows(ds, a, s, min(s + rows, n))[1]))
                for s in range(0, n, rows)
            )
            for a in range(n_phi)
        ]
    )


def residual_grid(ds: xr.Dataset, model_rows, dtype=STORAGE) -> tuple[np.ndarray, float]:
    """The weighted residuals ``(model - c2) / sigma`` on the grid, NaN where a pair is
    not fitted (the diagonal, non-finite ``c2``), the lower triangle the mirror of the
    upper; and their sum of squares over the fitted pairs (float64).

    ``model_rows`` yields ``(angle, first row, rows)`` of the model
    (:func:`heterodyne.model.grid_rows`); each residual is formed in float64 from them
    and the stored ``c2``, then kept as ``dtype``.
    """
    grid = np.full(ds["c2"].shape, np.nan, dtype=dtype)
    chi2 = 0.0
    for k, start, rows in model_rows:
        stop = start + rows.shape[0]
        c2, weight = fitted_rows(ds, k, start, stop)
        r = (rows - c2) * weight
        chi2 += float(np.sum(r * r))
        grid[k, start:stop] = np.where(weight > 0, r, np.nan)
    n = grid.shape[-1]
    for matrix in grid:
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            lower = np.arange(stop)[None, :] < np.arange(start, stop)[:, None]
            matrix[start:stop, :stop] = np.where(
                lower, matrix[:stop, start:stop].T, matrix[start:stop, :stop]
            )
    return grid, chi2


class Rows(NamedTuple):
    """Whole rows of the two-time matrices of every angle: the pairs ``(t_i, t_j)`` of
    the frames ``i`` in ``rows`` with every frame ``j`` (a JAX pytree). Only the fitted
    pairs carry weight; the others (``j <= i``, masked, padding rows) have weight 0."""

    t: jax.Array  #: frame times [s], (N,)
    phi: jax.Array  #: angles [deg], (n_phi,)
    q: jax.Array  #: wavevector [1/Å], ()
    rows: jax.Array  #: frame index of each row, (R,)
    c2: jax.Array  #: measured c2, 0 where not fitted, (n_phi, R, N)
    weight: jax.Array  #: 1 / sigma (or 1) on the fitted pairs, else 0, (n_phi, R, N)


def row_block(pairs: Pairs, rows: np.ndarray, size: int) -> Rows:
    """The fitted pairs whose first frame is in ``rows`` as a :class:`Rows` block of
    ``size`` rows (numpy arrays), padded with weight-0 rows, and its frames padded to
    their size class (:mod:`heterodyne.shapes`) with weight-0 columns: shards of windows
    of similar length share one compiled sampler."""
    n_phi, n = int(pairs.phi.shape[0]), shapes.size_class(int(pairs.t.shape[0]))
    angle, i, j = (np.asarray(a) for a in (pairs.angle, pairs.i, pairs.j))
    position = np.full(n, -1)
    position[rows] = np.arange(rows.size)
    keep = position[i] >= 0
    c2, weight = np.zeros((2, n_phi, size, n))
    c2[angle[keep], position[i[keep]], j[keep]] = np.asarray(pairs.c2)[keep]
    weight[angle[keep], position[i[keep]], j[keep]] = np.asarray(pairs.weight)[keep]
    padded = np.concatenate([rows, np.zeros(size - rows.size, dtype=rows.dtype)])
    return Rows(
        t=shapes.pad_edge(pairs.t, n),
        phi=np.asarray(pairs.phi),
        q=np.asarray(pairs.q),
        rows=padded.astype(np.int32),
        c2=c2,
        weight=weight,
    )


def unpack(z, n_scale: int):
    """Split the packed vector into ``(physics (14,), contrast, offset)``."""
    n = len(PHYSICS_NAMES)
    return z[:n], z[n : n + n_scale], z[n + n_scale : n + 2 * n_scale]


def model_at_pairs(z, pairs: Pairs, n_scale: int):
    """Model ``c2`` at the fitted pairs from the packed vector ``z``."""
    # With shared scaling contrast and offset have shape (1,) and broadcast to all angles.
    physics, contrast, offset = unpack(z, n_scale)
    return model.c2_pairs(
        physics, contrast, offset, pairs.t, pairs.phi, pairs.q, pairs.angle, pairs.i, pairs.j
    )


def residuals(z, pairs: Pairs | Rows, n_scale: int):
    """Weighted residuals ``(model - data) * weight`` at the fitted pairs: (n_pairs,)
    for :class:`Pairs`, (n_phi, R, N) for :class:`Rows` (0 where the weight is 0)."""
    if isinstance(pairs, Rows):
        physics, contrast, offset = unpack(z, n_scale)
        c2 = model.c2_rows(physics, contrast, offset, pairs.t, pairs.phi, pairs.q, pairs.rows)
        return (c2 - pairs.c2) * pairs.weight
    return (model_at_pairs(z, pairs, n_scale) - pairs.c2) * pairs.weight
