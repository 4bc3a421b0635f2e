"""The NLSQ normal equations from the separable form of the model: O(N) transcendentals.

``least_squares`` in :mod:`heterodyne.nlsq` needs only ``(J^T J, J^T r, r^T r)``. On the
upper triangle ``t_i < t_j`` the model is a sum of ``M = 4`` rank-one terms
(:func:`heterodyne.model.correlation_factors`)::

    g_ij = sum_m a_im b_jm E_ijm,     E_ijm = exp(-(e_jm - e_im)) <= 1

so the Jacobian row of a pair of angle ``a`` (contrast ``c_a``) is, with per-frame
derivatives ``Da_im = da_im + a_im de_im`` and ``Db_jm = db_jm - b_jm de_jm``::

    dg_ij = sum_m E_ijm (Da_im b_jm + a_im Db_jm)

and the three quantities need no pairwise Jacobian. With ``v_ij = [c_a dg_ij, g_ij, 1]``
the Jacobian row of a pair (in the coordinates physics, contrast, offset), the residual
``r = o + c g - d`` (``d`` the data, ``o`` the offset) gives, summed over pairs::

    J^T J = sum v v^T,    J^T r = o sum v + c sum v g - sum v d,
    r^T r = o² n + 2 o c sum g + c² sum g² - 2 (o sum d + c sum g d) + sum d²

- the terms with the data, ``sum v d``, need ``X_im = sum_{j>i} d_ij E_ijm b_jm`` and
  ``Y_jm = sum_{i<j} d_ij E_ijm a_im``: one product of the data with ``2 M`` vectors, the
  only pass over the data (:func:`_data_pass`); ``sum d`` and ``sum d²`` are constants;
- every other sum is a sum over pairs of the model alone, read from ``sum v v^T``
  (:func:`_separable_gram`): per-block sums of per-frame factors, carried across blocks
  by prefix and suffix sums, ``O(N M² P²)``.

Exactness: ``E_ijm`` is never formed as ``exp(e_i) exp(-e_j)``, which overflows: a pair
in different blocks is split at a block's first frame ``c`` between them, so
``exp(e_i - e_c) <= 1`` and ``exp(e_c - e_j) <= 1``, and the sums are carried from one
block's first frame to the next by ``exp(e_c - e_c') <= 1``. A diagonal block of the data
pass is split at its first frame too when its exponents span at most ``DIAG_SPAN``
(factors up to ``exp(300)``), and is computed pair by pair otherwise; the diagonal blocks
of ``sum v v^T`` (8 frames) always pair by pair. Only values below ~1e-308 underflow,
where the true value is below that too.

Accuracy: the expanded sums round at ~1e-16 of their terms' magnitudes, so they equal the
pairwise Jacobian path to ~1e-13 except where the terms of a column cancel (the
reference and sample terms of ``d/df0`` at ``r = s`` with equal rates, the default start).
There the true entry is rounding on both paths; a column below ``RESOLUTION`` of its
magnitude is set to zero, so ``J^T J`` never gets a negative diagonal. ``r^T r`` is a
difference of sums of size ``sum d²``: its rounding is ~1e-16 of that, not of ``r^T r``
(~1e-12 relative at 1 % noise); the data are centered per angle to keep ``sum d²`` small.

Where it applies: the separable sums hold when the weight ``1 / sigma`` is one number per
angle (no ``sigma``, the usual case for two-time data, or a constant ``sigma`` per angle).
Pairs masked because their ``c2`` is not finite are zero in ``d``; their Jacobian rows
are computed one by one and subtracted from ``sum v v^T``, so the fast path is used while
they are fewer than the fitted pairs. Elsewhere :func:`blocks` returns ``None`` and
:mod:`heterodyne.nlsq` uses its blocked ``jax.jacfwd`` path, the reference this module is
tested against.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from heterodyne import compilation, model, shapes
from heterodyne.memory import aligned_zeros
from heterodyne.pairs import STORAGE, fitted_rows, unpack
from heterodyne.parameters import PHYSICS_NAMES

# A diagonal block whose exponents span at most this much is split at its first frame
# like the off-diagonal ones (factors up to exp(DIAG_SPAN), far from overflow); a wider
# one is computed pair by pair.
DIAG_SPAN = 300.0
# Frames per block of the J^T J sums: pairs within a block are summed one by one, pairs
# across blocks through per-block sums (8 was fastest at N = 200 to 2000).
GRAM_BLOCK = 8
# Frames x angles per step of the J^T J sums: the temporaries of a step (~8 kB per frame
# and angle) stay a few MB, where larger ones were paged in anew at every evaluation.
GRAM_CHUNK = 2048
# A column of J^T J smaller than this fraction of its magnitude (the sum of its separate
# terms' squares) is rounding: its terms cancel to below what the sums resolve (~1e-15).
RESOLUTION = 1e-11
# Data of at most this many values (angles x padded frames²) are evaluated as one
# compiled program, larger ones in four (normal_equations).
ONE_PROGRAM = 4 * 1024**2
# Masked pairs are corrected in chunks of at most this many, so that their Jacobian rows
# take O(MASK_CHUNK x P) memory whatever their number.
MASK_CHUNK = 2**14
# Masked-pair arrays are padded to a power of two at least this long: datasets of one
# shape with a different number of NaN pairs reuse the compiled code.
MIN_MASK_PAD = 256


class Blocks(NamedTuple):
    """The fitted pairs of a Dataset laid out in square tiles of frames (a JAX pytree).

    The ``N`` frames are padded to their size class ``N'`` (:mod:`heterodyne.shapes`:
    windows of similar length share the compiled code), and that to ``n_blocks * B``;
    ``live`` marks the frames of the data. The angles are padded to their class
    ``n_phi'`` (:func:`heterodyne.shapes.angle_class`): a padded angle repeats the last
    ``phi`` and has no data, weight 0 and center 0, so it adds nothing to any sum.
    Only the upper triangle is stored, in tiles of ``B x B`` frames: ``diagonal[K, a]``
    the pairs of block ``K`` with itself (above its diagonal), and ``tiles[s, c, a]`` those
    of rows of block ``K`` with columns of a later block ``L``, ``(K, L)`` the tile
    ``s * n_blocks + c`` of :func:`tile_pairs` (tiles past the last are zero). They hold
    ``d = c2 - center`` (centering makes the expanded ``r^T r`` a difference of smaller
    sums); pairs that are not fitted (diagonal, non-finite, padding) are zero.
    """

    t: jax.Array  #: frame times [s], padded with the last one, (N',)
    live: jax.Array  #: 1 for a frame of the data, 0 for padding, (N',)
    phi: jax.Array  #: angles [deg], padded with the last one, (n_phi',)
    q: jax.Array  #: wavevector [1/Å], ()
    diagonal: jax.Array  #: (n_blocks, n_phi', B, B) tiles of each block with itself
    tiles: jax.Array  #: (n_steps, n_blocks, n_phi', B, B) tiles of a block with a later one
    weight: jax.Array  #: (n_phi',) the weight 1 / sigma of every pair of each angle
    center: jax.Array  #: (n_phi',) mean c2 of each angle's fitted pairs, subtracted
    sum_d: jax.Array  #: (n_phi',) sum of the centered c2 ``d`` over each angle's fitted pairs
    sum_d2: jax.Array  #: (n_phi',) sum of ``d²`` over each angle's fitted pairs
    masked_angle: jax.Array  #: angle of each masked pair (padded to a power of two)
    masked_i: jax.Array  #: first frame of each masked pair
    masked_j: jax.Array  #: second frame of each masked pair
    masked_valid: jax.Array  #: 1 for a masked pair, 0 for padding


def tile_pairs(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column blocks ``(K, L)``, ``K < L``, of the off-diagonal tiles of
    :class:`Blocks`, in row order, padded with ``(0, 0)`` (a zero tile) to a whole number
    of steps of ``n_blocks`` tiles (at least one), shape ``(n_steps, n_blocks)`` each."""
    rows, columns = np.triu_indices(n_blocks, 1)
    n_steps = max(1, -(-rows.size // n_blocks))
    pad = n_steps * n_blocks - rows.size
    rows, columns = (np.pad(v, (0, pad)).reshape(n_steps, n_blocks) for v in (rows, columns))
    return rows, columns


def block_size(n_frames: int) -> int:
    """Frames per block: the power of two nearest ``4 sqrt(N)``, between 16 and 128.

    Diagonal blocks cost ``O(N B)`` and the panel products ``N / B`` matrix products
    whose efficiency grows with ``B``.
    """
    return int(np.clip(2 ** np.round(np.log2(4.0 * np.sqrt(n_frames))), 16, 128))


def blocks(ds: xr.Dataset, block: int | None = None, dtype=None, storage=STORAGE) -> Blocks | None:
    """The fitted pairs of ``ds`` (:func:`heterodyne.pairs.fitted_rows`) in the block
    layout of the fast path, or ``None`` where the fast path does not apply (weights not
    constant per angle, or more masked pairs than fitted ones).

    Built once per fit, straight from the Dataset, ``block`` rows at a time: beyond the
    layout, memory holds a few blocks of rows. ``block`` (frames per block) defaults to
    :func:`block_size`. The data are the numbers of ``c2`` rounded to ``storage``
    (:data:`heterodyne.pairs.STORAGE`, float32), which every path fits; the centered
    data are kept as ``dtype`` (default ``storage``). The center is a float32 number,
    so that ``c2 - center`` is exact in float32 wherever ``c2`` lies within a factor 2 of
    it (Sterbenz), as two-time data (offset ~1) do. ``sum d`` and ``sum d²`` are taken
    from the stored values.
    """
    n_phi, n = ds.sizes["phi"], ds.sizes["t1"]
    dtype = storage if dtype is None else dtype
    n_class = shapes.size_class(n)
    size = block_size(n_class) if block is None else int(block)
    n_blocks = -(-n_class // size)
    starts = range(0, n, size)

    phi_class = shapes.angle_class(n_phi)
    tile_rows, tile_columns = tile_pairs(n_blocks)
    tile_index = {(k, c): step * tile_rows.shape[1] + place for (step, place), k, c in
                  zip(np.ndindex(tile_rows.shape), tile_rows.ravel(), tile_columns.ravel(),
                      strict=True) if k < c}  # fmt: skip
    # one pass over the Dataset: the values as stored, pairs not fitted (and padding) NaN;
    # centered and zeroed below, once the centers are known
    diagonal = np.full((n_blocks, phi_class, size, size), np.nan, dtype)
    tiles = aligned_zeros((*tile_rows.shape, phi_class, size, size), dtype)
    tiles.fill(np.nan)
    flat_tiles = tiles.reshape(-1, phi_class, size, size)
    count, total = np.zeros(n_phi), np.zeros(n_phi)
    low, high = np.full(n_phi, np.inf), np.full(n_phi, -np.inf)
    masked = []
    for a in range(n_phi):
        for k, start in enumerate(starts):
            stop = min(start + size, n)
            c2, w = fitted_rows(ds, a, start, stop, storage)
            fitted = w > 0
            count[a] += np.count_nonzero(fitted)
            total[a] += c2.sum()
            if fitted.any():
                low[a], high[a] = min(low[a], w[fitted].min()), max(high[a], w[fitted].max())
            values = np.where(fitted, c2, np.nan).astype(dtype)  # the upper triangle
            for column in range(k, n_blocks):
                part = values[:, column * size : (column + 1) * size]
                tile = diagonal[k] if column == k else flat_tiles[tile_index[k, column]]
                tile[a, : part.shape[0], : part.shape[1]] = part
            upper = np.arange(n)[None, :] > np.arange(start, stop)[:, None]
            i, j = np.nonzero(upper & ~fitted)
            if i.size:
                masked.append(np.stack([np.full(i.size, a), i + start, j]))
    if np.any(low[count > 0] != high[count > 0]):
        return None
    weight = np.where(count > 0, low, 0.0)
    n_masked = int(np.count_nonzero(count)) * n * (n - 1) // 2 - int(count.sum())
    if n_masked > count.sum():
        return None

    center = (total / np.maximum(count, 1)).astype(np.float32).astype(np.float64)
    center = shapes.pad_zeros(center, phi_class)  # padded angles: no pair, center 0
    sum_d, sum_d2 = np.zeros(phi_class), np.zeros(phi_class)
    for a in range(phi_class):
        # a step of tiles at a time: the temporaries stay small next to the layout
        for part in (diagonal[:, a], *tiles[:, :, a]):
            np.subtract(part, center[a].astype(dtype), out=part)
            np.copyto(part, 0.0, where=np.isnan(part))
            sum_d[a] += part.sum(dtype=np.float64)
            sum_d2[a] += np.square(part, dtype=np.float64).sum()
    masked = [m for m in masked if count[m[0, 0]] > 0]

    m_angle, m_i, m_j = (
        np.concatenate(masked, axis=1) if masked else np.zeros((3, 0), dtype=np.int32)
    )
    pad = max(MIN_MASK_PAD, 2 ** int(np.ceil(np.log2(n_masked)))) if n_masked else 0
    valid = np.zeros(pad)
    valid[:n_masked] = 1.0

    def padded(v):
        return jax.device_put(np.pad(v, (0, pad - v.size)).astype(np.int32))

    return Blocks(
        t=jax.device_put(shapes.pad_edge(ds["t1"].values.astype(np.float64), n_class)),
        live=jax.device_put((np.arange(n_class) < n).astype(np.float64)),
        phi=jax.device_put(shapes.pad_edge(ds["phi"].values.astype(np.float64), phi_class)),
        q=jax.device_put(np.asarray(float(ds["q"]))),
        diagonal=jax.device_put(diagonal),
        tiles=jax.device_put(tiles, may_alias=True),  # nearly the data's size: not copied
        weight=jax.device_put(shapes.pad_zeros(weight, phi_class)),
        center=jax.device_put(center),
        sum_d=jax.device_put(sum_d),
        sum_d2=jax.device_put(sum_d2),
        masked_angle=padded(m_angle),
        masked_i=padded(m_i),
        masked_j=padded(m_j),
        masked_valid=jax.device_put(valid),
    )


def frame_factors(physics, t, phi, q):
    """The per-frame factors ``(a, b, e)`` of the separable model
    (:func:`heterodyne.model.correlation_factors`) from the 14 physics values."""
    frames = model.frame_integrals(physics, t)
    return model.correlation_factors(frames, q, model.parallel_wavevector(physics, phi, q))


def _factor_derivatives(x_physics, template, free_physics, t, phi, q):
    """Factors ``(a, b, e)`` and their exact derivatives along the varied physics
    parameters, tangent axis last: one ``jvp`` per parameter, batched by ``vmap``, which
    shares the primal (faster here than ``jax.jacfwd``, whose output transposes)."""

    def factors(y):
        return frame_factors(template[: len(PHYSICS_NAMES)].at[free_physics].set(y), t, phi, q)

    def push(tangent):
        return jax.jvp(factors, (x_physics,), (tangent,))

    primal, tangents = jax.vmap(push, out_axes=(None, -1))(jnp.eye(x_physics.shape[0]))
    return primal, tangents


def normal_equations(x, template, free, data: Blocks, n_scale: int, n_physics: int):
    """``(J^T J, J^T r, r^T r)`` of the weighted residuals at ``x``, from the separable form.

    The arguments of the blocked Jacobian path of :mod:`heterodyne.nlsq`, with the data as
    :class:`Blocks` instead of pairs, and ``n_physics`` (static): how many of the varied
    parameters are physics ones. ``z = template.at[free].set(x)`` packs
    ``[physics (14), contrast (n_scale), offset (n_scale)]`` for the padded angles of
    ``data`` (``n_scale`` their number, or 1) and ``free`` lists the varied physics
    entries first, ascending, so the first ``n_physics`` entries of ``x`` are the varied
    physics parameters (:meth:`heterodyne.Objective.padding` packs them so). The residual
    of a fitted pair of angle ``a`` is ``w_a (offset_a + contrast_a g_ij - c2_ij)``; a
    padded angle has weight 0, and its entries of the outputs are zero.

    Each angle contributes, in the coordinates ``(varied physics, contrast_a, offset_a)``,
    the Jacobian row ``w_a [c_a dg_ij, g_ij, 1]``; its sums over pairs are assembled per
    angle, added into the coordinates ``(varied physics, all contrasts, all offsets)`` and
    restricted to the varied ones. Derivatives are taken only along the varied physics
    parameters, so the cost grows with their number, not with the 14 of the table. A
    column whose terms cancel below ``RESOLUTION`` of their magnitude is returned as zero.

    Four compiled stages: the factors and their derivatives, the pass over the data, the
    sums over pairs of the model, and their assembly. Up to ``ONE_PROGRAM`` values of
    the data they run as one compiled program (:func:`evaluate`), beyond as four calls in
    turn (:func:`stages`): as one program the same operations ran ~1.35x slower at 2000
    frames x 4 angles, ~5 % faster at 1000 x 4 and 2000 x 1; at small sizes, where an
    evaluation takes a millisecond, four calls cost a third more in dispatch.
    """
    args = (x, template, free, data, n_scale, n_physics)
    n_blocks, n_phi, size, _ = data.diagonal.shape
    if n_phi * (n_blocks * size) ** 2 <= ONE_PROGRAM:
        return evaluate(*args)
    return stages(*args)


def stages(x, template, free, data: Blocks, n_scale: int, n_physics: int):
    """:func:`normal_equations` as its four compiled stages, called in turn."""
    a, b, e, Da, Db, scale, base = _factor_stage(
        x, template, free, data.t, data.live, data.phi, data.q, data.center, n_scale, n_physics
    )
    X, Y, dg = _data_pass(a, b, e, data.diagonal, data.tiles)
    masked = (data.masked_angle, data.masked_i, data.masked_j, data.masked_valid)
    gram, magnitude = _fitted_gram(a, b, e, Da, Db, scale, data.live, masked)
    sums = (data.weight, data.sum_d, data.sum_d2)
    return _assemble(X, Y, dg, gram, magnitude, Da, Db, scale, base, free, sums, n_scale, n_physics)


#: :func:`normal_equations` as one compiled program (the stages inlined), its traced
#: program kept on disk (:func:`heterodyne.compilation.exported`): the first fit's
#: largest.
evaluate = compilation.exported(stages, static_argnums=(4, 5))


@partial(jax.jit, static_argnums=(8, 9))
def _factor_stage(x, template, free, t, live, phi, q, center, n_scale: int, n_physics: int):
    """Factors ``(a, b, e)``, ``Da``, ``Db`` of the module docstring, the contrast and
    the offset less the data's center, per angle; ``a``, ``b``, ``Da``, ``Db`` are zero
    at padded frames (``live`` 0), so that their pairs add nothing to any sum."""
    z = template.at[free].set(x)
    _, contrast, offset = unpack(z, n_scale)
    n_phi = phi.shape[0]
    (a, b, e), (da, db, de) = _factor_derivatives(
        x[:n_physics], template, free[:n_physics], t, phi, q
    )
    scale = jnp.broadcast_to(contrast, (n_phi,))
    base = jnp.broadcast_to(offset, (n_phi,)) - center
    Da, Db = da + a[..., None] * de, db - b[..., None] * de
    mask = live[:, None]
    a, b, Da, Db = a * mask, b * mask, Da * mask[..., None], Db * mask[..., None]
    return a, b, e, Da, Db, scale, base


@partial(jax.jit, static_argnums=(11, 12))
def _assemble(X, Y, dg, gram, magnitude, Da, Db, scale, base, free, sums, n_scale, n_physics):
    """``(J^T J, J^T r, r^T r)`` in the varied coordinates from the per-angle sums;
    ``sums`` is ``(weight, sum_d, sum_d2)`` of :class:`Blocks`."""
    weight, sum_d, sum_d2 = sums
    n_phi = weight.shape[0]
    # residual-free: with v = [c dg, g, 1] and r = base + c g - d (base = offset - center),
    # sum v r = base sum v + c sum v g - sum v d, and r^T r likewise from sums of v v^T
    physics_d = jnp.einsum("aimp,aim->ap", Da, X) + jnp.einsum("aimp,aim->ap", Db, Y)
    vd = jnp.concatenate([scale[:, None] * physics_d, dg[:, None], sum_d[:, None]], 1)
    jtr_angle = base[:, None] * gram[:, -1] + scale[:, None] * gram[:, -2] - vd
    rtr_angle = (
        base**2 * gram[:, -1, -1]
        + 2 * base * scale * gram[:, -1, -2]
        + scale**2 * gram[:, -2, -2]
        - 2 * (base * sum_d + scale * dg)
        + sum_d2
    )

    # coordinates (varied physics, contrast (n_scale), offset (n_scale)), then the varied
    k = np.arange(n_phi) % n_scale
    index = np.concatenate(
        [
            np.broadcast_to(np.arange(n_physics), (n_phi, n_physics)),
            (n_physics + k)[:, None],
            (n_physics + n_scale + k)[:, None],
        ],
        axis=1,
    )
    varied = jnp.concatenate(
        [jnp.arange(n_physics), free[n_physics:] - len(PHYSICS_NAMES) + n_physics]
    )
    squared = weight**2
    size = n_physics + 2 * n_scale
    jtj = (
        jnp.zeros((size, size))
        .at[index[:, :, None], index[:, None, :]]
        .add(squared[:, None, None] * gram)
    )
    jtr = jnp.zeros(size).at[index].add(squared[:, None] * jtr_angle)
    magnitude = jnp.zeros(size).at[index].add(squared[:, None] * magnitude)
    jtj, jtr, magnitude = jtj[varied][:, varied], jtr[varied], magnitude[varied]
    # Where the terms of a column cancel (at r = s with equal rates the reference and
    # sample terms of d/df0 do), the separable sums hold only rounding, of either sign: the
    # parameter has no resolvable effect at x, and its column is zero.
    live = jnp.diag(jtj) > RESOLUTION * magnitude
    jtj = jnp.where(live[:, None] & live[None, :], jtj, 0.0)
    return 0.5 * (jtj + jtj.T), jnp.where(live, jtr, 0.0), squared @ rtr_angle


@jax.jit
def _data_pass(a, b, e, diagonal, tiles):
    """One pass over the data ``d``: ``X``, ``Y`` of the module docstring, shape
    ``(n_phi, N, M)``, and per angle ``sum d g = sum a X``
    over the fitted pairs (``d`` is zero elsewhere); ``diagonal`` and ``tiles`` as in
    :class:`Blocks`, the upper triangle only.

    For the rows of block ``K`` (first frame ``s``, next block's first frame ``s'``),
    ``X_i = exp(e_i - e_s') sum_{j >= s'} d_ij exp(e_s' - e_j) b_j`` and
    ``Y_i = exp(e_s - e_i) sum_{j < s} d_ij exp(e_j - e_s) a_j``, every factor ``<= 1``.
    A tile ``d_KL`` (``K < L``) adds to the sum of ``X`` over the rows of ``K`` and,
    transposed (``d`` is symmetric), to that of ``Y`` over the rows of ``L``: the stored
    data are read once, ``n_blocks`` tiles a step. The pairs of each diagonal block (its
    upper triangle) are added: split at the block's first frame where its exponents span
    at most ``DIAG_SPAN``, else pair by pair.
    """
    n_phi, n, m = a.shape
    n_blocks, _, size, _ = diagonal.shape
    n_pad = n_blocks * size
    pad = n_pad - n
    # padded frames have a = b = 0 and the last exponent, so every factor stays <= 1
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
    b = jnp.pad(b, ((0, 0), (0, pad), (0, 0)))
    e = jnp.pad(e, ((0, pad), (0, 0)), mode="edge")
    e_blocks = e.reshape(n_blocks, size, m)
    start = e_blocks[:, 0]
    after = jnp.concatenate([start[1:], e[-1:]])
    # the weights' factors exp(after_K - e_j) (j in a later block L) and exp(e_j - start_L)
    # (j in an earlier block K) as a factor within the block times one between the blocks,
    # exp(after_K - start_L), each <= 1: O(N M) exponentials instead of O(K N M)
    to_start = jnp.exp(start[:, None] - e_blocks)  # (L, B, M), exp(start_L - e_j)
    to_after = jnp.exp(e_blocks - after[:, None])  # exp(e_j - after_L)
    between = jnp.exp(jnp.minimum(after[:, None] - start[None], 0.0))  # (K, L, M)
    frames_x = to_start[:, None] * b.reshape(n_phi, n_blocks, size, m).transpose(1, 0, 2, 3)
    frames_y = to_after[:, None] * a.reshape(n_phi, n_blocks, size, m).transpose(1, 0, 2, 3)
    rows, columns = tile_pairs(n_blocks)

    def tile_step(sums, step):
        # n_blocks tiles in float64 at a time: the stored data are never converted whole
        d, k, l = step
        d = d.astype(a.dtype)
        factor = between[k, l][:, None, None]  # (tiles, 1, 1, M)
        x_add = jnp.einsum("tpij,tpjm->tpim", d, factor * frames_x[l])
        # u^T d, transposed at the end: d is read along its rows, as it is laid out
        y_add = jnp.einsum("tpim,tpij->tpmj", factor * frames_y[k], d)
        x_sum, y_sum = sums
        return (x_sum.at[k].add(x_add), y_sum.at[l].add(y_add)), None

    zeros = jnp.zeros((n_blocks, n_phi, size, m), dtype=a.dtype)
    (x_sum, y_sum), _ = jax.lax.scan(
        tile_step, (zeros, jnp.swapaxes(zeros, -1, -2)), (tiles, rows, columns)
    )
    x_off = to_after[:, None] * x_sum  # (K, n_phi, B, M)
    y_off = to_start[:, None] * jnp.swapaxes(y_sum, -1, -2)

    upper = jnp.triu(jnp.ones((size, size), dtype=bool), 1)[:, :, None]

    def split_diag(a_k, b_k, e_k, d):
        # split at the first frame: exp(e_i - e_c) >= 1, bounded by exp(DIAG_SPAN)
        row_shift = jnp.exp(e_k - e_k[:1])
        col_shift = jnp.exp(e_k[:1] - e_k)
        x_part = row_shift * jnp.einsum("...ij,...jm->...im", d, b_k * col_shift)
        # u^T d, then transposed: d is read along its rows, as it is laid out
        y_part = col_shift * jnp.swapaxes(
            jnp.einsum("...im,...ij->...mj", a_k * row_shift, d), -1, -2
        )
        return x_part, y_part

    def pairwise_diag(a_k, b_k, e_k, d):
        decay = jnp.where(upper, jnp.exp(jnp.minimum(e_k[:, None] - e_k[None], 0.0)), 0.0)
        x_part = jnp.einsum("aij,aijm->aim", d, decay * b_k[:, None])
        y_part = jnp.einsum("aij,aijm->ajm", d, decay * a_k[:, :, None])
        return x_part, y_part

    def diag_block(_, block):
        a_k, b_k, e_k, own = block
        # the block's pairs with itself, upper triangle, in float64 one block at a time
        d = jnp.where(upper[..., 0], own, 0.0).astype(a_k.dtype)
        narrow = jnp.max(e_k[-1] - e_k[0]) <= DIAG_SPAN
        return None, jax.lax.cond(narrow, split_diag, pairwise_diag, a_k, b_k, e_k, d)

    def by_block(v):
        return v.reshape(n_phi, n_blocks, size, m).transpose(1, 0, 2, 3)

    _, (x_diag, y_diag) = jax.lax.scan(
        diag_block, None, (by_block(a), by_block(b), e_blocks, diagonal)
    )

    def by_frame(off, diag):
        return (off + diag).transpose(1, 0, 2, 3).reshape(n_phi, n_pad, m)[:, :n]

    X, Y = by_frame(x_off, x_diag), by_frame(y_off, y_diag)
    return X, Y, jnp.sum(a[:, :n] * X, (1, 2))


def _separable_gram(a, b, e, Da, Db, scale, n_live):
    """Per angle, ``sum_{i<j} v v^T`` over *all* pairs of the upper triangle of the
    first ``n_live`` frames (the factors of the others are zero), with
    ``v = [c dg (P), g, 1]``, shape ``(n_phi, P + 2, P + 2)``, and the magnitude of its
    diagonal, ``sum_{i<j} sum_m v_m²`` with ``v = sum_m v_m`` split by term, shape
    ``(n_phi, P + 2)``: the scale of the rounding errors of the separable sums.

    The contrast direction is one more derivative: with ``A_im = [c Da_im, a_im]`` and
    ``B_jm = [c Db_jm, 0]``, ``[c dg, g]_ij = sum_m E_ijm (A_im b_jm + a_im B_jm)``.

    Frames are cut in blocks of ``GRAM_BLOCK``. For ``i`` in block ``I`` and ``j`` in a
    later block ``J``, ``E_ijm = exp(e_i - e_s) exp(e_s - e_t) exp(e_t - e_j)`` with ``s``
    the first frame after ``I`` and ``t`` the first of ``J``: every factor ``<= 1``. So
    with ``A'_i = exp(e_i - e_s) A_i`` (likewise ``a'``) and ``B'_j = exp(e_t - e_j) B_j``
    (likewise ``b'``), the sums over those pairs are::

        sum v v^T = H + H^T,   H = sum_i A'_i^T (R_bb A'_i / 2 + a'_i R_bB)
                                   + sum_j B'_j^T (P_aa B'_j / 2)
        sum v = sum_i A'_i^T R_b + sum_j B'_j^T P_a

    where ``R`` are the sums over all later blocks of ``b' b'^T``, ``b' B'^T`` and ``b'``
    (suffix sums over blocks, each block's moved to the previous block's start by
    ``exp(e_t - e_t') <= 1``) and ``P`` the sums over all earlier blocks of ``a' a'^T`` and
    ``a'`` (prefix sums). Pairs within a block are summed one by one; the terms ``n = m``
    of the products alone give the magnitude. Cost ``O(N M² P²)``, with no recurrence
    over frames. The per-block sums and the sums over pairs go ``GRAM_CHUNK`` frames x
    angles a step, so that their temporaries stay a few MB whatever ``N``.
    """
    n_phi, n, m = a.shape
    size = GRAM_BLOCK
    n_blocks = -(-n // size)
    per_chunk = min(n_blocks, max(1, GRAM_CHUNK // (n_phi * size)))
    n_chunks = -(-n_blocks // per_chunk)
    n_blocks = n_chunks * per_chunk
    pad = n_blocks * size - n
    c = scale[:, None, None, None, None]  # (n_phi, block, frame, term, parameter)

    def by_chunk(v):
        # (n_phi, N, ...) -> (chunk, n_phi, block, frame, ...); padded frames: zero factors
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return jnp.swapaxes(v.reshape(n_phi, n_chunks, per_chunk, size, *v.shape[2:]), 0, 1)

    # padded frames take the last exponent: every shift stays <= 1
    e = jnp.pad(e, ((0, pad), (0, 0)), mode="edge").reshape(n_blocks, size, m)
    start = e[:, 0]
    after = jnp.concatenate([start[1:], e[-1:, -1]])
    frames = (by_chunk(a), by_chunk(b), by_chunk(Da), by_chunk(Db)) + tuple(
        v.reshape(n_chunks, per_chunk, *v.shape[1:]) for v in (e, start, after)
    )

    def shifted(a, b, Da, Db, e, start, after):
        A = jnp.concatenate([c * Da, a[..., None]], -1)
        B = jnp.concatenate([c * Db, jnp.zeros_like(b[..., None])], -1)
        left_shift = jnp.exp(e - after[:, None])[None]
        right_shift = jnp.exp(start[:, None] - e)[None]
        a1, b1 = a * left_shift, b * right_shift
        return A, B, a1, A * left_shift[..., None], b1, B * right_shift[..., None]

    def block_sums(chunk):
        # per block (as dot products: the broadcast-and-sum was slower here)
        _, _, a1, _, b1, B1 = shifted(*chunk)
        r_bb = jnp.einsum("akim,akin->akmn", b1, b1)
        r_bB = jnp.einsum("akim,akinq->akmnq", b1, B1)
        l_aa = jnp.einsum("akim,akin->akmn", a1, a1)
        return (r_bb, r_bB, jnp.sum(b1, 2)), (l_aa, jnp.sum(a1, 2))

    def whole(v):  # (chunk, n_phi, block, ...) -> (n_phi, all blocks, ...)
        return jnp.swapaxes(v, 0, 1).reshape(n_phi, n_blocks, *v.shape[3:])

    right, left = jax.tree.map(whole, jax.lax.map(block_sums, frames))
    step = jnp.exp(start[:-1] - start[1:])  # from block K + 1's start to block K's
    step = jnp.concatenate([step, jnp.ones((1, m))])[None]
    step2 = step[..., :, None] * step[..., None, :]
    decay = (step2, step2[..., None], step)
    later = _linear_recurrence(decay, right, reverse=True)
    earlier = _linear_recurrence(decay[::2], left, reverse=False)
    # exclusive: the blocks strictly after K (from K + 1's start), strictly before K
    later = [jnp.pad(v[:, 1:], [(0, 0), (0, 1)] + [(0, 0)] * (v.ndim - 2)) for v in later]
    earlier = [jnp.pad(v[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (v.ndim - 2)) for v in earlier]
    carried = tuple(
        jnp.swapaxes(v.reshape(n_phi, n_chunks, per_chunk, *v.shape[2:]), 0, 1)
        for v in later + earlier
    )
    i, j = np.triu_indices(size, 1)

    def chunk_sums(sums, chunk):
        part, (R_bb, R_bB, R_b, P_aa, P_a) = chunk
        a, b, e = part[0], part[1], part[4]
        A, B, a1, A1, b1, B1 = shifted(*part)
        # contractions over the second term index written out term by term, as one
        # elementwise loop (as dot products they would be thousands of tiny ones; as a
        # broadcast product summed over an axis of 4, several times slower), then one
        # product over frames, terms
        row = sum(
            0.5 * R_bb[:, :, None, :, n, None] * A1[:, :, :, None, n]
            + a1[:, :, :, None, n, None] * R_bB[:, :, None, :, n]
            for n in range(m)
        )
        col = 0.5 * sum(P_aa[:, :, None, :, n, None] * B1[:, :, :, None, n] for n in range(m))
        half = jnp.einsum("akimp,akimq->apq", A1, row) + jnp.einsum("akimp,akimq->apq", B1, col)
        gram = half + half.transpose(0, 2, 1)
        total = jnp.einsum("akimp,akm->ap", A1, R_b) + jnp.einsum("akimp,akm->ap", B1, P_a)

        def same_term(X):
            return jnp.diagonal(X, axis1=2, axis2=3)

        magnitude = (
            jnp.einsum("akimp,akm->ap", A1 * A1, same_term(R_bb))
            + 2 * jnp.einsum("akimp,akpm->ap", A1 * a1[..., None], same_term(R_bB))
            + jnp.einsum("akimp,akm->ap", B1 * B1, same_term(P_aa))
        )

        # pairs within a block, the sum over terms written out as above
        E = jnp.exp(e[:, i] - e[:, j])[None]
        terms = [
            (E * b[:, :, j])[..., n, None] * A[:, :, i, n]
            + (E * a[:, :, i])[..., n, None] * B[:, :, j, n]
            for n in range(m)
        ]
        v = sum(terms)
        magnitude = magnitude + jnp.sum(sum(t**2 for t in terms), (1, 2))
        gram = gram + jnp.einsum("akip,akiq->apq", v, v)
        total = total + jnp.sum(v, (1, 2))
        return jax.tree.map(jnp.add, sums, (gram, total, magnitude)), None

    width = Da.shape[-1] + 1
    zeros = (jnp.zeros((n_phi, width, width)), jnp.zeros((n_phi, width)), jnp.zeros((n_phi, width)))
    (gram, total, magnitude), _ = jax.lax.scan(chunk_sums, zeros, (frames, carried))

    # pairs of padded frames have zero factors: only their count must leave out
    count = jnp.full((n_phi, 1, 1), n_live * (n_live - 1) / 2)
    gram = jnp.concatenate(
        [
            jnp.concatenate([gram, total[:, :, None]], 2),
            jnp.concatenate([total[:, None, :], count], 2),
        ],
        1,
    )
    return gram, jnp.concatenate([magnitude, count[:, 0]], 1)


def _linear_recurrence(decay, values, *, reverse: bool):
    """``x_K = values_K + decay_K x_{K+1}`` (``reverse``) or ``x_K = values_K + decay_K
    x_{K-1}`` along axis 1 of matching pytrees, by an associative scan (log depth: a
    sequential scan over the blocks cost more in loop steps than in arithmetic)."""

    def combine(first, then):
        (d1, x1), (d2, x2) = first, then
        return jax.tree.map(jnp.multiply, d2, d1), jax.tree.map(
            lambda d, u, v: d * u + v, d2, x1, x2
        )

    return jax.lax.associative_scan(combine, (decay, values), reverse=reverse, axis=1)[1]


@jax.jit
def _fitted_gram(a, b, e, Da, Db, scale, live, masked):
    """:func:`_separable_gram` over the fitted pairs of the frames ``live`` marks (the
    first ones): less the ``masked`` ones' (the masked-pair arrays of :class:`Blocks`)."""
    gram, magnitude = _separable_gram(a, b, e, Da, Db, scale, jnp.sum(live))
    if masked[0].shape[0]:
        gram = gram - _masked_gram(a, b, e, Da, Db, scale, masked)
    return gram, magnitude


def _masked_gram(a, b, e, Da, Db, scale, masked):
    """Per angle, ``sum v v^T`` over the ``masked`` pairs (``v`` as in
    :func:`_separable_gram`), accumulated in chunks of at most ``MASK_CHUNK`` pairs."""
    n_phi = a.shape[0]
    total = masked[0].shape[0]
    chunk = min(total, MASK_CHUNK)

    def accumulate(gram, part):
        angle, i, j, valid = part
        decay = jnp.exp(-(e[j] - e[i]))
        a_i, b_j = a[angle, i], b[angle, j]
        g = jnp.sum(a_i * b_j * decay, axis=1)
        dg = jnp.einsum("km,kmp->kp", decay * b_j, Da[angle, i]) + jnp.einsum(
            "km,kmp->kp", decay * a_i, Db[angle, j]
        )
        v = jnp.concatenate([scale[angle, None] * dg, g[:, None], jnp.ones_like(g)[:, None]], 1)
        v = v * valid[:, None]
        one_hot = (angle[:, None] == jnp.arange(n_phi)).astype(v.dtype)
        return gram + jnp.einsum("ka,kp,kq->apq", one_hot, v, v), None

    size = Da.shape[-1] + 2
    parts = tuple(v.reshape(total // chunk, chunk) for v in masked)
    return jax.lax.scan(accumulate, jnp.zeros((n_phi, size, size)), parts)[0]


#: The compiled programs of :func:`normal_equations`: each compiles once per data shape.
STAGES = (_factor_stage, _data_pass, _fitted_gram, _assemble, evaluate)
