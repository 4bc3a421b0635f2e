"""The combination of the CMC shard posteriors, and its correction for correlated errors.

Combination
    In the unconstrained space ``u``, where posteriors are closest to Gaussian and any
    combined draw maps back inside the bounds: ``u^(c,d) = (sum_s W_s)^-1 sum_s W_s
    u_s^(c,d)``, ``W_s`` the inverse covariance of shard ``s``'s draws. With one shard
    the draws are that shard's, unchanged.

Correlated noise (``errors="speckle"``)
    Two-time pairs share frames, so their errors are correlated and the independent-pair
    likelihood above gives a posterior too narrow (MODEL.md, "Noise"); NLSQ's
    ``errors="speckle"`` estimates the covariance of the fit under the speckle error
    model (:mod:`heterodyne.uncertainty`). CMC corrects the likelihood the way composite
    likelihoods are corrected (Ribatet, Cooley, Davison 2012, curvature adjustment): the
    combined draws are mapped ``u* = ubar + C (u - ubar)`` about their mean, with
    ``C = Sigma_s^(1/2) Sigma_n^(-1/2)`` from the nominal (``Sigma_n``, independent
    pairs, what the likelihood's curvature gives) and the speckle (``Sigma_s``)
    covariances of the varied quantities at the posterior mean, carried into ``u`` by
    the derivative of the map ``u -> x``. For a Gaussian posterior this is sampling the
    likelihood whose curvature is ``Sigma_s^-1`` instead of ``Sigma_n^-1``: the draws
    keep their shape and centre, and their covariance becomes ``Sigma_s``. A quantity
    sampled reflected at a bound (:mod:`heterodyne.priors`) is mapped linearly about its
    mean, and a draw carried across the bound is reflected back. Noise levels
    are left as they are. It reduces to no change for independent noise. The draws
    before the correction are kept (``uncorrected_posterior``).

References
----------
Ribatet, Cooley, Davison, "Bayesian inference from composite likelihoods, with an
application to spatial extremes", Statistica Sinica 22 (2012).
Scott, Blocker, Bonassi, Chipman, George, McCulloch, "Bayes and big data: the consensus
Monte Carlo algorithm", Int. J. Management Science and Engineering Management 11 (2016).
"""

from __future__ import annotations

import numpy as np


def consensus(draws: np.ndarray, columns=None, size: int | None = None) -> np.ndarray:
    """Precision-weighted consensus of shard draws ``(S, chain, draw, n)`` -> ``(chain,
    draw, n)``: ``(sum_s W_s)^-1 sum_s W_s u_s`` draw by draw, ``W_s`` the inverse
    covariance of shard ``s``'s draws.

    With ``columns``, shard ``s`` samples only the entries ``columns[s]`` of a vector of
    ``size`` (``draws`` a sequence of ``(chain, draw, n_s)`` arrays): its precision is
    embedded there, ``(sum_s E_s W_s E_s^T)^-1 sum_s E_s W_s u_s`` (the joint CMC over
    q-bins, :mod:`heterodyne.joint_cmc`); every entry must be sampled by some shard.
    """
    if columns is None:
        if draws.shape[0] == 1:
            return draws[0]
        columns, size = [np.arange(draws.shape[-1])] * draws.shape[0], draws.shape[-1]
    chain_draw = draws[0].shape[:-1]
    weighted = np.zeros((*chain_draw, size))
    total = np.zeros((size, size))
    for part, column in zip(draws, columns, strict=True):
        flat = part.reshape(-1, part.shape[-1])
        # Pseudo-inverses: a shard whose draws do not move along some direction (a stuck
        # chain, which fails its diagnostics) gets no weight there rather than infinite
        # weight.
        precision = np.linalg.pinv(np.atleast_2d(np.cov(flat, rowvar=False)), hermitian=True)
        weighted[..., column] += part @ precision.T
        total[np.ix_(column, column)] += precision
    return weighted @ np.linalg.pinv(total, hermitian=True).T


def adjustment(plan, u: np.ndarray, errors: str) -> tuple[np.ndarray, dict]:
    """The combined draws ``u`` (chain, draw, n) of the run ``plan``
    (:class:`heterodyne.cmc.Plan` or :class:`heterodyne.joint_cmc.JointPlan`: its
    ``n_free``, ``space``, ``physical`` and ``covariances``) corrected for ``errors``
    (module doc, "Correlated noise"), and the scales of the error model."""
    if errors == "nominal":
        return u, {}
    n_free, flat = plan.n_free, u.reshape(-1, u.shape[-1])
    centre = flat.mean(axis=0)
    x = plan.physical(centre)[:n_free]
    nominal_x, target_x, scales = plan.covariances(x, errors)
    # dx/du at the centre: dx/dy (x in log space, else 1) times dy/du of the logistic map
    space = plan.space
    sigmoid = 1.0 / (1.0 + np.exp(-centre[:n_free]))
    dy_du = (space.high - space.low)[:n_free] * sigmoid * (1.0 - sigmoid)
    dx_du = np.where(space.log[:n_free], x, 1.0) * dy_du
    nominal = nominal_x / np.outer(dx_du, dx_du)
    target = target_x / np.outer(dx_du, dx_du)
    # C = Sigma_s^(1/2) Sigma_n^(-1/2), on the matrices scaled to unit nominal diagonal
    scale = np.sqrt(np.diag(nominal))
    scale = np.where(scale > 0, scale, 1.0)
    ratio = _matrix_power(target / np.outer(scale, scale), 0.5) @ _matrix_power(
        nominal / np.outer(scale, scale), -0.5
    )
    matrix = scale[:, None] * ratio / scale[None, :]
    out = u.copy()
    out[..., :n_free] = centre[:n_free] + (u[..., :n_free] - centre[:n_free]) @ matrix.T
    return out, scales


def _matrix_power(m: np.ndarray, power: float) -> np.ndarray:
    """``m^power`` of a symmetric positive semi-definite matrix; directions with no
    variance (eigenvalue below 1e-12 of the largest) map to 0."""
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    keep = w > 1e-12 * max(w.max(), 0.0)
    return (v * np.where(keep, np.where(keep, w, 1.0) ** power, 0.0)) @ v.T
