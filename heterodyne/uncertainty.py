"""Standard errors of least-squares fits to two-time data, whose pairs share frames.

Nominal least-squares errors ``(J^T J)^-1 chi2 / (n - p)`` treat the ``N (N - 1) / 2``
pairs of each angle as independent. They are not (MODEL.md, "Noise in real two-time
data"): ``c2(t_i, t_j) = <x_i x_j>_p / (<x_i>_p <x_j>_p)`` is an average over the ``P``
pixels of a q-sector of the photon counts ``x = n / lambda`` (``lambda`` the mean count
per pixel and frame). The covariance of the pair estimates, and the error model
``errors="speckle"`` built on it, follow.

Assumptions
-----------
(A1) Pixels are independent and alike: the covariance is ``1 / P`` times that of one
pixel's products (first order in ``1 / P``, the delta method on the ratio). (A2) Given
the speckle intensity ``I`` (mean 1 per frame), counts are Poisson and independent across
pixels and frames (the detector adds no correlated noise): ``x = I + eta`` with
``E[eta_i eta_k | I] = delta_ik I_i / lambda``. (A3) ``c2`` is normalised (offset near 1).
(A4) The speckle intensity is a sum of coherent modes of circular Gaussian fields with the
normalised field correlation ``g_ij`` (:func:`heterodyne.model.field_correlation`,
``|g|² = G``, the model's correlation), so its third cumulant is
``k(I_i, I_j, I_k) = 2 beta_3 Re(g_ij g_jk g_ki)`` with ``beta_3 = contrast²`` (equal
modes), and its fourth cumulant is ``2 beta_4`` times the real part of the three 4-cycles
of ``g`` over the frames, ``beta_4 = contrast³``. Unequal modes have larger ``beta_n``
than ``contrast^(n-1)``: the free scale of the speckle shape below takes up the
difference on average.

Derivation
----------
Linearising the ratio around its mean ``c_ij = E[x_i x_j] = 1 + K_ij``::

    delta c2_ij = delta<x_i x_j> - c_ij (delta<x_i> + delta<x_j>)
    Cov(c2_ij, c2_kl) = Cov(y_ij, y_kl) / P,    y_ij = x_i x_j - c_ij (x_i + x_j)

Written with the joint cumulants ``k(.)`` of one pixel's ``x`` (means 1)::

    Cov(y_ij, y_kl) = k(i,j,k,l) + k_ik k_jl + k_il k_jk
                      - K_ij (k(i,k,l) + k(j,k,l)) - K_kl (k(i,j,k) + k(i,j,l))
                      + K_ij K_kl (k_ik + k_il + k_jk + k_jl)

By (A2) the cumulants of ``x`` are those of ``I``, plus, for each frame repeated among
the indices, those of ``I`` with the repeated indices merged, over ``lambda`` (Poisson
counting of a random rate): ``k(x_i, x_i) = k(I_i, I_i) + 1 / lambda``,
``k(x_i, x_i, x_l) = k(I_i, I_i, I_l) + K_il / lambda``, and so on. With
``E_i = 1 / lambda_i`` the shot-noise variance of frame ``i`` (the spike of the measured
diagonal above the model's ``offset + contrast``) and ``C_ik = c2_ik - offset`` the
speckle covariance (the model; ``C_ii = contrast``), three kinds of pair pairs:

- four different frames: no counting term; ``Q_s``, the speckle's covariance below
  (Isserlis, ``C_ik C_jl + C_il C_jk``, and the speckle's higher cumulants);
- one shared frame, ``i = k``: ``Q_s`` plus ``E_i (C_jl + k(I_i, I_j, I_l) - K_ij K_il)``;
- the same pair, ``(i, j) = (k, l)``: ``Q_s`` plus
  ``(E_i C_jj + E_j C_ii) + E_i E_j (1 + C_ij / offset)``, the last term exact
  (``E[n_i n_j] = lambda² E[I_i I_j]``), plus the third-cumulant terms of both frames,
  ``E_i (k(I_i, I_j, I_j) - K_ij²) + E_j (k(I_j, I_i, I_i) - K_ij²)``.

For speckle with equal modes (A4), ``beta_n = contrast^(n-1)`` and the joint cumulants
of ``I`` are sums over the cyclic orders of the frames, so without counting the
first-order covariance needs no free factor::

    k(i,k,l)   = 2 contrast² Re(g_ik g_kl g_li)
    k(i,j,k,l) = 2 contrast³ Re(g_ij g_jk g_kl g_li + g_ij g_jl g_lk g_ki
                                + g_ik g_kj g_jl g_li)

and ``Cov(y_ij, y_kl)`` above with these. Its terms beyond Isserlis are of relative size
``contrast`` where all four frames are within a correlation time, and shrink as they
separate, not in one proportion over the matrix: a single factor on the Isserlis shape
would weigh the pairs wrongly. All of them but one are sums of products over the grid
(``K_ij k(i,k,l)`` needs ``diag(g (U o g) g)``, ``g_ij g_jk g_kl g_li`` needs
``g (U o g) g``, for the grid ``U`` of a Jacobian column). The crossed cycle
``g_ik g_kj g_jl g_li`` couples each frame of one pair to both frames of the other and
has none; the speckle shape takes it in the product form::

    2 contrast³ Re(g_ik g_kj g_jl g_li)  ~  2 contrast³ Re(g_ik g_jl) |g_ij| |g_kl|

(``i < j``, ``k < l``: early frame with early, late with late), exact for the same pair
and, for a real ``g``, for pairs that share their early or their late frame; for
neighbouring pairs (``k ~ i``, ``l ~ j``) ``g_kj g_li ~ |g_ij| |g_kl|``, and where the
pairs are far apart both forms vanish. The form is positive semi-definite (``Re`` of
the Hermitian ``g_ik g_jl`` over the pairs, Schur product with a rank-one matrix). The crossed
cycle itself lies between ``-contrast`` and ``+contrast`` times the Isserlis shape in
the Loewner order (``|2 Re(a conj b)| <= |a|² + |b|²`` for the matrices
``a = g_ik g_jl``, ``b = g_il g_jk``: ``|a -+ b|²`` are Schur products of semi-definite
matrices), so it moves no variance by more than ``contrast`` times the Isserlis
shape's.

Isserlis on the total covariance ``C + E`` gives all of these but the ``E_i E_j C_ij``
term and the cumulants. Near the diagonal the third cumulant is as large as ``C_jl``:
leaving it out makes the shared-frame correlations, which carry the velocity, half what
they are. So the covariance of the weighted residuals ``r_p`` is modelled as three shapes
with three scales::

    Cov(r_p, r_q) = w_p w_q [kappa Q_s + kappa_n Q_n] + sigma2 delta_pq
    Q_s = Q[C] - K_ij (k(i,k,l) + k(j,k,l)) - K_kl (k(i,j,k) + k(i,j,l))
          + K_ij K_kl (K_ik + K_il + K_jk + K_jl) + k(i,j,k,l)
    Q[C]_pq = C_ik C_jl + C_il C_jk
    Q_n = Q[C + E] - Q[C] + delta_pq E_i E_j C_ij / offset
          + sum_{f shared by p, q} E_f (2 contrast² Re(g_fa g_ab g_bf) - K_fa K_fb)

(``C_ii = contrast`` in ``Q_s``, ``k`` the speckle's cumulants above with the crossed
cycle in product form; ``a``, ``b`` the other frames of ``p`` and ``q``).

(``p = (i, j)``, ``q = (k, l)``, ``w`` the weights ``1 / sigma``): speckle,
``kappa ~ 1/P``; shot noise, ``kappa_n ~ 1/P`` (0 without counting,
where ``E = 0``); and independent ("white") noise, for data with Gaussian errors. The shot
shape is not white: pairs that share frame ``i`` are correlated through ``E_i C_jl``, and
pairs near the diagonal have the larger variance ``E_i E_j (1 + C_ij)``; both propagate
into the parameters.

The scales are estimated from three moments of the residuals, each against its
expectation per unit scale of each shape: ``m0 = sum r_p²``, ``m1 = sum r_{i,j}
r_{i+1,j+1}`` (four different frames: speckle only) and ``m2 = sum r_{i,j} (r_{i,j+1} +
r_{i+1,j})`` (a shared frame: speckle and shot). The fit absorbs part of the noise: the
residuals are ``(I - H) r_true`` with ``H = J A^+ J^T``, ``A = J^T J``, so a moment
``m = r^T N r`` has, per unit scale of shape ``Q``::

    E[m] = tr(N Q) - tr(N H Q) - tr(N Q H) + tr(N H Q H)

(for ``m0``, ``N = 1``: ``tr(Q) - tr(A^+ B)``, and ``n - p`` for the white part, as for
independent errors); the traces with ``H`` need only ``p x p`` products of the Jacobian
with ``Q`` and with the Jacobian at the neighbouring pairs.

Scales
------
The three non-negative scales ``theta = (kappa, kappa_n, sigma2)`` solve
``E[m] = moments``, under a condition from the physics and a rule of parsimony:

- with counting, ``kappa >= kappa_n``: both are ``1 / P`` (A1); the speckle's may be
  larger where its cumulants are (unequal modes, (A4));
- nested choices, the first that meets every moment within ``MOMENT_TOLERANCE`` of its
  standard deviation (that of a sum of ``n_k`` independent products of residuals of
  variance ``v = m0 / n``: ``v sqrt(2 n)`` for ``m0``, ``v sqrt(n_k)`` for ``m1``,
  ``m2``) is taken: with counting, ``kappa = kappa_n``; then
  ``kappa >= kappa_n`` free; then the white shape as well.

The first is needed far below one photon per pixel and frame: the speckle shape is a
tiny part of every moment (``C << E``), so ``m1``, the only moment without shot noise,
is mostly noise and a free ``kappa`` can come out at many times ``1 / P``, inflating the
errors of the quantities the speckle carries (a slow reference's rate) while the
speckle's true share of their variance is negligible.

The white shape comes last for a like reason (``E >> contrast``): the shot shape is then
dominated by the variance ``E_i E_j (1 + C_ij)``, nearly the same for every pair, so in
``m0`` it is indistinguishable from white; only its shared-frame part ``E_f C_ab`` in
``m2`` tells them apart, and that is about as large as the noise of ``m2``, ``sum E_f
C_ab / P ~ v sqrt(n2)``. Fitting both leaves the split arbitrary, and the part given to
white does not carry the shared-frame correlations into the parameters. Photon-counting
detectors add no independent noise (A2), so the shot shape takes all of it unless the
moments require more. Data with independent Gaussian errors (``E`` about 0, ``m2`` near
0) still get the white shape: a shot or speckle shape would predict an ``m2`` they do
not have.

The covariance of the fit is the sandwich::

    cov = A^+ J^T Cov(r) J A^+ = A^+ (kappa B_s + kappa_n B_n) A^+ + sigma2 A^+,
    B_c = J^T Q_c J

computed per angle (angles are different pixels, hence independent) on the ``N x N``
grid from the Jacobian and the separable forms of the model's correlation and of the
field correlation, in ``O(p N²)`` time and memory. Without counting the shot shape
vanishes and the model is the speckle one of issue 9, with the speckle's cumulants.
Resampling frame blocks, or cluster-robust sandwiches over them, has too few independent
blocks to estimate this covariance when a slowly decorrelating reference makes the matrix
a few large correlated blocks.

Validated (``benchmarks/coverage.py``, independent speckle simulations with Poisson
counting, 150 frames, 4 angles, 200 seeds each): the errors are 0.89 to 1.12 of the
scatter of the fitted values, and ``value -+ stderr`` covers the truth 61 to 76 % of the
time: 2000 pixels per angle without counting and at 10, 1 and 0.1 photons per pixel and
frame, 500 pixels at 1 photon, 50 000 pixels at 0.01 photon.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from heterodyne import model
from heterodyne.pairs import Pairs, unpack
from heterodyne.parameters import PHYSICS_NAMES

ERRORS = ("nominal", "speckle")
# Third cumulant of the speckle intensity of three frames, 2 beta_3 Re(g_ij g_jk g_ki), in
# units of contrast² Re(g_ij g_jk g_ki): beta_3 = sum_m w_m³ = contrast² for equal modes.
THIRD_CUMULANT = 2.0
#: Standard deviations of a moment beyond which the speckle and shot shapes alone are
#: judged not to explain the residuals, and the white shape is added (:func:`shape_scales`).
MOMENT_TOLERANCE = 3.0


class SpeckleErrors(NamedTuple):
    """Outcome of :func:`speckle_covariance`."""

    covariance: np.ndarray  #: covariance of the varied quantities, (p, p)
    kappa: float  #: scale of the speckle shape (about 1 / pixels for unweighted c2)
    shot: float  #: scale of the shot-noise shape (about 1 / pixels with photon counting)
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


def correlation_apply(a, b, e, x, hermitian: bool = False):
    """``G x`` for one angle's normalised correlation ``G`` (symmetric, ``N x N``) in
    ``O(N M K)`` operations, never forming ``G``.

    On ``i <= j``, ``G_ij = sum_m a_im b_jm exp(-(e_jm - e_im))``
    (:func:`heterodyne.model.correlation_factors`) and ``G_ji = G_ij``, so
    ``(G x)_i = sum_m (a_im Z_im + b_im W_im)`` with the recursions::

        Z_im = b_im x_i + d_im Z_{i+1,m},     W_{i+1,m} = d_im (W_im + a_im x_i),
        d_im = exp(-(e_{i+1,m} - e_im)) <= 1  (e is non-decreasing),  Z_N = W_0 = 0

    With ``hermitian=True`` (complex ``a``, ``b``) the lower triangle is the conjugate,
    ``G_ji = conj(G_ij)``: the product with a Hermitian ``G`` such as the field
    correlation (:func:`heterodyne.model.field_factors`).

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

    zeros = jnp.zeros((a.shape[1], x.shape[1]), dtype=jnp.result_type(a, x))
    upper = jax.lax.scan(later, zeros, (a, b, decay, x), reverse=True)[1]
    below = (jnp.conj(a), jnp.conj(b)) if hermitian else (a, b)
    lower = jax.lax.scan(earlier, zeros, (*below, decay, x))[1]
    return upper + lower


#: Neighbours of pair ``(i, j)`` in the moments ``m1`` and ``m2`` (:func:`pair_moments`).
NEIGHBOURS = (((1, 1),), ((0, 1), (1, 0)))


def shifted(grid, di: int, dj: int):
    """``out_ij = grid_{i+di, j+dj}`` on the upper triangle (``i < j``), zero elsewhere
    and where the neighbour falls outside the grid or on the diagonal."""
    n = grid.shape[-1]
    upper = jnp.triu(grid, 1)
    padded = jnp.pad(upper, [(0, 0)] * (grid.ndim - 2) + [(1, 1), (1, 1)])
    out = padded[..., 1 + di : 1 + di + n, 1 + dj : 1 + dj + n]
    return jnp.triu(out, 1)


def speckle_products(x, template, free, t, phi, q, angle, s, weight, diagonal, shot_grid, n_scale):
    """Products of one angle's Jacobian with the speckle and the shot shapes (module doc).

    With ``U^a = w S^a`` (``S`` from :func:`jacobian_grid`, ``w`` the weight grid) and,
    for the Isserlis form with covariance ``C``, ``W^a = C U^a C``, a sum over the pairs
    ``p = (i < j)`` is one over the upper triangle::

        (J^T Q J')_ab = sum_{i<j} W^a_ij U'^b_ij,    Q_pq = C_ik C_jl + C_il C_jk

    for any ``J'`` whose grid ``U' = w S'`` holds its pair values on the upper triangle.
    ``C_s = contrast G`` (the speckle covariance; ``G`` the model's normalised correlation
    at ``x``, :func:`correlation_apply`, ``G_ii = 1``) and ``C = C_s + E``,
    ``E = diag(diagonal - contrast)`` the shot-noise variance of each frame. The speckle
    shape is ``Q[C_s]`` plus the speckle's cumulant terms (:func:`cumulant_terms`), whose
    ``W^a`` add, with ``K = C_s``, ``g`` the field correlation (applied as
    :func:`correlation_apply` with :func:`heterodyne.model.field_factors`),
    ``Y = g (U^a o g) g``, ``v = (U^a o K) 1``, ``c`` the contrast::

        K_ij ((K v)_i + (K v)_j - c² Re(Y_ii + Y_jj)) - 2 c² Re(g_ij (g diag(v) g)_ji)
        + 2 c³ Re(g_ij Y_ji) + 2 c³ |g_ij| Re(g triu(U^a o |g|) g^T)_ij

    The shot shape is ``Q[C] - Q[C_s]`` plus the variance term
    ``sum_{i<j} U^a_ij U'^b_ij shot_grid_ij`` (``shot_grid = E_i E_j C_ij / offset``).

    Returns
    -------
    B : jax.Array, shape (2, n_columns, n_columns)
        ``B_c = J^T Q_c J`` for the speckle and the shot shape.
    X : jax.Array, shape (2, 2, n_columns, n_columns)
        ``X_kc = J^T Q_c (J_k+ + J_k-)``, ``J_k+-`` the Jacobian at the forward and
        backward neighbours of moment ``k`` (``m1``, ``m2``; :data:`NEIGHBOURS`).
    T : jax.Array, shape (2, n_columns, n_columns)
        ``T_k = J^T N_k J = sum_p J_p J_{p+}`` over the forward neighbours of moment ``k``.
    """
    physics, contrast, _ = unpack(template.at[free].set(x), n_scale)
    scale = contrast[angle if n_scale > 1 else 0]
    frames = model.frame_integrals(physics, t)
    q_parallel = model.parallel_wavevector(physics, phi[angle], q)
    a, b, e = model.correlation_factors(frames, q, q_parallel)
    excess = diagonal - scale
    gamma = model.field_correlation(frames, q, q_parallel)
    magnitude = jnp.abs(gamma)
    speckle_cov = scale * magnitude**2
    field = model.field_factors(frames, q, q_parallel)
    n = t.shape[0]

    def field_apply(*blocks):
        """``gamma m`` for each ``N x N`` matrix ``m`` of ``blocks``, in one pass."""
        out = correlation_apply(*field, jnp.concatenate(blocks, axis=1), hermitian=True)
        return jnp.split(out, len(blocks), axis=1)

    def column(s_a):
        u = s_a * weight
        speckle_u = scale * correlation_apply(a, b, e, u)
        total = speckle_u + excess[:, None] * u
        # W = C U C = (C (C U)^T)^T, C symmetric: speckle C_s U C_s, and C U C in total
        rows = scale * correlation_apply(a, b, e, jnp.concatenate([speckle_u.T, total.T], axis=1))
        speckle_w, total_w = rows[:, :n].T, (rows[:, n:] + excess[:, None] * total.T).T
        # X = U o gamma is Hermitian, like gamma. The shared frame's third cumulant with
        # shot noise: Z = X gamma = (gamma X)^H. The speckle's cumulants (module doc):
        # Y = gamma X gamma = gamma Z; gamma diag(v) gamma for the third cumulants of a
        # pair with one frame of the other; gamma triu(U o |gamma|) gamma^T for the
        # crossed cycle's product form.
        v = jnp.sum(u * speckle_cov, axis=1)
        upper = jnp.triu(u * magnitude, 1)
        left, middle, half = field_apply(u * gamma, v[:, None] * gamma, upper.T)
        product = jnp.conj(left).T
        y, crossed = field_apply(product, half.T)
        z = jnp.diagonal(y).real
        kv = speckle_cov @ v
        third = speckle_cov * (kv[:, None] + kv[None, :] - scale**2 * (z[:, None] + z[None, :]))
        cumulants = (
            third
            - THIRD_CUMULANT * scale**2 * (gamma * middle.T).real
            + THIRD_CUMULANT * scale**3 * ((gamma * y.T).real + magnitude * crossed.real)
        )
        shapes = jnp.stack([speckle_w + cumulants, total_w - speckle_w])
        return shapes, product

    # one column at a time: O(N²) memory beyond the grids
    w, z = jax.lax.map(column, s)
    u = jnp.triu(s * weight, 1)
    rows = jnp.einsum("aij,ij->ai", s * weight, speckle_cov)
    upper_weight = jnp.triu(weight, 1)

    def products(right):
        """``J^T Q_c J'`` of both shapes for the upper-triangle grids ``right``."""
        shot_variance = jnp.einsum("aij,bij,ij->ab", u, right, shot_grid)
        isserlis = jnp.einsum("acij,bij->cab", w, right)
        # sum_i E_i sum_jl U_ij U'_il (THIRD_CUMULANT contrast² Re(g_ij g_jl g_li) - K_ij K_il)
        both_triangles = right + jnp.swapaxes(right, -1, -2)
        third = THIRD_CUMULANT * scale**2 * jnp.einsum(
            "i,ail,bil->ab", excess, z, jnp.conj(both_triangles * gamma)
        ).real - jnp.einsum(
            "i,ai,bi->ab", excess, rows, jnp.einsum("bil,il->bi", both_triangles, speckle_cov)
        )
        return isserlis.at[1].add(shot_variance + third)

    big_b = products(u)
    neighbour_x, neighbour_t = [], []
    for steps in NEIGHBOURS:
        forward = sum(shifted(s, di, dj) for di, dj in steps)
        backward = sum(shifted(s, -di, -dj) for di, dj in steps)
        neighbour_x.append(products(upper_weight * (forward + backward)))
        neighbour_t.append(jnp.einsum("aij,bij->ab", jnp.triu(s, 1), forward))
    return big_b, jnp.stack(neighbour_x), jnp.stack(neighbour_t)


jacobian_grid_jit = jax.jit(jacobian_grid, static_argnums=9)
speckle_products_jit = jax.jit(speckle_products, static_argnums=11)


def pair_moments(residual) -> np.ndarray:
    """The three moments of one angle's residuals that fix the scales of the error model.

    ``m0 = sum r_p²``, ``m1 = sum r_{i,j} r_{i+1,j+1}`` (neighbouring pairs with four
    different frames) and ``m2 = sum r_{i,j} (r_{i,j+1} + r_{i+1,j})`` (neighbouring
    pairs that share a frame), over the upper triangle of ``residual`` (the weighted
    residuals at the fitted pairs ``i < j``, zero elsewhere).
    """
    return np.array(
        [
            np.sum(residual**2),
            np.sum(residual[:-1, :-1] * residual[1:, 1:]),
            np.sum(residual[:, :-1] * residual[:, 1:]) + np.sum(residual[:-1] * residual[1:]),
        ]
    )


def isserlis_moments(weight, cov) -> np.ndarray:
    """Expectations of :func:`pair_moments` per unit ``kappa`` under the Isserlis form
    ``Q_pq = w_p w_q (C_ik C_jl + C_il C_jk)`` with the covariance ``cov`` (``C``)::

        d0 = sum w_ij² (C_ii C_jj + C_ij²)
        d1 = sum w_ij w_{i+1,j+1} (C_{i,i+1} C_{j,j+1} + C_{i,j+1} C_{j,i+1})
        d2 = sum w_ij w_{i,j+1} (C_ii C_{j,j+1} + C_{i,j+1} C_ij)
           + sum w_ij w_{i+1,j} (C_{i,i+1} C_jj + C_ij C_{i+1,j})

    ``weight`` is the grid of ``1 / sigma`` at the fitted pairs on the upper triangle.
    """
    d = np.diagonal(cov)
    step = np.diagonal(cov, 1)
    shifted = cov[:-1, 1:]
    return np.array(
        [
            np.sum(weight**2 * (np.outer(d, d) + cov**2)),
            np.sum(
                weight[:-1, :-1] * weight[1:, 1:] * (np.outer(step, step) + shifted * shifted.T)
            ),
            np.sum(weight[:, :-1] * weight[:, 1:] * (np.outer(d, step) + cov[:, 1:] * cov[:, :-1]))
            + np.sum(weight[:-1] * weight[1:] * (np.outer(step, d) + cov[:-1] * cov[1:])),
        ]
    )


def shape_moments(weight, cov, contrast, offset, gamma) -> np.ndarray:
    """Expected :func:`pair_moments` of one angle per unit scale of each shape, (3, 3):
    columns speckle, shot, white (module doc); ``gamma`` the field correlation."""
    speckle_cov = cov.copy()
    n = cov.shape[0]
    excess = np.diagonal(cov) - contrast
    speckle_cov[np.arange(n), np.arange(n)] = contrast
    speckle = isserlis_moments(weight, speckle_cov)
    shot = isserlis_moments(weight, cov) - speckle
    speckle = speckle + cumulant_moments(weight, gamma, contrast)
    shot[0] += np.sum(weight**2 * shot_grid(excess, cov, offset))
    shot += shared_frame_moments(weight, gamma, contrast, excess)
    white = np.array([np.count_nonzero(weight), 0.0, 0.0])
    return np.column_stack([speckle, shot, white])


def cumulant_terms(gamma, contrast, i, j, k, l) -> np.ndarray:
    """The speckle shape beyond Isserlis for pairs ``(i, j)``, ``(k, l)`` (index arrays,
    ``i < j``, ``k < l``; module doc), per unit scale: with ``K = contrast |g|²`` and
    ``k3(a, b, c) = THIRD_CUMULANT contrast² Re(g_ab g_bc g_ca)``::

        - K_ij (k3(i,k,l) + k3(j,k,l)) - K_kl (k3(i,j,k) + k3(i,j,l))
        + K_ij K_kl (K_ik + K_il + K_jk + K_jl)
        + 2 contrast³ Re(g_ij g_jk g_kl g_li + g_ij g_jl g_lk g_ki)
        + 2 contrast³ Re(g_ik g_jl) |g_ij| |g_kl|
    """
    g = np.asarray(gamma)
    big_k = contrast * np.abs(g) ** 2
    third = THIRD_CUMULANT * contrast**2

    def k3(a, b, c):
        return third * (g[a, b] * g[b, c] * g[c, a]).real

    cycles = g[i, j] * g[j, k] * g[k, l] * g[l, i] + g[i, j] * g[j, l] * g[l, k] * g[k, i]
    crossed = g[i, k] * g[j, l] * np.abs(g[i, j]) * np.abs(g[k, l])
    return (
        -big_k[i, j] * (k3(i, k, l) + k3(j, k, l))
        - big_k[k, l] * (k3(i, j, k) + k3(i, j, l))
        + big_k[i, j] * big_k[k, l] * (big_k[i, k] + big_k[i, l] + big_k[j, k] + big_k[j, l])
        + THIRD_CUMULANT * contrast**3 * (cycles + crossed).real
    )


def cumulant_moments(weight, gamma, contrast) -> np.ndarray:
    """Expectations of :func:`pair_moments` per unit scale of :func:`cumulant_terms`:
    ``sum w_p w_q`` of them over the same pair, the diagonal neighbour and the neighbours
    that share a frame, as :func:`isserlis_moments` sums the Isserlis form."""
    n = weight.shape[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")

    def at(w, *frames):
        return np.sum(w * cumulant_terms(gamma, contrast, *frames))

    same = at(weight**2, i, j, i, j)
    a, b = i[:-1, :-1], j[:-1, :-1]
    diagonal = at(weight[:-1, :-1] * weight[1:, 1:], a, b, a + 1, b + 1)
    row = at(weight[:, :-1] * weight[:, 1:], i[:, :-1], j[:, :-1], i[:, :-1], j[:, :-1] + 1)
    column = at(weight[:-1] * weight[1:], i[:-1], j[:-1], i[:-1] + 1, j[:-1])
    return np.array([same, diagonal, row + column])


def shared_frame_moments(weight, gamma, contrast, excess) -> np.ndarray:
    """The shot shape's third-cumulant part of :func:`isserlis_moments`: pairs ``p, q``
    that share frame ``f``, with other frames ``a``, ``b``, add
    ``w_p w_q E_f (THIRD_CUMULANT contrast² Re(g_fa g_ab g_bf) - K_fa K_fb)``, ``g`` the
    field correlation and ``K = contrast |g|²`` (module doc)."""
    k = contrast * np.abs(gamma) ** 2
    third = THIRD_CUMULANT * contrast**2

    def term(f, a, b):
        """The bracket for shared frames ``f`` and other frames ``a``, ``b`` (arrays)."""
        cycle = (gamma[f, a] * gamma[a, b] * gamma[b, f]).real
        return excess[f] * (third * cycle - k[f, a] * k[f, b])

    n = weight.shape[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    same = np.sum(weight**2 * (term(i, j, j) + term(j, i, i)))
    lag_one = np.arange(n - 2)
    diagonal = np.sum(
        weight[lag_one, lag_one + 1]
        * weight[lag_one + 1, lag_one + 2]
        * term(lag_one + 1, lag_one, lag_one + 2)
    )
    row = np.sum(weight[:, :-1] * weight[:, 1:] * term(i[:, :-1], j[:, :-1], j[:, 1:]))
    column = np.sum(weight[:-1] * weight[1:] * term(j[:-1], i[:-1], i[1:]))
    return np.array([same, diagonal, row + column])


def shot_grid(excess, cov, offset) -> np.ndarray:
    """``E_i E_j C_ij / offset``: the part of the shot-noise variance of pair ``(i, j)``
    beyond the Isserlis form, ``E_i E_j``, from ``<n_i n_j> = lambda² <I_i I_j>``."""
    return np.outer(excess, excess) * cov / offset


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
    physics, contrast, offset = (
        np.asarray(v) for v in unpack(np.asarray(template.at[free].set(x)), n_scale)
    )
    frames = model.frame_integrals(physics, pairs.t)
    p = jtj_inverse.shape[0]
    products = np.zeros((2, p, p))
    neighbour_products = np.zeros((2, 2, p, p))
    neighbour_jtj = np.zeros((2, p, p))
    moments = np.zeros(3)
    terms = np.zeros(3)
    expected = np.zeros((3, 3))
    for k in range(n_phi):
        scale, base = contrast[min(k, n_scale - 1)], offset[min(k, n_scale - 1)]
        moments += pair_moments(residual[k])
        terms += moment_terms(weight[k])
        gamma = np.asarray(
            model.field_correlation(
                frames, pairs.q, model.parallel_wavevector(physics, pairs.phi[k], pairs.q)
            )
        )
        expected += shape_moments(weight[k], cov[k], scale, base, gamma)
        columns = angle_columns(free, n_scale, k)
        if columns.size == 0:
            continue
        # one angle's grids at a time: memory O(p N²) whatever the number of angles
        symmetric = jnp.asarray(weight[k] + weight[k].T)
        diagonal = np.diagonal(cov[k])
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
        parts = speckle_products_jit(
            jnp.asarray(x),
            template,
            free,
            pairs.t,
            pairs.phi,
            pairs.q,
            k,
            grids,
            symmetric,
            jnp.asarray(diagonal),
            jnp.asarray(shot_grid(diagonal - scale, cov[k], base)),
            n_scale,
        )
        del grids
        block = (columns[:, None], columns[None, :])
        products[(slice(None), *block)] += np.asarray(parts[0])
        neighbour_products[(slice(None), slice(None), *block)] += np.asarray(parts[1])
        neighbour_jtj[(slice(None), *block)] += np.asarray(parts[2])
    # The fit absorbs part of the noise: with H = J A^+ J^T the hat matrix, a moment
    # r^T N r of the residuals (I - H) r_true has E = tr(N Q) - tr(N H Q) - tr(N Q H)
    # + tr(N H Q H) per shape Q; for m0 (N = 1) that is tr(Q) - tr(A^+ B), and the white
    # part keeps n - p as for independent errors.
    expected[0, :2] -= np.einsum("pq,cpq->c", jtj_inverse, products)
    expected[0, 2] = max(pairs.n_pairs - len(x), 1)
    for k in range(2):
        expected[1 + k, :2] += -np.einsum(
            "pq,cpq->c", jtj_inverse, neighbour_products[k]
        ) + np.einsum("pq,cqr,rs,sp->c", jtj_inverse, products, jtj_inverse, neighbour_jtj[k])
        expected[1 + k, 2] = -np.sum(jtj_inverse * neighbour_jtj[k])
    scales = shape_scales(expected, moments, terms)
    covariance = (
        jtj_inverse @ (scales[0] * products[0] + scales[1] * products[1]) @ jtj_inverse
        + scales[2] * jtj_inverse
    )
    return SpeckleErrors(0.5 * (covariance + covariance.T), *scales)


def moment_terms(weight) -> np.ndarray:
    """Number of products summed in each of :func:`pair_moments` of one angle (pairs
    with a non-zero weight on the upper triangle of ``weight``)."""
    fitted = weight > 0
    return np.array(
        [
            np.count_nonzero(fitted),
            np.count_nonzero(fitted[:-1, :-1] & fitted[1:, 1:]),
            np.count_nonzero(fitted[:, :-1] & fitted[:, 1:])
            + np.count_nonzero(fitted[:-1] & fitted[1:]),
        ]
    )


def nonnegative_scales(expected, moments) -> np.ndarray:
    """Non-negative ``theta`` with ``expected @ theta`` closest to ``moments`` (exact
    where it can be). Each column is normalised first, so that a shape that predicts tiny
    moments does not spoil the conditioning; a column of zeros gets 0."""
    norms = np.linalg.norm(expected, axis=0)
    usable = norms > 0
    scales = np.zeros(expected.shape[1])
    if usable.any() and np.all(np.isfinite(expected)) and np.all(np.isfinite(moments)):
        solution = optimize.nnls(expected[:, usable] / norms[usable], moments)[0]
        scales[usable] = solution / norms[usable]
    return scales


def shape_scales(expected, moments, terms) -> np.ndarray:
    """Non-negative scales ``theta`` of the speckle, shot and white shapes from the
    moment equations ``expected @ theta = moments`` (module doc, "Scales").

    With photon counting (a shot shape that is not zero) the speckle scale is held at or
    above the shot scale, both being ``1 / P`` (the speckle's more for unequal modes):
    ``theta = (kappa_n + delta, kappa_n, sigma2)`` with ``kappa_n, delta, sigma2 >= 0``.
    ``terms`` is :func:`moment_terms` summed over the angles. Of the nested choices
    ``delta = sigma2 = 0`` (counting only), ``sigma2 = 0``, and all three free, the first
    that leaves no moment further than ``MOMENT_TOLERANCE`` standard deviations from its
    expectation is taken, the standard deviations those of sums of independent products
    of residuals of variance ``v = m0 / n``: ``sd(m0) = v sqrt(2 n)``,
    ``sd(m1) = v sqrt(n1)``, ``sd(m2) = v sqrt(n2)``.
    """
    expected, moments = np.asarray(expected, float), np.asarray(moments, float)
    terms = np.asarray(terms, float)
    variance = moments[0] / max(terms[0], 1.0)
    spread = variance * np.sqrt(np.array([2.0, 1.0, 1.0]) * terms)
    bound = np.eye(3)
    # nested choices, each taken where the moments allow it: speckle at the shot scale
    # (counting only), speckle above it, then the white shape as well
    choices = []
    if np.any(expected[:, 1] != 0):
        bound[0, 1] = 1.0
        choices.append(np.array([[1.0], [1.0]]))
    choices.append(bound[:2, :2])
    for choice in choices:
        scales = choice @ nonnegative_scales(expected[:, :2] @ choice, moments)
        if np.all(np.abs(expected[:, :2] @ scales - moments) <= MOMENT_TOLERANCE * spread):
            return np.append(scales, 0.0)
    return bound @ nonnegative_scales(expected @ bound, moments)
