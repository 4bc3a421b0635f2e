"""Standard errors of least-squares fits to two-time data, whose pairs share frames.

Nominal least-squares errors ``(J^T J)^-1 chi2 / (n - p)`` treat the ``N (N - 1) / 2``
pairs of each angle as independent. They are not (MODEL.md, "Noise in real two-time
data"): ``c2(t_i, t_j) = <I_i I_j>_p / (<I_i>_p <I_j>_p)`` is an average over the ``P``
pixels of a q-sector, and to first order in ``1 / P``, with fourth moments of the
intensity fluctuations taken as Gaussian (Isserlis)::

    Cov(c2_ij, c2_kl) = kappa (C_ik C_jl + C_il C_jk),    kappa = 1 / P

where ``C_ik = Cov(I_i, I_k) / (<I_i> <I_k>) = c2_ik - offset`` is the normalised intensity
covariance of frames ``i`` and ``k``: the fitted model off the diagonal and the measured
``c2_ii - offset`` on it (the pixel variance of each frame, shot noise included). The
form is exact when frames ``i, k`` are independent of frames ``j, l`` (most pairs); where
all four frames lie within a correlation time the variance is larger. The errors of a pair
are correlated with those of every pair whose two frames both lie within a correlation time
of its own two, so a slowly decorrelating reference makes the matrix a few large correlated
blocks: resampling frame blocks, or cluster-robust sandwiches over them, has too few
independent blocks to estimate this covariance.

``errors="speckle"`` takes the covariance of the weighted residuals ``r_p`` to be::

    Cov(r_p, r_q) = w_p w_q [sigma2 delta_pq + kappa (C_ik C_jl + C_il C_jk)]

(``p = (i, j)``, ``q = (k, l)``, ``w`` the weights ``1 / sigma``) and estimates its two
scales from the residuals by moments. The products of neighbouring pairs
``M1 = sum r_{i,j} r_{i+1,j+1}`` (zero for independent errors) against
``M0 = sum r_p²``, each over its prediction, give the share of the variance that has the
speckle shape; ``M0`` then fixes the scale, with the part the fit absorbs taken out as
``n - p`` does for independent errors::

    E[M0] = kappa (D0 - tr(A^+ B)) + sigma2 (n - p),    D0 = tr(Q),  A = J^T J

Independent errors give ``kappa = 0`` and the nominal errors; speckle gives
``sigma2 = 0``. The covariance of the fit is the sandwich::

    cov = A^+ J^T Cov(r) J A^+ = kappa A^+ B A^+ + sigma2 A^+,
    B = J^T Q J,   Q_pq = w_p w_q (C_ik C_jl + C_il C_jk)

computed per angle (angles are different pixels, hence independent) on the ``N x N``
grid from the Jacobian and the separable form of the model's correlation, in
``O(p N²)`` time and memory.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from heterodyne import model
from heterodyne.pairs import Pairs, unpack
from heterodyne.parameters import PHYSICS_NAMES

ERRORS = ("nominal", "speckle")


class SpeckleErrors(NamedTuple):
    """Outcome of :func:`speckle_covariance`."""

    covariance: np.ndarray  #: covariance of the varied quantities, (p, p)
    kappa: float  #: scale of the speckle covariance (1 / pixels for unweighted c2)
    white: float  #: variance of the independent part of the weighted residuals


def intensity_covariance(model_c2, data_c2, offset) -> np.ndarray:
    """Normalised intensity covariance ``C_ik`` of the frames of each angle, (n_phi, N, N).

    ``C = c2 - offset`` from the fitted model off the diagonal; on the diagonal the
    measured ``c2_ii - offset`` (the pixel variance of frame ``i``, with its shot noise),
    except where it is not finite or below the model's ``offset + contrast`` (a diagonal
    removed or smoothed by the data reduction): there the model's.

    Parameters
    ----------
    model_c2, data_c2 : array, shape (n_phi, N, N)
        Fitted model and measured ``c2``.
    offset : array, shape (n_phi,) or scalar
        Fitted offset of each angle.
    """
    base = np.broadcast_to(np.asarray(offset, dtype=np.float64), model_c2.shape[:1])
    cov = np.asarray(model_c2, dtype=np.float64) - base[:, None, None]
    diagonal = np.diagonal(np.asarray(data_c2, dtype=np.float64), axis1=1, axis2=2)
    modelled = np.diagonal(cov, axis1=1, axis2=2) + base[:, None]
    measured = np.where(np.isfinite(diagonal), np.fmax(diagonal, modelled), modelled)
    n = cov.shape[-1]
    cov[:, np.arange(n), np.arange(n)] = measured - base[:, None]
    return cov


def angle_columns(free, n_scale: int, angle: int) -> np.ndarray:
    """Indices (into the varied vector) of the quantities that the model of ``angle``
    depends on: the varied physics, and that angle's contrast and offset."""
    n = len(PHYSICS_NAMES)
    k = angle if n_scale > 1 else 0
    own = (n + k, n + n_scale + k)
    return np.array([c for c, index in enumerate(np.asarray(free)) if index < n or index in own])


def _angle_model(x, template, free, t, phi, q, n_scale, angle):
    physics, contrast, offset = unpack(template.at[free].set(x), n_scale)
    k = angle if n_scale > 1 else 0
    return model.c2_grid(physics, contrast[k], offset[k], t, phi[angle][None], q)[0]


def jacobian_grid(x, template, free, columns, t, phi, q, angle, weight, n_scale):
    """Weighted Jacobian columns of one angle's model on the grid, ``(n_columns, N, N)``.

    ``S^a_ij = w_ij d c2_ij / d x_a`` for the varied quantities ``columns``
    (:func:`angle_columns`), with ``weight`` the symmetric grid of ``1 / sigma`` at the
    fitted pairs and 0 elsewhere (diagonal included), so that ``1/2 sum_ij S^a S^b`` is
    that angle's part of ``J^T J``.
    """

    def column(c):
        tangent = jnp.zeros_like(x).at[c].set(1.0)
        return jax.jvp(
            lambda y: _angle_model(y, template, free, t, phi, q, n_scale, angle), (x,), (tangent,)
        )[1]

    # One column at a time keeps memory at O(N²) per column. The derivative is finite off
    # the diagonal; where() keeps the diagonal's (weight 0) out of the products.
    grid = jax.lax.map(column, columns)
    return jnp.where(weight > 0, grid * weight, 0.0)


def correlation_apply(a, b, e, x):
    """``G x`` for one angle's normalised correlation ``G`` (symmetric, ``N x N``) in
    ``O(N M K)`` operations, never forming ``G``.

    On ``i <= j``, ``G_ij = sum_m a_im b_jm exp(-(e_jm - e_im))``
    (:func:`heterodyne.model.correlation_factors`) and ``G_ji = G_ij``, so
    ``(G x)_i = sum_m (a_im Z_im + b_im W_im)`` with the recursions::

        Z_im = b_im x_i + d_im Z_{i+1,m},     W_{i+1,m} = d_im (W_im + a_im x_i),
        d_im = exp(-(e_{i+1,m} - e_im)) <= 1  (e is non-decreasing),  Z_N = W_0 = 0

    Parameters
    ----------
    a, b, e : array, shape (N, M)
        Per-frame factors of one angle.
    x : array, shape (N, K)

    Returns
    -------
    jax.Array, shape (N, K)
    """
    decay = jnp.exp(-(e[1:] - e[:-1]))
    decay = jnp.concatenate([decay, jnp.zeros_like(decay[:1])])

    def later(z, step):
        a_i, b_i, d_i, x_i = step
        z = d_i[:, None] * z + b_i[:, None] * x_i[None, :]
        return z, a_i @ z

    def earlier(w, step):
        a_i, b_i, d_i, x_i = step
        return d_i[:, None] * (w + a_i[:, None] * x_i[None, :]), b_i @ w

    zeros = jnp.zeros((a.shape[1], x.shape[1]))
    steps = (a, b, decay, x)
    upper = jax.lax.scan(later, zeros, steps, reverse=True)[1]
    lower = jax.lax.scan(earlier, zeros, steps)[1]
    return upper + lower


def speckle_products(x, template, free, t, phi, q, angle, s, weight, diagonal, n_scale):
    """``B = J^T Q J`` of one angle, ``Q_pq = w_p w_q (C_ik C_jl + C_il C_jk)`` the
    speckle covariance of the weighted residuals per unit ``kappa``.

    With ``U^a = w S^a`` (``S`` from :func:`jacobian_grid`, ``w`` the weight grid), summing
    the symmetric grids over both triangles::

        B_ab = sum_pq J_pa Q_pq J_qb = 1/2 tr(U^a C U^b C) = 1/2 sum_ij V^a_ij V^b_ji,
        V^a = C U^a,    C = contrast G + diag(diagonal - contrast)

    ``G`` is the model's normalised correlation at ``x`` (:func:`correlation_apply`) and
    ``diagonal`` the diagonal of :func:`intensity_covariance` (``G_ii = 1``).
    """
    physics, contrast, _ = unpack(template.at[free].set(x), n_scale)
    scale = contrast[angle if n_scale > 1 else 0]
    frames = model.frame_integrals(physics, t)
    q_parallel = model.parallel_wavevector(physics, phi[angle], q)
    a, b, e = model.correlation_factors(frames, q, q_parallel)
    excess = diagonal - scale

    def column(s_a):
        u = s_a * weight
        return scale * correlation_apply(a, b, e, u) + excess[:, None] * u

    # one column at a time: O(N²) memory beyond the grids
    v = jax.lax.map(column, s)
    return 0.5 * jnp.einsum("aij,bji->ab", v, v)


jacobian_grid_jit = jax.jit(jacobian_grid, static_argnums=9)
speckle_products_jit = jax.jit(speckle_products, static_argnums=10)


def neighbour_moments(residual, weight, cov):
    """Moments of one angle's residuals that fix the two scales of the error model.

    Parameters
    ----------
    residual, weight : array, shape (N, N)
        Weighted residuals and weights ``1 / sigma`` of the fitted pairs on the upper
        triangle (``i < j``), zero elsewhere.
    cov : array, shape (N, N)
        Normalised intensity covariance :func:`intensity_covariance`.

    Returns
    -------
    m0, d0, m1, d1 : float
        ``m0 = sum r_p²`` and its speckle expectation per unit ``kappa``,
        ``d0 = sum w_p² (C_ii C_jj + C_ij²)``; ``m1 = sum r_{i,j} r_{i+1,j+1}`` over
        neighbouring fitted pairs and ``d1 = sum w w' (C_{i,i+1} C_{j,j+1} +
        C_{i,j+1} C_{j,i+1})``.
    """
    d = np.diagonal(cov)
    m0 = float(np.sum(residual**2))
    d0 = float(np.sum(weight**2 * (np.outer(d, d) + cov**2)))
    step = np.diagonal(cov, 1)
    shifted = cov[:-1, 1:]
    m1 = float(np.sum(residual[:-1, :-1] * residual[1:, 1:]))
    d1 = float(
        np.sum(weight[:-1, :-1] * weight[1:, 1:] * (np.outer(step, step) + shifted * shifted.T))
    )
    return m0, d0, m1, d1


def speckle_covariance(
    jtj_inverse, x, template, free, pairs: Pairs, n_scale: int, residuals, cov
) -> SpeckleErrors:
    """Covariance of the varied quantities under the speckle error model (module doc).

    Parameters
    ----------
    jtj_inverse : array, shape (p, p)
        ``(J^T J)^+`` at the optimum.
    x : array, shape (p,)
        Best-fit varied quantities; ``template`` the packed vector they are set into at
        the indices ``free``.
    pairs : Pairs
        The fitted pairs.
    n_scale : int
        Number of contrast/offset pairs (``n_phi`` or 1).
    residuals : array, shape (n_pairs,)
        Weighted residuals at the optimum.
    cov : array, shape (n_phi, N, N)
        :func:`intensity_covariance` of the fit.

    Returns
    -------
    SpeckleErrors
    """
    angle, i, j = (np.asarray(a) for a in (pairs.angle, pairs.i, pairs.j))
    n_phi = cov.shape[0]
    weight = np.zeros(cov.shape)
    weight[angle, i, j] = np.asarray(pairs.weight)
    residual = np.zeros(cov.shape)
    residual[angle, i, j] = residuals
    b = np.zeros_like(jtj_inverse)
    moments = np.zeros(4)
    for k in range(n_phi):
        moments += neighbour_moments(residual[k], weight[k], cov[k])
        columns = angle_columns(free, n_scale, k)
        if columns.size == 0:
            continue
        # one angle's grids at a time: memory O(p N²) whatever the number of angles
        symmetric = jnp.asarray(weight[k] + weight[k].T)
        grids = jacobian_grid_jit(
            jnp.asarray(x),
            template,
            free,
            jnp.asarray(columns),
            pairs.t,
            pairs.phi,
            pairs.q,
            k,
            symmetric,
            n_scale,
        )
        part = speckle_products_jit(
            jnp.asarray(x),
            template,
            free,
            pairs.t,
            pairs.phi,
            pairs.q,
            k,
            grids,
            symmetric,
            jnp.asarray(np.diagonal(cov[k])),
            n_scale,
        )
        del grids
        b[np.ix_(columns, columns)] += np.asarray(part)
    m0, d0, m1, d1 = moments
    n_pairs = pairs.n_pairs
    # The share of the residual variance that has the speckle shape: the neighbour moment
    # against the total, each per unit of its prediction (0 for independent errors).
    share = float(np.clip((m1 / d1) / (m0 / d0), 0.0, 1.0)) if min(m0, d0, d1) > 0 else 0.0
    # The fit absorbs part of the noise, E[M0] = kappa (D0 - tr(A^+ B)) + sigma2 (n - p):
    # tr(A^+ B) = tr(H Q), H the hat matrix, is to the speckle part what p is to the white.
    absorbed = float(np.sum(jtj_inverse * b)) / d0 if d0 > 0 else 0.0
    kept = share * (1.0 - absorbed) + (1.0 - share) * max(n_pairs - len(x), 1) / n_pairs
    total = m0 / kept if kept > 0 else 0.0
    kappa = share * total / d0 if d0 > 0 else 0.0
    white = (1.0 - share) * total / n_pairs
    covariance = kappa * jtj_inverse @ b @ jtj_inverse + white * jtj_inverse
    return SpeckleErrors(0.5 * (covariance + covariance.T), kappa, white)
