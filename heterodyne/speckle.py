"""Speckle-level simulation: pixel intensities of a q-sector and their two-time correlation.

A beamline measures intensities ``I_p(t_k)`` on the pixels ``p`` of a q-sector and forms
``c2(t_i, t_j) = <I_i I_j>_p / (<I_i>_p <I_j>_p)``. Each frame's intensity enters ``N``
pairs, so the errors of ``c2`` are correlated along rows and columns (MODEL.md, "Noise in
real two-time data"). This module builds such data from the model's own rates and
integrals (:func:`heterodyne.model.frame_integrals`): every pixel is an independent
speckle realisation of a reference and a sample field.

Mapping of the model onto the fields (MODEL.md, "The two-time correlation")
-------------------------------------------------------------------------------
Per pixel and coherent mode, the scattered field is ``E(t) = r(t) E_r(t) + s(t) E_s(t)``
with field amplitudes ``r = x_r = 1 - x_s`` and ``s = x_s`` and unit-variance circular
complex Gaussian fields (sums of many scatterers) whose correlations are::

    <E_r*(t_i) E_r(t_j)> = exp(-q² A_r / 2)
    <E_s*(t_i) E_s(t_j)> = exp(-q² A_s / 2) exp(i q cos(phi - phi0) V)

``A_r, A_s`` are the transport integrals and ``V = ∫ v dt`` the displacement between the
frames, common to all scatterers of the sample (a drift) and absent for the reference.
For circular Gaussian fields ``<I_i I_j> = <I_i><I_j> + |<E_i* E_j>|²`` (Siegert), with
``<I_i> = r_i² + s_i² = n_i`` and::

    |<E_i* E_j>|² = r_i² r_j² exp(-q² A_r) + s_i² s_j² exp(-q² A_s)
                    + 2 r_i r_j s_i s_j exp(-q² (A_r + A_s) / 2) cos(q cos(phi - phi0) V)

so ``<I_i I_j> / (<I_i><I_j>) = 1 + g`` with the model's ``g``: the fraction law gives
field amplitudes, and the intensity fraction of the sample is ``s² / (r² + s²)``.

Model parameters in these terms: ``D0 = 2 D`` for 3-D Brownian motion with diffusion
coefficient ``D`` (``|g1|² = exp(-2 q² D tau)``), ``v0`` the drift velocity, ``phi0`` the
flow direction on the detector, ``contrast`` the speckle contrast ``beta`` of the coherent
modes (:func:`mode_weights`) and ``offset = 1``.
"""

from __future__ import annotations

import numpy as np

from heterodyne import model

#: Pixels simulated at once by :func:`simulated_two_time`; its memory grows with this, not
#: with the number of pixels.
PIXEL_BLOCK = 2000


def mode_weights(contrast) -> np.ndarray:
    """Intensity weights of the coherent modes that give each angle its speckle contrast.

    A partially coherent beam is a sum of mutually incoherent modes with occupations
    ``w_m`` (``sum w_m = 1``); each mode makes an independent speckle pattern, so
    ``I = sum_m w_m |E_m|²`` has contrast ``beta = sum_m w_m²``. For a contrast ``beta``
    in ``(0, 1]`` this takes ``M = ceil(1 / beta)`` modes: one dominant mode of weight
    ``b`` and ``k = M - 1`` equal modes of weight ``a``, with ``k a + b = 1`` and
    ``k a² + b² = beta``::

        a = (k - sqrt(k ((k + 1) beta - 1))) / (k (k + 1)),    b = 1 - k a

    ``beta = 1 / M`` gives ``M`` equal modes.

    Parameters
    ----------
    contrast : array, shape (n_phi,)
        Speckle contrast of each angle, in ``(0, 1]``.

    Returns
    -------
    numpy.ndarray, shape (n_phi, M_max)
        Weights of each angle's modes, padded with zeros to the largest ``M``.
    """
    beta = np.asarray(contrast, dtype=np.float64)
    # The tolerance keeps beta = 1/M, which rounding may put a hair above 1/M, at M modes.
    n_modes = np.ceil(1.0 / beta - 1e-9).astype(int)
    weights = np.zeros((beta.size, int(n_modes.max())))
    for angle, (b, m) in enumerate(zip(beta, n_modes, strict=True)):
        k = m - 1
        if k == 0:
            weights[angle, 0] = 1.0
            continue
        a = (k - np.sqrt(max(k * ((k + 1) * b - 1.0), 0.0))) / (k * (k + 1))
        weights[angle, 0] = 1.0 - k * a
        weights[angle, 1:m] = a
    return weights


def intensities(physics, contrast, t, phi, q, *, n_pixels: int, counts=None, seed=0):
    """Pixel intensities of each angle's q-sector, shape ``(n_phi, n_pixels, N)``.

    Each component's field is built frame by frame with the exact Gaussian recursion::

        E(t_{k+1}) = rho_k E(t_k) + sqrt(1 - |rho_k|²) xi_k,
        rho_k = exp(-q² (P(t_{k+1}) - P(t_k)) / 2) exp(i q_par (V(t_{k+1}) - V(t_k)))

    (``xi_k`` independent unit circular complex Gaussians, ``q_par = q cos(phi - phi0)``
    for the sample, ``0`` for the reference), so that ``<E*(t_i) E(t_j)> = prod rho`` is
    exactly the model's ``exp(-q² A / 2) exp(i q_par V)`` for any time dependence of the
    rates. The fields of different pixels, modes, angles and components are independent.

    Parameters
    ----------
    physics : array, shape (14,)
        Physics parameters in canonical order.
    contrast : array, shape (n_phi,)
        Speckle contrast of each angle, in ``(0, 1]``; realised by :func:`mode_weights`
        (the cost grows with the number of modes, ``ceil(1 / contrast)``).
    t : array, shape (N,)
        Frame times [s].
    phi : array, shape (n_phi,)
        Detector azimuth of each q-sector [deg].
    q : float
        Wavevector [1/Å].
    n_pixels : int
        Pixels per q-sector.
    counts : float, optional
        Mean photon count per pixel and frame: the intensities are Poisson-counted at
        that mean. ``None`` returns the noiseless speckle intensities.
    seed : int or numpy.random.Generator
        Seed of the fields and the counting.

    Returns
    -------
    numpy.ndarray, shape (n_phi, n_pixels, N)
        Intensities in units of each frame's expected intensity (mean 1 over
        realisations), or photon counts of mean ``counts`` with Poisson counting. The
        fraction law sets the mix of the two fields; ``c2`` is normalised per frame, so
        the total does not enter it.
    """
    rng = np.random.default_rng(seed)
    physics = np.asarray(physics, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    phi = np.atleast_1d(np.asarray(phi, dtype=np.float64))
    frames = model.frame_integrals(physics, t)
    q2 = q * q
    # Rates are floored at 0, so the steps of P are >= 0 and |rho| <= 1; expm1 keeps the
    # innovation accurate when a step decorrelates very little.
    step_ref = np.diff(np.asarray(frames.P_ref))
    step_sample = np.diff(np.asarray(frames.P_sample))
    q_parallel = np.asarray(model.parallel_wavevector(physics, phi, q))
    rho_ref = np.exp(-0.5 * q2 * step_ref)
    rho_sample = np.exp(-0.5 * q2 * step_sample)[None, :] * np.exp(
        1j * q_parallel[:, None] * np.diff(np.asarray(frames.V))[None, :]
    )
    innovation_ref = np.sqrt(-np.expm1(-q2 * step_ref))
    innovation_sample = np.sqrt(-np.expm1(-q2 * step_sample))
    s = np.asarray(frames.x_sample)
    r = 1.0 - s
    norm = r * r + s * s
    weights = mode_weights(contrast)
    shape = (2, phi.size, n_pixels, weights.shape[1])

    def gaussian():
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)

    field_ref, field_sample = gaussian()
    intensity = np.empty((phi.size, n_pixels, t.size))
    for k in range(t.size):
        if k > 0:
            xi_ref, xi_sample = gaussian()
            field_ref = rho_ref[k - 1] * field_ref + innovation_ref[k - 1] * xi_ref
            field_sample = (
                rho_sample[:, k - 1, None, None] * field_sample
                + innovation_sample[k - 1] * xi_sample
            )
        field = r[k] * field_ref + s[k] * field_sample
        power = field.real**2 + field.imag**2
        intensity[:, :, k] = np.einsum("apm,am->ap", power, weights) / norm[k]
    if counts is not None:
        intensity = rng.poisson(counts * intensity).astype(np.float64)
    return intensity


def two_time(intensity) -> np.ndarray:
    """Two-time correlation of pixel intensities, shape ``(n_phi, N, N)``.

    ``c2(i, j) = <I_i I_j>_p / (<I_i>_p <I_j>_p)`` over the pixels ``p`` of each angle,
    diagonal included (with Poisson counting it carries the shot-noise spike
    ``1 / counts``); NaN at the pairs of a frame that counted no photon.

    Parameters
    ----------
    intensity : array, shape (n_phi, n_pixels, N)
        Pixel intensities of each angle, e.g. from :func:`intensities`.
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    return normalised(
        np.swapaxes(intensity, 1, 2) @ intensity, intensity.sum(axis=1), intensity.shape[1]
    )


def simulated_two_time(physics, contrast, t, phi, q, *, n_pixels: int, counts=None, seed=0):
    """:func:`two_time` of :func:`intensities` of ``n_pixels`` pixels, shape ``(n_phi, N, N)``,
    accumulated :data:`PIXEL_BLOCK` pixels at a time: memory ``O(n_phi N (N + block))``
    whatever the number of pixels. Arguments as :func:`intensities`; up to one block,
    the same numbers as ``two_time(intensities(...))``.
    """
    rng = np.random.default_rng(seed)
    n_phi, n = np.atleast_1d(phi).size, np.asarray(t).size
    products, sums = np.zeros((n_phi, n, n)), np.zeros((n_phi, n))
    for start in range(0, n_pixels, PIXEL_BLOCK):
        block = intensities(
            physics,
            contrast,
            t,
            phi,
            q,
            n_pixels=min(PIXEL_BLOCK, n_pixels - start),
            counts=counts,
            seed=rng,
        )
        products += np.swapaxes(block, 1, 2) @ block
        sums += block.sum(axis=1)
    return normalised(products, sums, n_pixels)


def normalised(products, sums, n_pixels) -> np.ndarray:
    """``c2 = (products / P) / (m_i m_j)`` with ``m = sums / P`` the mean of each frame;
    NaN where a frame's mean is 0 (a frame that counted no photon has no correlation)."""
    mean = sums / n_pixels
    outer = mean[:, :, None] * mean[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(outer > 0, products / n_pixels / outer, np.nan)
