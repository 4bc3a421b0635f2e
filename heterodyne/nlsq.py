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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xarray as xr
from scipy.optimize import least_squares
from tqdm.auto import tqdm

from heterodyne import checks, qbins, starts
from heterodyne.joint import COMBINATION, JointObjective
from heterodyne.joint_result import JointResult
from heterodyne.memory import check_memory, fit_needs
from heterodyne.nlsq_result import NLSQResult
from heterodyne.objective import Objective, normalised_eigh, safe_inverse
from heterodyne.results import entry_coords

# A joint fit is refitted with the bins' weights only where one differs from their mean by
# more than this fraction.
REWEIGHT_TOLERANCE = 0.05


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
    separate: bool = True,
    **least_squares_options,
) -> NLSQResult | JointResult:
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
        (:data:`heterodyne.objective.AUTO_STARTS` in all). An integer ``n``: ``n`` extra
        starts from a Latin-hypercube design inside the bounds of the varied physics
        parameters (log-uniform for ``D0_*`` and ``v0``); 0 for one start. The best fit by cost is
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
    separate : bool
        A multi-q Dataset only: also fit each q-bin alone, from the joint solution, for
        the per-q consistency check (``result.consistency``); ``False`` skips them.
    **least_squares_options
        Passed to ``scipy.optimize.least_squares``: ``ftol``, ``xtol``, ``gtol``,
        ``max_nfev``, ``x_scale``, ``method`` ("trf" or "dogbox"), ``f_scale``,
        ``tr_solver``, ``verbose``; ``loss`` only "linear" (scipy sees the compressed
        problem, on which a robust loss would not act). Anything else raises
        ``OptionError``.

    Returns
    -------
    NLSQResult or JointResult
        ``.params``, ``.stderr``, ``.report()``, ``.plot()``, ``.to_netcdf()``. A
        multi-q Dataset (dims ``(q, phi, t1, t2)``, :mod:`heterodyne.qbins`) is fitted
        jointly (:mod:`heterodyne.joint`): the physics shared by all q-bins, contrast and
        offset per bin and angle, as a :class:`~heterodyne.joint_result.JointResult`
        (``.bins``: each bin at the joint solution; ``.consistency``: each bin alone
        against the joint parameters).

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
    options = {"x_scale": "jac", "method": "trf", **least_squares_options}
    if qbins.is_multi_q(ds):
        return _fit_joint(
            ds, params, fix=fix, multistart=multistart, seed=seed, scaling=scaling,
            errors=errors, progress=progress, options=options, separate=separate,
        )  # fmt: skip
    check_memory(ds["c2"].shape, what="fit_nlsq", **fit_needs(errors, ds.sizes["phi"]))
    problem = Objective.build(ds, params, fix=fix, scaling=scaling, multistart=multistart)
    outcomes = run_starts(problem, multistart, seed, options, progress=progress)
    return _result(problem, outcomes, options, errors=errors)


def run_starts(problem, multistart, seed: int, options, *, progress: bool) -> list:
    """:func:`solve` from each start of ``problem`` (its own ``x0`` and, per
    ``multistart``, its ``alternatives`` or a Latin-hypercube design), in threads."""
    if multistart == "auto":
        x_starts = [problem.x0] + problem.alternatives
    else:
        x_starts = [problem.x0] + list(problem.design(multistart, seed))
    if len(x_starts) == 1:
        return [solve(problem, x_starts[0], options, progress=progress)]
    workers = min(len(x_starts), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(solve, problem, x, options, progress=False) for x in x_starts]
        return [
            f.result() for f in tqdm(futures, desc="multistart", unit="start", disable=not progress)
        ]


def _fit_joint(ds, params, *, fix, multistart, seed, scaling, errors, progress, options, separate):
    """The joint fit of a multi-q Dataset (:mod:`heterodyne.joint`) as a
    :class:`~heterodyne.joint_result.JointResult`; with ``separate`` each bin is also
    fitted alone, from the joint solution, for the consistency check."""
    # the bins are fitted one at a time: memory that of the largest
    shape = (int(qbins.present(ds).sum("phi").max()), ds.sizes["t1"], ds.sizes["t2"])
    check_memory(shape, what="fit_nlsq (one q-bin at a time)", **fit_needs(errors, shape[0]))
    problem = JointObjective.build(ds, params, fix=fix, scaling=scaling, multistart=multistart)
    outcomes = run_starts(problem, multistart, seed, options, progress=progress)
    costs = np.array([o.cost if np.all(np.isfinite(o.x)) else np.inf for o in outcomes])
    best = outcomes[int(np.argmin(costs))]
    if np.all(np.isfinite(best.x)) and "sigma" not in ds.data_vars:
        # each bin weighted for the least errors of the kind asked for (reweight);
        # weights that hardly differ would move the optimum by a fraction of its errors
        weights = problem.reweight(best.x, errors)
        if np.max(np.abs(weights - 1.0)) > REWEIGHT_TOLERANCE:
            best = solve(problem, best.x, options, progress=False)
    best, exchanged = in_convention(problem, best, options)
    if errors != "nominal" and np.all(np.isfinite(best.x)):
        # correlated noise: least squares weights each bin by one number, the bins' own
        # covariances weight each direction of the physics (JointObjective.combine)
        combined = problem.combine(best.x, errors)
        if combined is not None:
            best = _bin_outcome(best, combined)
    covariance, nominal, per_bin = problem.errors_at(best.x, errors)
    success = bool(best.success) and bool(np.all(np.isfinite(best.x)))
    bins, chi2 = [], []
    for k, (objective, part) in enumerate(zip(problem.bins, problem.split(best.x), strict=True)):
        block = np.ix_(problem.columns[k], problem.columns[k])
        found = per_bin[k]
        chi2.append(float(objective.normal_equations(part)[2]))
        bins.append(
            NLSQResult.from_fit(
                objective=objective,
                x=part,
                covariance=covariance[block],
                nominal=nominal[block],
                errors=errors,
                error_scales=found.scales,
                chi2=chi2[k],
                nfev=int(best.nfev),
                success=success,
                message=f"joint fit of {len(problem.bins)} q-bins: {best.message}",
                starts=_starts_dataset(objective, [_bin_outcome(best, part)]),
                notes={"joint": 1},
            )
        )
    alone = []
    if separate:
        for one, result in zip(qbins.bins(ds), bins, strict=True):
            alone.append(
                fit_nlsq(
                    one,
                    result.parameters(),
                    multistart=0,
                    scaling=scaling,
                    errors=errors,
                    progress=False,
                    **options,
                )  # fmt: skip
            )
    return JointResult.from_fit(
        objective=problem,
        x=best.x,
        covariance=covariance,
        nominal=nominal,
        errors=errors,
        bins=bins,
        separate=alone,
        starts=_starts_dataset(problem, outcomes, costs),
        info={
            "chi2": sum(chi2),
            "nfev": int(best.nfev),
            "success": int(success),
            "message": str(best.message),
            "exchanged": exchanged,
            "combination": COMBINATION[problem.combined],
        },
    )


def _bin_outcome(best, part):
    """``best`` with its solver vector replaced by ``part`` (one bin's, or the joint
    combination's)."""
    out = copy.copy(best)
    out.x = part
    return out


def _starts_dataset(objective, outcomes, costs=None) -> xr.Dataset:
    """The multistart outcomes (``x``, ``cost``, ``nfev``, ``success`` by ``start``)."""
    if costs is None:
        costs = np.array([o.cost for o in outcomes])
    return xr.Dataset(
        {
            "x": (("start", "entry"), np.array([o.x for o in outcomes])),
            "cost": ("start", costs),
            "nfev": ("start", np.array([o.nfev for o in outcomes])),
            "success": ("start", np.array([int(o.success) for o in outcomes])),
        },
        coords={"start": np.arange(len(outcomes)), **entry_coords(objective.entries)},
    )


def solve(objective: Objective, x0, options, *, progress):
    """One ``least_squares`` run on ``objective`` from ``x0``, through the compressed problem
    of :class:`Compressed`; the outcome also carries ``jtj``, ``J^T J`` at its ``x``."""
    bar = tqdm(desc="nlsq", unit=" evals", disable=not progress, leave=False)
    compressed = Compressed(objective.normal_equations)

    def fun(x):
        f = compressed.residual(x)
        bar.update(1)
        bar.set_postfix(cost=f"{0.5 * float(f @ f):.6g}", refresh=False)
        return f

    try:
        outcome = least_squares(
            fun,
            np.clip(x0, objective.lower, objective.upper),
            jac=compressed.jacobian,
            bounds=(objective.lower, objective.upper),
            **options,
        )
    finally:
        bar.close()
    outcome.jtj = compressed.normal_matrix(outcome.x)
    return outcome


def in_convention(objective: Objective, outcome, options):
    """``(outcome, how)``: ``outcome`` with the reference the slower component
    (:func:`starts.exchange`); ``how`` is ``"exact"`` (relabelled, same cost),
    ``"refit"`` (refitted from the relabelled point), ``"failed"`` (a faster
    reference that could not be relabelled) or ``""`` (already in convention)."""
    t = objective.t
    mapped = starts.exchange(objective.physics(outcome.x), objective.params, t)
    if mapped is None:
        ref, sample = starts.transport(objective.physics(outcome.x), t)
        return outcome, "failed" if ref > sample and _labels_free(objective.params) else ""
    physics, exact = mapped
    x = objective.pack(physics, outcome.x)
    if exact:
        jtj, _, rtr = objective.normal_equations(x)
        relabelled = copy.copy(outcome)
        relabelled.x, relabelled.jtj, relabelled.cost = x, jtj, 0.5 * float(rtr)
        return relabelled, "exact"
    refit = solve(objective, x, options, progress=False)
    ref, sample = starts.transport(objective.physics(refit.x), t)
    if refit.success and ref <= sample and refit.cost <= outcome.cost * (1 + 1e-6):
        return refit, "refit"
    return outcome, "failed"


def _labels_free(params) -> bool:
    """Whether both members of the exchangeable pair of components vary."""
    return all(params[a].vary and params[b].vary for a, b in starts.PAIRS[:1])


def _result(objective: Objective, outcomes, options, *, errors="nominal") -> NLSQResult:
    """The best of ``outcomes``, in the labelling convention, as an :class:`NLSQResult`."""
    costs = np.array([o.cost if np.all(np.isfinite(o.x)) else np.inf for o in outcomes])
    best, exchanged = in_convention(objective, outcomes[int(np.argmin(costs))], options)
    # the fast path's copy of the data serves no error or result: released before the
    # errors (a later Objective.normal_equations builds it again)
    vars(objective).pop("blocks", None)
    chi2 = float(2.0 * best.cost)
    covariance, nominal, scales, _ = objective.errors_at(best.x, best.jtj, chi2, errors)
    success = bool(best.success) and bool(np.all(np.isfinite(best.x)))
    tried = _starts_dataset(objective, outcomes, costs)
    return NLSQResult.from_fit(
        objective=objective,
        x=best.x,
        covariance=covariance,
        nominal=nominal,
        errors=errors,
        error_scales=scales,
        chi2=chi2,
        nfev=int(best.nfev),
        success=success,
        message=str(best.message),
        starts=tried,
        notes={"exchanged": exchanged, "resolvable_v": starts.resolvable_velocity(objective.ds)},
    )


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
            inv = safe_inverse(scale)
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
