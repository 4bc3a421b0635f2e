"""The heterodyne two-time correlation model of MODEL.md, as pure JAX functions.

Every equation exists once here. Two evaluation paths share the same building blocks:

- :func:`c2_grid` (meshgrid path, NLSQ): the full ``(phi, t1, t2)`` array;
- :func:`c2_pairs` (pairwise path, CMC): ``c2`` at given ``(angle, i, j)`` pairs from the
  same per-frame integrals gathered at ``i`` and ``j``; memory ``O(N + n_pairs)``.

Units: ``t`` in s, ``q`` in 1/Å, ``phi`` and ``phi0`` in degrees, transport rates in
Å²/s, velocities in Å/s. ``physics`` is the vector of the 14 physics parameters in the
canonical order of :data:`heterodyne.parameters.PHYSICS_NAMES`, the kernels' documented
signature: each kernel unpacks it whole, by that order, and nothing outside this module
reads it by position.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# compilation first: float64 and the compilation cache before any array exists
from heterodyne import compilation, shapes

# Largest exponent fed to exp in the fraction law: exp(700) ~ 1e304 is still finite, so
# neither the value nor its gradient (value * (t - f2)) becomes inf * 0 = NaN.
_MAX_EXPONENT = 700.0


def power_law(t, prefactor, exponent, offset):
    """``prefactor * t**exponent + offset`` with ``t**exponent`` taken as 0 at ``t <= 0``.

    MODEL.md, "Parameters". The power is evaluated at a safe ``t = 1`` where ``t <= 0``
    and then masked, so that neither the value nor its gradient (``log t``) is NaN.
    """
    positive = t > 0
    safe_t = jnp.where(positive, t, 1.0)
    return jnp.where(positive, prefactor * safe_t**exponent, 0.0) + offset


def transport_rate(t, prefactor, exponent, offset):
    """``J(t) = max(D0 t**alpha + D_offset, 0)`` in Å²/s (MODEL.md, "Parameters").

    The floor uses ``>=`` so that at ``J = 0`` (a static component, ``D0 = 0``) the
    gradient from above is kept: an optimiser at the bound can still move away from 0.
    """
    rate = power_law(t, prefactor, exponent, offset)
    return jnp.where(rate >= 0, rate, 0.0)


def velocity(t, v0, beta, v_offset):
    """``v(t) = v0 t**beta + v_offset`` in Å/s, signed (MODEL.md, "Parameters")."""
    return power_law(t, v0, beta, v_offset)


def sample_fraction(t, f0, f1, f2, f3):
    """``x_s(t) = clip(f0 exp(f1 (t - f2)) + f3, 0, 1)`` (MODEL.md, "Parameters").

    The clip is written with ``where`` so that at exactly 0 or 1 the gradient from
    inside is kept; the exponent is capped so that neither value nor gradient overflow.
    """
    x = f0 * jnp.exp(jnp.minimum(f1 * (t - f2), _MAX_EXPONENT)) + f3
    return jnp.where(x < 0, 0.0, jnp.where(x > 1, 1.0, x))


def cumulative_trapezoid(rate, t):
    """``P(t_0) = 0``, ``P(t_k) = sum_{i<k} (p_i + p_{i+1}) / 2 (t_{i+1} - t_i)``.

    MODEL.md, "The two-time correlation": the integral between frames ``i`` and ``j``
    is ``P(t_j) - P(t_i)``.
    """
    increments = 0.5 * (rate[1:] + rate[:-1]) * jnp.diff(t)
    return jnp.concatenate([jnp.zeros(1, dtype=increments.dtype), jnp.cumsum(increments)])


class FrameIntegrals(NamedTuple):
    """Per-frame quantities from which every pair ``(i, j)`` is built."""

    t: jax.Array  #: frame time [s]
    P_ref: jax.Array  #: cumulative reference transport integral [Å²]
    P_sample: jax.Array  #: cumulative sample transport integral [Å²]
    V: jax.Array  #: cumulative velocity integral (displacement) [Å]
    x_sample: jax.Array  #: sample fraction x_s(t) [-]


def frame_integrals(physics, t) -> FrameIntegrals:
    """Rates, fraction and their trapezoid integrals on the frame times ``t`` [s]."""
    (
        D0_ref,
        alpha_ref,
        D_offset_ref,
        D0_sample,
        alpha_sample,
        D_offset_sample,
        v0,
        beta,
        v_offset,
        f0,
        f1,
        f2,
        f3,
        _phi0,
    ) = physics
    return FrameIntegrals(
        t=t,
        P_ref=cumulative_trapezoid(transport_rate(t, D0_ref, alpha_ref, D_offset_ref), t),
        P_sample=cumulative_trapezoid(
            transport_rate(t, D0_sample, alpha_sample, D_offset_sample), t
        ),
        V=cumulative_trapezoid(velocity(t, v0, beta, v_offset), t),
        x_sample=sample_fraction(t, f0, f1, f2, f3),
    )


def correlation(frames_i: FrameIntegrals, frames_j: FrameIntegrals, q, q_parallel):
    """Normalised heterodyne correlation ``g`` of frames ``i`` and ``j``.

    MODEL.md, "The two-time correlation"::

        g = [ r_i² r_j² exp(-q² A_r) + s_i² s_j² exp(-q² A_s)
            + 2 r_i r_j s_i s_j exp(-q² (A_r + A_s)/2) cos(q cos(phi - phi0) V) ] / (n_i n_j)

    with ``A = |P_j - P_i|``, ``V = V_j - V_i``, ``r = 1 - s``, ``n = r² + s²``.
    The rates are floored at 0, so ``P`` is non-decreasing and ``|P_j - P_i|`` is
    ``P_later - P_earlier``; writing it by time order rather than with ``abs`` gives the
    right one-sided gradient at ``A = 0`` (a static component) in both triangles.
    ``q_parallel = q cos(phi - phi0)`` [1/Å]. Arguments broadcast: frames gathered as
    ``(N, 1)`` and ``(1, N)`` give the grid, frames gathered at pair indices give pairs.
    """
    q2 = q * q
    direction = jnp.where(frames_j.t >= frames_i.t, 1.0, -1.0)
    A_ref = direction * (frames_j.P_ref - frames_i.P_ref)
    A_sample = direction * (frames_j.P_sample - frames_i.P_sample)
    s_i, s_j = frames_i.x_sample, frames_j.x_sample
    r_i, r_j = 1.0 - s_i, 1.0 - s_j
    rr, ss = r_i * r_j, s_i * s_j
    reference = rr * rr * jnp.exp(-q2 * A_ref)
    sample = ss * ss * jnp.exp(-q2 * A_sample)
    cross_amplitude = 2.0 * rr * ss * jnp.exp(-0.5 * q2 * (A_ref + A_sample))
    phase = q_parallel * (frames_j.V - frames_i.V)
    norm = (r_i * r_i + s_i * s_i) * (r_j * r_j + s_j * s_j)
    return (reference + sample + cross_amplitude * jnp.cos(phase)) / norm


def field_correlation(frames: FrameIntegrals, q, q_parallel):
    """Normalised field correlation ``gamma_ij`` of all frame pairs, ``(N, N)`` complex.

    The fields behind MODEL.md's ``g`` (:mod:`heterodyne.speckle`), with ``g = |gamma|²``::

        gamma_ij = [ r_i r_j exp(-q² A_r / 2)
                   + s_i s_j exp(-q² A_s / 2) exp(i q_parallel (V_j - V_i)) ] / sqrt(n_i n_j)

    ``A = |P_j - P_i|``; ``gamma_ji`` is the conjugate of ``gamma_ij``, ``gamma_ii = 1``.
    ``q_parallel = q cos(phi - phi0)`` [1/Å] of one angle.
    """
    q2 = q * q
    s = frames.x_sample
    r = 1.0 - s
    root = jnp.sqrt(r * r + s * s)

    def decay(p):
        return jnp.exp(-0.5 * q2 * jnp.abs(p[None, :] - p[:, None]))

    phase = jnp.exp(1j * q_parallel * (frames.V[None, :] - frames.V[:, None]))
    field = jnp.outer(r, r) * decay(frames.P_ref) + jnp.outer(s, s) * decay(frames.P_sample) * phase
    return field / jnp.outer(root, root)


def field_factors(frames: FrameIntegrals, q, q_parallel):
    """Per-frame factors of :func:`field_correlation` in separable form, for ``t_i <= t_j``.

    ``gamma_ij = sum_m a_im b_jm exp(-(e_jm - e_im))`` with ``M = 2`` terms (reference,
    sample)::

        a = [r, s exp(-i k V)] / sqrt(n),    b = [r, s exp(i k V)] / sqrt(n),
        e = q² [P_r, P_s] / 2

    (``k = q_parallel`` of one angle); the lower triangle is the conjugate.
    """
    s = frames.x_sample
    r = 1.0 - s
    root = jnp.sqrt(r * r + s * s)
    turn = jnp.exp(1j * q_parallel * frames.V)
    b = jnp.stack([r + 0j, s * turn], axis=-1) / root[:, None]
    a = jnp.stack([r + 0j, s * jnp.conj(turn)], axis=-1) / root[:, None]
    e = 0.5 * q * q * jnp.stack([frames.P_ref, frames.P_sample], axis=-1)
    return a, b, e


def correlation_factors(frames: FrameIntegrals, q, q_parallel):
    """Per-frame factors of :func:`correlation` in separable form, for ``t_i <= t_j``.

    MODEL.md, "The two-time correlation", rewritten as a sum of ``M = 4`` rank-one terms
    (reference, sample, cross cos, cross sin)::

        g_ij = sum_m a_im b_jm exp(-(e_jm - e_im))

        a = [r²/n, s²/n, 2 r s cos(k V)/n, 2 r s sin(k V)/n]
        b = [r²/n, s²/n,   r s cos(k V)/n,   r s sin(k V)/n]
        e = q² [P_r, P_s, (P_r + P_s)/2, (P_r + P_s)/2]

    with ``k = q_parallel`` [1/Å]: on ``t_i <= t_j`` the transport integrals are
    ``A = P_j - P_i`` (``P`` is non-decreasing), and
    ``cos(k (V_j - V_i)) = cos(k V_j) cos(k V_i) + sin(k V_j) sin(k V_i)``. The
    exponents ``e`` are non-decreasing in time, so ``exp(-(e_j - e_i)) <= 1``; a caller
    that splits it as ``exp(e_i - e_c) exp(-(e_j - e_c))`` must pick ``e_i <= e_c <= e_j``
    to keep both factors in range.

    Returns
    -------
    a, b : jax.Array
        Shape ``q_parallel.shape + (N, 4)``: one set per angle.
    e : jax.Array
        Shape ``(N, 4)``, the same for every angle [-].
    """
    s = frames.x_sample
    r = 1.0 - s
    norm = r * r + s * s
    phase = q_parallel[..., None] * frames.V
    cos, sin = jnp.cos(phase), jnp.sin(phase)
    rs = r * s / norm
    ones = jnp.ones_like(phase)
    b = jnp.stack([ones * (r * r / norm), ones * (s * s / norm), rs * cos, rs * sin], axis=-1)
    a = b * jnp.array([1.0, 1.0, 2.0, 2.0])
    q2 = q * q
    cross = 0.5 * (frames.P_ref + frames.P_sample)
    e = q2 * jnp.stack([frames.P_ref, frames.P_sample, cross, cross], axis=-1)
    return a, b, e


def parallel_wavevector(physics, phi, q):
    """``q cos(phi - phi0)`` [1/Å]: the wavevector component along the flow."""
    *_, phi0 = physics
    return q * jnp.cos(jnp.deg2rad(phi - phi0))


@jax.jit
def c2_grid(physics, contrast, offset, t, phi, q):
    """Model ``c2`` on the full grid, shape ``(n_phi, N, N)`` (meshgrid path).

    ``c2(phi, t_i, t_j) = offset_phi + contrast_phi * g(i, j; phi)``. ``contrast`` and
    ``offset`` are scalars or have one value per angle.
    """
    frames = frame_integrals(physics, t)
    rows = jax.tree.map(lambda f: f[:, None], frames)
    cols = jax.tree.map(lambda f: f[None, :], frames)
    q_parallel = parallel_wavevector(physics, phi, q)[:, None, None]
    g = correlation(rows, cols, q, q_parallel)
    scale = jnp.broadcast_to(contrast, jnp.shape(phi))[:, None, None]
    base = jnp.broadcast_to(offset, jnp.shape(phi))[:, None, None]
    return base + scale * g


@jax.jit
def c2_pairs(physics, contrast, offset, t, phi, q, angle, i, j):
    """Model ``c2`` at the pairs ``(phi[angle[k]], t[i[k]], t[j[k]])``, shape ``(n_pairs,)``.

    Pairwise path: the per-frame integrals are computed once (``O(N)``) and gathered at
    ``i`` and ``j``; no ``N x N`` array is formed.
    """
    frames = frame_integrals(physics, t)
    q_parallel = parallel_wavevector(physics, phi, q)[angle]
    g = correlation(
        jax.tree.map(lambda f: f[i], frames),
        jax.tree.map(lambda f: f[j], frames),
        q,
        q_parallel,
    )
    scale = jnp.broadcast_to(contrast, jnp.shape(phi))[angle]
    base = jnp.broadcast_to(offset, jnp.shape(phi))[angle]
    return base + scale * g


@jax.jit
def c2_rows(physics, contrast, offset, t, phi, q, rows):
    """Model ``c2`` at the pairs ``(t[rows], t)`` of every angle, shape ``(n_phi, R, N)``.

    Whole rows of the two-time matrices, with the correlation in the form::

        g_aij = [r_i² r_j² E^r_ij + s_i² s_j² E^s_ij
                 + 2 r_i s_i r_j s_j (E^r_ij E^s_ij)^(1/2) (u_ai . u_aj)] / (n_i n_j)

    ``E = exp(-q² |P_j - P_i|)``, ``u_a = (cos k_a V, sin k_a V)`` with
    ``k_a = q cos(phi_a - phi0)``: :func:`correlation`, with the cosine of the phase
    difference expanded (``cos(x - y) = cos x cos y + sin x sin y``). The ``R x N``
    exponentials are shared by all angles and the angle enters through a rank-2 product,
    so an evaluation costs two exponentials per (row, column) plus ``O(n_phi N)``
    trigonometric functions, and its gradient is a few matrix products: no gathers or
    scatters per pair. ``rows`` are frame indices ``(R,)``.
    """
    frames = frame_integrals(physics, t)
    s = frames.x_sample
    r = 1.0 - s
    norm = r * r + s * s
    ref, sample, cross = r * r / norm, s * s / norm, 2.0 * r * s / norm
    q2 = q * q
    later = jnp.where(t[None, :] >= t[rows][:, None], 1.0, -1.0)
    A_ref = later * (frames.P_ref[None, :] - frames.P_ref[rows][:, None])
    A_sample = later * (frames.P_sample[None, :] - frames.P_sample[rows][:, None])
    decay_ref, decay_sample = jnp.exp(-q2 * A_ref), jnp.exp(-q2 * A_sample)
    static = ref[rows][:, None] * ref[None, :] * decay_ref
    static += sample[rows][:, None] * sample[None, :] * decay_sample
    moving = 0.5 * cross[rows][:, None] * cross[None, :] * jnp.sqrt(decay_ref * decay_sample)
    phase = parallel_wavevector(physics, phi, q)[:, None] * frames.V
    u = jnp.stack([jnp.cos(phase), jnp.sin(phase)], axis=1)
    g = static + moving * jnp.einsum("aki,akj->aij", u[:, :, rows], u)
    scale = jnp.broadcast_to(contrast, jnp.shape(phi))[:, None, None]
    base = jnp.broadcast_to(offset, jnp.shape(phi))[:, None, None]
    return base + scale * g


# Rows of the grid per call of c2_rows in c2_grid_rows: the work of a call is
# O(ROW_BLOCK x N x n_phi), small next to the grid beyond a few hundred frames.
ROW_BLOCK = 128


def grid_rows(physics, contrast, offset, t, phi, q, first_rows=None):
    """:func:`c2_grid` in pieces: yields ``(angle index, first row, rows)``, ``rows`` the
    model ``c2`` of up to ``ROW_BLOCK`` consecutive rows of one angle, float64
    ``(R, N)``, computed by :func:`c2_rows`: memory ``O(ROW_BLOCK N)``, never the grid's
    several ``N x N`` intermediates. The frames are padded to their size class
    (:mod:`heterodyne.shapes`), so that one compiled program serves every angle and
    windows of similar length. ``first_rows`` (multiples of ``min(ROW_BLOCK, N)``) picks
    some of the blocks; default all."""
    n, n_phi = int(np.shape(t)[0]), int(np.shape(phi)[0])
    t = shapes.pad_edge(t, shapes.size_class(n))
    size = min(ROW_BLOCK, n)
    physics, phi, q = (np.asarray(v, dtype=np.float64) for v in (physics, phi, q))
    contrast, offset = (
        np.broadcast_to(np.asarray(v, dtype=np.float64), (n_phi,)) for v in (contrast, offset)
    )
    n_rows = min(ROW_BLOCK, t.shape[0])
    for k in range(n_phi):
        angle = (physics, contrast[k : k + 1], offset[k : k + 1], t, phi[k : k + 1], q)
        for start in range(0, n, size) if first_rows is None else first_rows:
            stop = min(start + size, n)
            # a call computes n_rows rows (one shape); those past the window are dropped
            first = min(start, t.shape[0] - n_rows)
            rows = np.arange(first, first + n_rows, dtype=np.int32)
            block = np.asarray(_c2_rows_kept(*angle, rows))[0]
            yield k, start, block[start - first : stop - first, :n]


#: :func:`c2_rows` with its traced program kept on disk (every fit's result and starts
#: compute model rows)
_c2_rows_kept = compilation.exported(c2_rows)


def c2_grid_rows(physics, contrast, offset, t, phi, q, dtype=np.float64) -> np.ndarray:
    """:func:`c2_grid` as a numpy array of ``dtype``, from :func:`grid_rows`: memory the
    grid plus ``O(ROW_BLOCK N)``."""
    n = int(np.shape(t)[0])
    grid = np.empty((int(np.shape(phi)[0]), n, n), dtype=dtype)
    for k, start, rows in grid_rows(physics, contrast, offset, t, phi, q):
        grid[k, start : start + rows.shape[0]] = rows
    return grid


@jax.jit
def g2(physics, contrast, offset, tau, phi, q):
    """One-time (equilibrium) limit ``g2(phi, tau)``, shape ``(n_phi, n_tau)``.

    MODEL.md, "The one-time limit": with constant rates and fraction
    (``alpha_* = beta = 0``, offsets 0, ``f1 = 0``), and ``X = s² / (r² + s²)``::

        g2 = offset + contrast [ (1-X)² exp(-q² D0_ref tau) + X² exp(-q² D0_sample tau)
             + 2 X (1-X) exp(-q² (D0_ref + D0_sample) tau / 2) cos(q v0 tau cos(phi - phi0)) ]

    The exponents, offsets and ``f1`` of ``physics`` are ignored (taken as zero).
    """
    D0_ref, _, _, D0_sample, _, _, v0, _, _, f0, _, f2, f3, _ = physics
    s = sample_fraction(0.0, f0, 0.0, f2, f3)
    X = s * s / ((1.0 - s) ** 2 + s * s)
    q2 = q * q
    tau = jnp.abs(tau)[None, :]
    q_parallel = parallel_wavevector(physics, phi, q)[:, None]
    g = (
        (1.0 - X) ** 2 * jnp.exp(-q2 * D0_ref * tau)
        + X**2 * jnp.exp(-q2 * D0_sample * tau)
        + 2.0
        * X
        * (1.0 - X)
        * jnp.exp(-0.5 * q2 * (D0_ref + D0_sample) * tau)
        * jnp.cos(q_parallel * v0 * tau)
    )
    scale = jnp.broadcast_to(contrast, jnp.shape(phi))[:, None]
    base = jnp.broadcast_to(offset, jnp.shape(phi))[:, None]
    return base + scale * g
