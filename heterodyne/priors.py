"""The space CMC samples, its priors and its whitening.

Sampled space
    Each varied quantity ``x`` is sampled as ``y = log x`` for the positive scales
    ``D0_ref``, ``D0_sample``, ``v0`` (and the per-angle noise level when the Dataset has
    no ``sigma``), ``y = x`` for all others. ``y`` lives in an interval ``[low, high]``:
    the parameter's bounds, where a log-space parameter's lower bound 0 is replaced by a
    positive floor, the value whose effect over the whole record is ``FLOOR_EFFECT``
    (``D0``: ``q² D0 ∫t^alpha dt = 1e-4``, a decay of 0.01 % from first to last frame;
    ``v0``: a phase ``q v0 ∫t^beta dt = 1e-4`` rad; exponents at their start values).
    Below the floor a component decays by less than 0.01 % over the whole record, far
    below what two-time data resolve, so 0 is "reached" at the floor: a posterior piled
    against it means "consistent with 0" and the result says so. To impose a static
    reference, fix ``D0_ref = 0`` instead (fixed parameters are not sampled). A
    log-space parameter whose bounds allow negative values is sampled linearly, and so
    is one that an NLSQ ``init`` finds within ``LOG_MIN_SIGMAS`` (3) stderr of 0: its
    posterior reaches down to 0, which in log space is a tail over many decades down to
    the floor (and an upward tail of the linear posterior is compressed there too); NUTS
    then crosses it slowly or not at all. Linearly, the posterior is a near-Gaussian cut
    at 0. NUTS then moves in the unconstrained ``u = logit((y - low) / (high - low))``,
    whitened by the Gauss-Newton curvature at the start (``u = u0 + A w``, ``A A^T`` the
    inverse curvature of one shard): numpyro regularises its mass matrix towards a unit
    scale, which would swamp posteriors as narrow as these (sd ~1e-3 in ``u``) and cut
    the step size tenfold.

Reflection at a bound
    Near a bound the logistic map is exponential, ``y - low ≈ (high - low) e^u``: a
    posterior that reaches the bound (such as that of a weakly determined ``D0_ref``)
    becomes in ``u`` a tail over several units with a scale of ~1 where the whitening
    expects the posterior's own, and NUTS mixes slowly there. A linear quantity that
    NLSQ finds within ``REFLECT_SIGMAS`` (1) nominal stderr of a bound (the width of the
    posterior the shards sample, before the speckle correction) is therefore sampled on
    its
    interval doubled beyond the bound ``b``, ``[2 b - high, high]`` (or ``[low, 2 b -
    low]`` at an upper bound), whose logistic map is nearly linear about its midpoint
    ``b``, and every density is taken at the reflection ``x = b + |y - b|`` (``b - |y -
    b|``): ``p_y(y) = p_x(x) / 2``, exact (``|dx/dy| = 1``, two branches of half the mass
    each), continuous at ``b``, with no tail. Shard draws are folded back (the logit of
    the doubled interval is odd about ``b``: ``u -> |u|``) before they are combined.
    Only that close: the reflection mirrors the quantity's correlations with the others
    (a chevron in the sampled space, which the whitening fits on one side only), so a
    posterior whose bulk lies several stderr from the bound samples better through the
    logistic map (README, "Honest error bars", has the weak-reference measurements).

Priors
    Densities in the sampled space ``y``: uniform on ``[low, high]`` (uniform or
    log-uniform on the parameter table's bounds), or, when ``init`` is an
    ``NLSQResult``, a normal centred on its value with a standard deviation of
    ``PRIOR_WIDTH`` (10) times its stderr (``10 stderr / value`` in log space), truncated
    to ``[low, high]``; quantities without a finite stderr keep the uniform prior. Such
    a prior keeps the sampler near the NLSQ solution (a wrong local minimum included)
    while shrinking the posterior width by only ``1 - 1/sqrt(1 + 1/100)``, 0.5 %. The
    noise level (no ``sigma``) is log-uniform on ``NOISE_BOUNDS``.
"""

from __future__ import annotations

import numpy as np

from heterodyne import starts
from heterodyne.errors import ParameterError
from heterodyne.objective import Objective
from heterodyne.parameters import LOG_SCALE, PHYSICS_INDEX, PHYSICS_NAMES
from heterodyne.results import at_entries

PRIOR_WIDTH = 10.0  # NLSQ-centred priors: standard deviation = PRIOR_WIDTH x NLSQ stderr
LOG_MIN_SIGMAS = 3.0  # log space only for a value this many NLSQ stderr above 0
# reflected at a bound: a value within this many nominal stderr of it (module doc)
REFLECT_SIGMAS = 1.0
FLOOR_EFFECT = 1e-4  # a log-space parameter's floor: q² ∫J (or q ∫v) over the record
NOISE_BOUNDS = (1e-6, 1.0)  # log-uniform prior of the per-angle noise level of c2
# Whitening: curvature added to every unconstrained direction. A quantity the data do not
# constrain has the logistic density of a uniform prior seen through the logit, whose
# curvature is at most 1/2; this keeps such directions at unit scale.
_RIDGE = 0.25


def sampled_bounds(problem: Objective, floors: dict[str, float], n_noise: int, init=None):
    """``(low, high, log, fold)`` of the sampled space ``y`` for the varied quantities,
    then ``n_noise`` noise levels; with an NLSQ ``init``, a parameter it finds within
    ``LOG_MIN_SIGMAS`` stderr of 0 is sampled linearly, and a linear one within
    ``REFLECT_SIGMAS`` nominal stderr of a bound is reflected there (``fold`` +1 at the lower
    bound, -1 at the upper, its interval doubled beyond that bound; module doc)."""
    n = len(problem.entries)
    low, high = np.empty(n + n_noise), np.empty(n + n_noise)
    log = np.zeros(n + n_noise, dtype=bool)
    fold = np.zeros(n + n_noise)
    near = near_bounds(init, problem)
    for k, (name, label) in enumerate(zip(problem.names, problem.labels, strict=True)):
        lo, hi = problem.lower[k], problem.upper[k]
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ParameterError(
                f"{label}: CMC samples inside finite bounds with min < max; got "
                f"[{lo:g}, {hi:g}] (set finite bounds, or fix the parameter)"
            )
        if name in floors and lo >= 0 and hi > floors[name] and not near_zero(init, name):
            log[k], low[k], high[k] = True, np.log(max(lo, floors[name])), np.log(hi)
        else:
            fold[k] = near[k]
            low[k] = 2 * lo - hi if fold[k] > 0 else lo
            high[k] = 2 * hi - lo if fold[k] < 0 else hi
    log[n:] = True
    low[n:], high[n:] = np.log(NOISE_BOUNDS[0]), np.log(NOISE_BOUNDS[1])
    return low, high, log, fold


def near_bounds(init, problem: Objective) -> np.ndarray:
    """For each varied quantity, +1 (-1) where NLSQ ``init`` finds it within
    ``REFLECT_SIGMAS`` finite nominal stderr of its lower (upper) bound, else 0 (all 0
    without ``init``): the nominal one, since the shards sample the independent-pair
    likelihood, whose width it is (the speckle correction comes after)."""
    near = np.zeros(len(problem.entries))
    if init is None:
        return near
    values = at_entries(init.params, problem.entries)
    errors = at_entries(init.stderr_nominal, problem.entries)
    reach = REFLECT_SIGMAS * np.where(np.isfinite(errors), errors, 0.0)
    near[values - np.asarray(problem.upper) >= -reach] = -1.0
    near[values - np.asarray(problem.lower) <= reach] = 1.0
    near[reach == 0] = 0.0
    return near


def near_zero(init, name: str) -> bool:
    """Whether NLSQ ``init`` finds ``name`` within ``LOG_MIN_SIGMAS`` finite stderr of
    0; ``False`` without ``init``."""
    if init is None:
        return False
    value, error = init.value(name), init.error(name)
    return bool(np.isfinite(error) and value <= LOG_MIN_SIGMAS * error)


def prior(init, index, low, high, log):
    """``(normal, loc, scale)`` of the prior in the sampled space: uniform on ``[low,
    high]`` (loc and scale then only keep the truncated normal finite), or centred on
    ``init`` with ``PRIOR_WIDTH`` x its stderr where it has a finite one; ``index`` is the
    ``(name, phi)`` of each varied quantity (:attr:`Objective.entries`)."""
    normal = np.zeros(low.size, dtype=bool)
    loc, scale = 0.5 * (low + high), high - low
    if init is None:
        return normal, loc, scale
    values, errors = at_entries(init.params, index), at_entries(init.stderr, index)
    for k, (value, error) in enumerate(zip(values, errors, strict=True)):
        if not (np.isfinite(error) and error > 0):
            continue
        if log[k]:
            value = max(value, np.exp(low[k]))
            value, error = np.log(value), error / value
        normal[k], loc[k], scale[k] = True, np.clip(value, low[k], high[k]), PRIOR_WIDTH * error
    return normal, loc, scale


def log_floors(problem: Objective) -> dict[str, float]:
    """The floor of each log-space parameter: the value whose effect over the record is
    ``FLOOR_EFFECT`` (``q² D0 ∫t^alpha dt``, ``q v0 ∫t^beta dt``)."""
    template = np.asarray(problem.template)
    t, _, q = problem.coordinates
    exponents = {"D0_ref": "alpha_ref", "D0_sample": "alpha_sample", "v0": "beta"}
    # the rate laws with prefactor 1, the fitted exponents and no offset, integrated over
    # the record by the model's own trapezoid (compiled once per size class)
    unit = np.zeros(len(PHYSICS_NAMES))
    for name, exponent in exponents.items():
        unit[PHYSICS_INDEX[name]] = 1.0
        unit[PHYSICS_INDEX[exponent]] = template[PHYSICS_INDEX[exponent]]
    frames = starts.integrals(unit, t)
    integrals = {"D0_ref": frames.P_ref[-1], "D0_sample": frames.P_sample[-1], "v0": frames.V[-1]}
    out = {}
    for name in LOG_SCALE:
        scale = q * q if name.startswith("D0") else q
        out[name] = FLOOR_EFFECT / (scale * float(integrals[name]))
    return out


def whitening(problem, u0, low, high, log, x0, n_shards, noise) -> np.ndarray:
    """``A`` with ``A A^T`` the inverse Gauss-Newton curvature of one shard's log density
    in ``u`` at the start, plus ``_RIDGE``: NUTS then samples ``w`` of about unit scale."""
    n_free = len(problem.entries)
    jtj = problem.normal_equations(problem.x0)[0]
    sigmoid = 1.0 / (1.0 + np.exp(-u0))
    dy_du = (high - low) * sigmoid * (1.0 - sigmoid)
    dx_du = np.where(log, x0, 1.0) * dy_du
    curvature = np.zeros((u0.size, u0.size))
    scale = 1.0
    if noise:
        # Unweighted residuals: the likelihood's curvature is J^T J / noise²; and for
        # y = log(noise) of angle a, -log L = sum r² / (2 e^{2y}) + n_a y has curvature 2 n_a.
        scale = 1.0 / np.mean(x0[n_free:] ** 2)
        counts = np.bincount(np.asarray(problem.pairs.angle), minlength=u0.size - n_free)
        k = np.arange(n_free, u0.size)
        curvature[k, k] = 2.0 * counts * dy_du[n_free:] ** 2
    curvature[:n_free, :n_free] = scale * dx_du[:n_free, None] * jtj * dx_du[None, :n_free]
    curvature = np.where(np.isfinite(curvature), curvature, 0.0) / n_shards
    curvature += _RIDGE * np.eye(u0.size)
    return np.linalg.inv(np.linalg.cholesky(curvature)).T
