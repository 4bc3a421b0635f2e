"""Non-linear least squares: ``fit_nlsq``.

``scipy.optimize.least_squares`` (trust-region reflective, bounds from the parameter
table) minimises the sum of squared weighted residuals of :mod:`heterodyne.objective`
with an exact Jacobian from ``jax.jacfwd``. The residual and Jacobian are compiled once
per data shape: the data and the fixed values are arguments, not constants, so a
multi-start or a second fit of same-shaped data reuses the compiled code.
"""

from __future__ import annotations

import copy
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from scipy.optimize import least_squares
from scipy.stats import qmc
from tqdm.auto import tqdm

from heterodyne import checks, model, objective, starts, structured, uncertainty
from heterodyne.errors import OptionError, ParameterError
from heterodyne.memory import FIT_MEMORY, check_memory
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, Parameters
from heterodyne.results import NLSQResult, identifiability_warnings

SCALINGS = ("per_angle", "shared")
# Parameters drawn log-uniformly by multistart: positive scales spanning decades.
LOG_SCALE = ("D0_ref", "D0_sample", "v0")
# The log-uniform range of a log-scale parameter whose lower bound is 0 starts this many
# decades below its upper bound.
LOG_DECADES = 6
# Starts of multistart="auto": the best estimate from the data and the next distinct ones.
AUTO_STARTS = 3


# Pairs are processed in blocks of this many, so that the Jacobian is never held for all
# pairs at once: memory O(BLOCK x n_varied) whatever the size of the data.
BLOCK = 2**16


def _residuals(x, template, free, pairs, n_scale):
    return objective.residuals(template.at[free].set(x), pairs, n_scale)


def _normal_equations(x, template, free, pairs, n_scale):
    """``(J^T J, J^T r, r^T r)`` at ``x``, accumulated over blocks of pairs."""
    per_pair = {k: getattr(pairs, k) for k in ("angle", "i", "j", "c2", "weight")}
    n_blocks = -(-pairs.n_pairs // BLOCK)
    pad = n_blocks * BLOCK - pairs.n_pairs
    # padded pairs have weight 0: their residual and Jacobian rows are exactly 0
    blocks = {k: jnp.pad(v, (0, pad)).reshape(n_blocks, BLOCK) for k, v in per_pair.items()}

    def accumulate(totals, block):
        part = pairs._replace(**block)
        r = _residuals(x, template, free, part, n_scale)
        jac = jax.jacfwd(_residuals)(x, template, free, part, n_scale)
        return (totals[0] + jac.T @ jac, totals[1] + jac.T @ r, totals[2] + r @ r), None

    n = x.shape[0]
    zeros = (jnp.zeros((n, n)), jnp.zeros(n), jnp.zeros(()))
    return jax.lax.scan(accumulate, zeros, blocks)[0]


_residuals_jit = jax.jit(_residuals, static_argnums=4)
_normal_equations_jit = jax.jit(_normal_equations, static_argnums=4)


def fit_nlsq(
    ds: xr.Dataset,
    params=None,
    *,
    fix=(),
    multistart: int | str = "auto",
    seed: int = 0,
    scaling: str = "per_angle",
    errors: str = "nominal",
    progress: bool = True,
    **least_squares_options,
) -> NLSQResult:
    """Fit the heterodyne model to all angles of ``ds`` by least squares.

    Parameters
    ----------
    ds : xarray.Dataset
        Canonical two-time Dataset (``hd.load``, ``hd.simulate``, ``hd.from_arrays``).
    params : Parameters, dict or None
        Starting values, bounds and which parameters vary; ``None`` takes the defaults
        of the parameter table. Varied ``D0_ref``, ``D0_sample``, ``f0``, ``v0`` and
        ``phi0`` whose value was not given start from estimates read off the data
        (:mod:`heterodyne.starts`); ``contrast`` and ``offset`` left at ``None`` are
        solved for per angle given the starting physics. The default upper bound of
        ``v0`` is the largest velocity the frame rate resolves, ``pi / (q dt)``.
    fix : sequence of str
        Names of parameters to hold at their value (same as ``params[name].vary = False``).
    multistart : "auto" or int
        ``"auto"``: also start from the next-best distinct estimates of the data
        (:data:`AUTO_STARTS` in all). An integer ``n``: ``n`` extra starts from a
        Latin-hypercube design inside the bounds of the varied physics parameters
        (log-uniform for ``D0_*`` and ``v0``); 0 for one start. The best fit by cost is
        returned, in the labelling convention (the reference is the slower component);
        all are kept in ``result.starts``.
    seed : int
        Seed of the multistart design.
    scaling : {"per_angle", "shared"}
        One contrast/offset pair per angle, or one pair for all angles.
    errors : {"nominal", "speckle"}
        Which standard errors ``.stderr`` and ``.covariance`` hold. ``"nominal"``: least
        squares, treating the pairs as independent (lower bounds for two-time data).
        ``"speckle"``: the covariance of pixel-averaged ``c2``, whose pairs share frames,
        with its scale estimated from the residuals (:mod:`heterodyne.uncertainty`); it
        reduces to the nominal errors for independent noise. The nominal errors are kept
        in ``.stderr_nominal`` either way.
    progress : bool
        Show a progress bar (cost evaluations, or starts with ``multistart``).
    **least_squares_options
        Passed to ``scipy.optimize.least_squares``: ``ftol``, ``xtol``, ``gtol``,
        ``max_nfev``, ``x_scale``, ``method`` ("trf" or "dogbox"), ``f_scale``,
        ``tr_solver``, ``verbose``; ``loss`` only "linear" (scipy sees the compressed
        problem, on which a robust loss would not act). Anything else raises
        ``OptionError``.

    Returns
    -------
    NLSQResult
        ``.params``, ``.stderr``, ``.report()``, ``.plot()``, ``.to_netcdf()``.

    Raises
    ------
    DataError
        ``ds`` is not a valid Dataset, or the fit would not fit in memory
        (:func:`heterodyne.memory.check_memory`; the message gives the remedy).
    ParameterError, OptionError
        Bad parameters or options; all raised before any compilation.

    Notes
    -----
    Minimises ``sum_k ((model_k - c2_k) / sigma_k)²`` over the pairs ``t1 < t2`` of all
    angles (diagonal and non-finite pairs excluded). Standard errors are
    ``sqrt(diag((J^T J)^-1))`` at the optimum; without ``sigma`` they are scaled by the
    residual variance ``chi2 / (n_pairs - n_varied)``, as ``curve_fit`` does. Two-time
    pairs share frames, so these nominal errors are lower bounds (MODEL.md, "Noise");
    ``errors="speckle"`` accounts for it.

    Examples
    --------
    >>> ds = hd.simulate({"v0": 500.0}, phi=[0, 45, 90], noise=0.01)
    >>> result = hd.fit_nlsq(ds, hd.Parameters(v0=400.0))
    >>> print(result.report())  # doctest: +SKIP
    """
    checks.check_fit_nlsq(
        ds, params, fix=fix, multistart=multistart, seed=seed, scaling=scaling, errors=errors,
        progress=progress, options=least_squares_options,
    )  # fmt: skip
    check_memory(ds["c2"].shape, what="fit_nlsq", **FIT_MEMORY[errors])
    problem = _Problem.build(ds, params, fix=fix, scaling=scaling, multistart=multistart)
    options = {"x_scale": "jac", "method": "trf", **least_squares_options}
    if multistart == "auto":
        x_starts = [problem.x0] + problem.alternatives
    else:
        x_starts = [problem.x0] + list(problem.design(multistart, seed))
    if len(x_starts) == 1:
        outcomes = [problem.solve(x_starts[0], options, progress=progress)]
    else:
        workers = min(len(x_starts), os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(problem.solve, x, options, progress=False) for x in x_starts]
            outcomes = [
                f.result()
                for f in tqdm(futures, desc="multistart", unit="start", disable=not progress)
            ]
    return problem.result(outcomes, options, errors=errors)


class Errors(NamedTuple):
    """Outcome of :meth:`_Problem.errors_at`."""

    covariance: np.ndarray  #: covariance of the varied quantities, the chosen errors
    nominal: np.ndarray  #: the nominal least-squares covariance
    scales: dict  #: scales of the error model (``speckle_kappa``, ``white_variance``)
    z: np.ndarray  #: the packed vector at ``x``
    model_c2: np.ndarray  #: model on the grid, (n_phi, N, N)
    residuals: np.ndarray  #: weighted residuals at the fitted pairs


class _Problem:
    """Everything one fit needs, built and checked before any compile."""

    def __init__(self, ds, params, pairs, template, free, labels, lower, upper, n_scale, scaling):
        self.ds, self.params, self.pairs = ds, params, pairs
        self.template, self.free, self.labels = template, free, labels
        self.lower, self.upper, self.n_scale, self.scaling = lower, upper, n_scale, scaling
        self.x0 = np.asarray(template)[np.asarray(free)]
        self.n_physics = int(np.sum(np.asarray(free) < len(PHYSICS_NAMES)))  #: varied physics

    @classmethod
    def build(cls, ds, params, *, fix, scaling, multistart=0):
        """The problem of ``ds`` (validated by the caller) and ``params``: the start
        read off the data where ``params`` gives none (:func:`starts.candidates`), and
        with ``multistart="auto"`` the distinct alternatives as ``alternatives``."""
        if scaling not in SCALINGS:
            raise OptionError(f"scaling must be one of {SCALINGS}; got {scaling!r}")
        p = Parameters.coerce(params)
        if isinstance(fix, str):
            fix = (fix,)
        p.fix(*fix)
        n_phi = ds.sizes["phi"]
        p.validate(n_phi)
        for message in identifiability_warnings(p):
            warnings.warn(message, stacklevel=3)
        pairs = objective.fitted_pairs(ds)
        n_scale = n_phi if scaling == "per_angle" else 1
        v_max = starts.resolvable_velocity(ds)
        if not p["v0"].max_given and p["v0"].max > v_max >= p["v0"].min:
            p["v0"].max = v_max
        p.clip_placeholders()
        estimated = [n for n in PHYSICS_NAMES if p.from_data(n)]
        found = []
        if estimated or multistart == "auto":
            n_found = AUTO_STARTS if multistart == "auto" else 1
            found = starts.candidates(ds, p, n_found, p["v0"].max)
            for name in estimated:
                k = PHYSICS_NAMES.index(name)
                p[name].value = float(np.clip(found[0][k], p[name].min, p[name].max))
                p[name].given = False
        estimates = estimate_scaling(ds, p.physics_values())
        values, lower, upper, labels, free = [], [], [], [], []
        for name in PHYSICS_NAMES:
            par = p[name]
            if par.vary:
                free.append(len(values))
                labels.append(name)
                lower.append(par.min)
                upper.append(par.max)
            values.append(float(par.value))
        for name in SCALING_NAMES:
            par = p[name]
            start = (
                estimates[name]
                if par.value is None
                else np.broadcast_to(np.asarray(par.value, dtype=np.float64), (n_phi,))
            )
            start = np.clip(start, par.min, par.max)
            if n_scale == 1:
                start = np.array([np.mean(start)])
            for k in range(n_scale):
                if par.vary:
                    free.append(len(values))
                    labels.append(f"{name}[{k}]" if scaling == "per_angle" else name)
                    lower.append(par.min)
                    upper.append(par.max)
                values.append(float(start[k]))
        if not free:
            raise ParameterError("no parameter varies; nothing to fit")
        if len(free) >= pairs.n_pairs:
            raise ParameterError(
                f"{len(free)} varied parameters but only {pairs.n_pairs} finite pairs"
            )
        problem = cls(
            ds,
            p,
            pairs,
            jnp.asarray(values),
            jnp.asarray(free, dtype=jnp.int32),
            tuple(labels),
            np.asarray(lower),
            np.asarray(upper),
            n_scale,
            scaling,
        )
        # with estimated starts the first candidate is x0 itself; given starts are kept
        # and the data's candidates added where they differ
        alternatives = [problem.pack(v) for v in found[1 if estimated else 0 :]]
        problem.alternatives = [x for x in alternatives if not np.allclose(x, problem.x0)]
        return problem

    def pack(self, physics: np.ndarray, base=None) -> np.ndarray:
        """``base`` (default ``x0``) with its varied physics entries taken from
        ``physics`` (14,), clipped to the bounds."""
        x = (self.x0 if base is None else np.asarray(base, dtype=float)).copy()
        for k, label in enumerate(self.labels):
            if label in PHYSICS_NAMES:
                x[k] = physics[PHYSICS_NAMES.index(label)]
        return np.clip(x, self.lower, self.upper)

    def physics(self, x) -> np.ndarray:
        """The 14 physics values at the solver vector ``x``."""
        z = np.asarray(self.template).copy()
        z[np.asarray(self.free)] = x
        return z[: len(PHYSICS_NAMES)]

    def in_convention(self, outcome, options):
        """``(outcome, how)``: ``outcome`` with the reference the slower component
        (:func:`starts.exchange`); ``how`` is ``"exact"`` (relabelled, same cost),
        ``"refit"`` (refitted from the relabelled point), ``"failed"`` (a faster
        reference that could not be relabelled) or ``""`` (already in convention)."""
        t = np.asarray(self.pairs.t)
        mapped = starts.exchange(self.physics(outcome.x), self.params, t)
        if mapped is None:
            ref, sample = starts.transport(self.physics(outcome.x), t)
            return outcome, "failed" if ref > sample and self._labels_free() else ""
        physics, exact = mapped
        x = self.pack(physics, outcome.x)
        if exact:
            jtj, _, rtr = self.normal_equations(x)
            relabelled = copy.copy(outcome)
            relabelled.x, relabelled.jtj, relabelled.cost = x, jtj, 0.5 * float(rtr)
            return relabelled, "exact"
        refit = self.solve(x, options, progress=False)
        ref, sample = starts.transport(self.physics(refit.x), t)
        if refit.success and ref <= sample and refit.cost <= outcome.cost * (1 + 1e-6):
            return refit, "refit"
        return outcome, "failed"

    def _labels_free(self) -> bool:
        return all(self.params[a].vary and self.params[b].vary for a, b in starts.PAIRS[:1])

    def residuals(self, x):
        """Weighted residuals at all fitted pairs, (n_pairs,)."""
        return np.asarray(
            _residuals_jit(jnp.asarray(x), self.template, self.free, self.pairs, self.n_scale)
        )

    def normal_equations(self, x):
        """``(J^T J, J^T r, r^T r)`` at ``x`` as numpy arrays.

        From the separable form of the model (:mod:`heterodyne.structured`, ``O(N)``
        transcendentals) where its rule allows (weights constant per angle, fewer masked
        pairs than fitted ones), else from the blocked Jacobian. The block layout of the
        data is built on the first call and kept.
        """
        if "_blocks" not in self.__dict__:
            self._blocks = structured.blocks(self.pairs)
        x = jnp.asarray(x)
        if self._blocks is None:
            out = _normal_equations_jit(x, self.template, self.free, self.pairs, self.n_scale)
        else:
            out = structured.normal_equations(
                x, self.template, self.free, self._blocks, self.n_scale, self.n_physics
            )
        return tuple(np.asarray(a) for a in out)

    def design(self, n, seed):
        """``n`` starts from a Latin-hypercube design in the bounds of the varied physics
        parameters (log-uniform for ``LOG_SCALE``); contrast and offset keep ``x0``."""
        if n == 0:
            return np.empty((0, self.x0.size))
        physics = [k for k, label in enumerate(self.labels) if label in PHYSICS_NAMES]
        unit = qmc.LatinHypercube(len(physics), seed=seed).random(n)
        starts = np.tile(self.x0, (n, 1))
        for column, k in enumerate(physics):
            lo, hi = self.lower[k], self.upper[k]
            if self.labels[k] in LOG_SCALE and hi > 0:
                lo_log = np.log10(max(lo, hi * 10.0**-LOG_DECADES))
                starts[:, k] = 10.0 ** (lo_log + unit[:, column] * (np.log10(hi) - lo_log))
            else:
                starts[:, k] = lo + unit[:, column] * (hi - lo)
        return starts

    def solve(self, x0, options, *, progress):
        """One ``least_squares`` run on the compressed problem of :class:`Compressed`."""
        bar = tqdm(desc="nlsq", unit=" evals", disable=not progress, leave=False)
        compressed = Compressed(self.normal_equations)

        def fun(x):
            f = compressed.residual(x)
            bar.update(1)
            bar.set_postfix(cost=f"{0.5 * float(f @ f):.6g}", refresh=False)
            return f

        try:
            outcome = least_squares(
                fun,
                np.clip(x0, self.lower, self.upper),
                jac=compressed.jacobian,
                bounds=(self.lower, self.upper),
                **options,
            )
        finally:
            bar.close()
        outcome.jtj = compressed.normal_matrix(outcome.x)
        return outcome

    def errors_at(self, x, jtj, errors: str) -> Errors:
        """Covariance of the varied quantities at ``x`` with ``J^T J = jtj`` there: the
        nominal one, and the one ``errors`` names (:mod:`heterodyne.uncertainty`)."""
        z = np.asarray(self.template).copy()
        z[np.asarray(self.free)] = x
        residuals = self.residuals(x)
        chi2 = float(residuals @ residuals)
        jtj_inverse = pseudo_inverse(jtj)
        nominal = jtj_inverse.copy()
        if "sigma" not in self.ds.data_vars:
            nominal *= chi2 / max(self.pairs.n_pairs - x.size, 1)
        physics, contrast, offset = objective.unpack(z, self.n_scale)
        model_c2 = np.asarray(
            model.c2_grid(physics, contrast, offset, self.pairs.t, self.pairs.phi, self.pairs.q)
        )
        covariance, scales = nominal, {}
        if errors == "speckle":
            speckle = uncertainty.speckle_covariance(
                jtj_inverse,
                x,
                self.template,
                self.free,
                self.pairs,
                self.n_scale,
                residuals,
                uncertainty.intensity_covariance(model_c2, self.ds["c2"].values, offset),
            )
            covariance = speckle.covariance
            scales = {"speckle_kappa": speckle.kappa, "white_variance": speckle.white}
        return Errors(covariance, nominal, scales, z, model_c2, residuals)

    def result(self, outcomes, options, *, errors="nominal"):
        costs = np.array([o.cost if np.all(np.isfinite(o.x)) else np.inf for o in outcomes])
        best, exchanged = self.in_convention(outcomes[int(np.argmin(costs))], options)
        chi2 = float(2.0 * best.cost)
        covariance, nominal, scales, z, model_c2, residuals = self.errors_at(
            best.x, best.jtj, errors
        )
        success = bool(best.success) and bool(np.all(np.isfinite(best.x)))
        tried = xr.Dataset(
            {
                "x": (("start", "name"), np.array([o.x for o in outcomes])),
                "cost": ("start", costs),
                "nfev": ("start", np.array([o.nfev for o in outcomes])),
                "success": ("start", np.array([int(o.success) for o in outcomes])),
            },
            coords={"start": np.arange(len(outcomes)), "name": list(self.labels)},
        )
        return NLSQResult.from_fit(
            data=self.ds,
            params=self.params,
            z=z,
            labels=self.labels,
            covariance=covariance,
            nominal=nominal,
            errors=errors,
            error_scales=scales,
            model_c2=model_c2,
            pairs=self.pairs,
            residuals=residuals,
            chi2=chi2,
            nfev=int(best.nfev),
            success=success,
            message=str(best.message),
            starts=tried,
            scaling=self.scaling,
            lower=self.lower,
            upper=self.upper,
            notes={"exchanged": exchanged, "resolvable_v": starts.resolvable_velocity(self.ds)},
        )


def estimate_scaling(ds: xr.Dataset, physics: np.ndarray) -> dict[str, np.ndarray]:
    """Per-angle starting ``contrast`` and ``offset`` from the data.

    ``c2 = offset + contrast g`` is linear in both, so given the starting physics (hence
    ``g``) they are solved for by linear least squares over the fitted pairs. Where that
    gives no positive contrast (a starting ``g`` far from the data, or one that does not
    vary), the plateau estimate is used instead: offset = median ``c2`` over the longest
    10 % of lags, contrast = mean ``c2`` one frame off the diagonal minus the offset.
    """
    c2 = ds["c2"].values
    n = c2.shape[-1]
    i, j = np.triu_indices(n, 1)
    g = np.asarray(
        model.c2_grid(physics, 1.0, 0.0, ds["t1"].values, ds["phi"].values, float(ds["q"]))
    )[:, i, j]
    lag = j - i
    far, near = lag >= max(1, int(0.9 * (n - 1))), lag == 1
    contrast, offset = np.full(c2.shape[0], 0.1), np.ones(c2.shape[0])
    for k, data in enumerate(c2[:, i, j]):
        ok = np.isfinite(data)
        # the least-squares line through (g, c2), centered: slope cov / var
        g_ok, d_ok = g[k, ok], data[ok]
        g_dev = g_ok - g_ok.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = (g_dev @ (d_ok - d_ok.mean())) / (g_dev @ g_dev)
        base = d_ok.mean() - scale * g_ok.mean()
        if not scale > 0 and np.any(ok & far) and np.any(ok & near):
            base = np.median(data[ok & far])
            scale = np.mean(data[ok & near]) - base
        if np.isfinite(base) and np.isfinite(scale) and scale > 0:
            contrast[k], offset[k] = scale, base
    return {"contrast": contrast, "offset": offset}


class Compressed:
    """The least-squares problem reduced to ``n + 1`` rows with the same geometry.

    With ``A = J^T J = D^-1 V L V^T D^-1`` (``D`` the column norms, ``L`` the eigenvalues of
    the normalised matrix), the Jacobian ``J_c = [L^1/2 V^T D^-1; 0]`` and residual
    ``f_c = [L^-1/2 V^T D J^T r; rho]``, ``rho² = r^T r - |L^-1/2 V^T D J^T r|²``, satisfy
    ``J_c^T J_c = J^T J``, ``J_c^T f_c = J^T r`` and ``|f_c| = |r|``, so the trust-region
    steps, predicted and actual reductions of ``least_squares`` are those of the full
    problem, while scipy never holds an ``n_pairs x n`` matrix.

    ``fun(x)`` and ``jac(x)`` are called at the same ``x`` in turn; both come from one
    evaluation of the normal equations, cached by ``x``.
    """

    def __init__(self, normal_equations):
        self._normal_equations = normal_equations
        self._x = None

    def _at(self, x):
        if self._x is None or not np.array_equal(x, self._x):
            jtj, jtr, rtr = self._normal_equations(x)
            scale, eigval, eigvec, keep = normalised_eigh(jtj)
            root = np.sqrt(np.where(keep, eigval, 0.0))
            inv = _safe_inverse(scale)
            y = np.where(keep, (eigvec.T @ (inv * jtr)) / np.where(keep, root, 1.0), 0.0)
            rho = np.sqrt(max(rtr - y @ y, 0.0))
            jac = np.vstack([(root[:, None] * eigvec.T) * scale, np.zeros(jtj.shape[0])])
            self._x, self._f, self._jac, self._jtj = x.copy(), np.append(y, rho), jac, jtj
        return self

    def residual(self, x):
        return self._at(x)._f

    def jacobian(self, x):
        return self._at(x)._jac

    def normal_matrix(self, x):
        return self._at(x)._jtj


def normalised_eigh(jtj: np.ndarray):
    """Eigen-decomposition of ``J^T J`` with unit diagonal: ``(column norms, eigenvalues,
    eigenvectors, mask of eigenvalues above eps * n * max)``. Normalising first keeps
    parameters of very different units (D0 ~ 1e4, f0 ~ 0.5) from spoiling the
    conditioning; a zero column (a parameter with no effect) gets a zero eigenvalue."""
    scale = np.sqrt(np.diag(jtj))
    inv = _safe_inverse(scale)
    eigval, eigvec = np.linalg.eigh(jtj * np.outer(inv, inv))
    keep = eigval > np.finfo(float).eps * jtj.shape[0] * max(eigval.max(), 0.0)
    return scale, eigval, eigvec, keep


def pseudo_inverse(jtj: np.ndarray) -> np.ndarray:
    """``(J^T J)^+`` from :func:`normalised_eigh`: a degenerate direction gives large, not
    infinite, errors."""
    scale, eigval, eigvec, keep = normalised_eigh(jtj)
    inv = _safe_inverse(scale)
    normalised = (eigvec[:, keep] / eigval[keep]) @ eigvec[:, keep].T
    return normalised * np.outer(inv, inv)


def _safe_inverse(scale):
    return np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
