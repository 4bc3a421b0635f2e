"""Consensus Monte Carlo over the q-bins of a multi-q Dataset: one joint posterior.

The physics is shared by the q-bins, contrast and offset (and the noise level, without
``sigma``) belong to each bin (:mod:`heterodyne.joint`). The joint posterior is

    p(theta, {c_k} | data) ∝ p(theta) prod_k p(c_k) prod_k L_k(theta, c_k)

and consensus Monte Carlo (:mod:`heterodyne.cmc`) already writes one bin's posterior as
a product over shards. The joint posterior is the same product over more shards: every
bin is split into its own ``S_k`` shards (:func:`heterodyne.cmc.prepare` of the bin), and
shard ``s`` of bin ``k`` samples ``(theta, c_k)`` with the density

    p(theta)^(1/S) p(c_k)^(1/S_k) L_{k,s}(theta, c_k),   S = sum_k S_k,

so that the product over all shards of all bins is the joint posterior: each physics
prior appears ``S`` times at the power ``1/S``, each bin's own prior ``S_k`` times at
``1/S_k``. The combination is the precision-weighted consensus with each shard's
precision embedded at the entries it samples (:func:`heterodyne.consensus.consensus`
with ``columns``): ``u = (sum E W E^T)^-1 sum E W u_s``, exact for Gaussian shard
posteriors, as the joint normal equations are the bins' sums (:mod:`heterodyne.joint`).
The physics thus combines every shard of every bin; a bin's contrast and offset combine
its own shards, and move with the physics through the joint precision.

Why this and not one NUTS run over all bins: every shard keeps the size and the compiled
program of a one-bin run (one program per bin shape), the shards run on any executor
with checkpoints, progress and Cancel as one-bin runs do, and the per-shard diagnostics
are those of :mod:`heterodyne.diagnostics`, unchanged.

Every bin's sampled space must map the physics alike (same bounds, same log or linear
space), or the shards would not sample the same coordinates: the physics bounds are the
tightest of the bins' (``v0``'s default upper bound, the speed the frame rate resolves,
is set by the largest ``q``), and the log-space floors those of the largest ``q`` (the
smallest: below them no bin resolves the parameter). With ``init`` a
:class:`~heterodyne.joint_result.JointResult`, each bin starts from, and its priors are
centred on, that bin at the joint solution (``init.bins[k]``: the joint values, the
joint stderr), so the physics priors agree across bins.

``errors="speckle"`` corrects the combined draws by the curvature adjustment of
:mod:`heterodyne.consensus` with the joint sandwich covariance
(:meth:`heterodyne.joint.JointObjective.errors_at`, nominal and speckle, each bin
weighted by its inverse residual variance when the data carry no ``sigma``, which is the
curvature of the likelihood with a noise level per bin).

The result, :class:`JointCMCResult`, holds each bin as a
:class:`~heterodyne.cmc_result.CMCResult` (the joint draws of the physics and of its own
quantities, its own shards and their diagnostics), and the joint posterior with
per-angle quantities along ``(q, phi)``.
"""

from __future__ import annotations

import copy
import html
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from heterodyne import cmc, executors, priors, qbins, tracker
from heterodyne.cmc_result import CMCResult
from heterodyne.consensus import adjustment, consensus
from heterodyne.joint import JointObjective, entries, layout
from heterodyne.joint_result import value_at
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, UNITS
from heterodyne.results import RESULT_TYPES, index_of, read_groups, warning_lines, write_result
from heterodyne.sampler import Space, checkpoint_name, interval, physical, reflect, run_shard

PER_BIN = (*SCALING_NAMES, "noise")  # the sampled quantities each q-bin has of its own


@dataclass(frozen=True)
class JointPlan:
    """A joint CMC run prepared: each bin's :class:`heterodyne.cmc.Plan` (its shards
    tempered for the joint product), where each bin's sampled entries sit in the joint
    vector, and the joint objective (the speckle correction's covariances)."""

    ds: xr.Dataset
    plans: tuple  #: one heterodyne.cmc.Plan per q-bin
    columns: tuple  #: for bin k, the joint entry of each of its sampled entries
    objective: JointObjective
    space: Space  #: ``low``, ``high``, ``log``, ``fold`` of the joint vector (others unused)
    n_free: int  #: varied physics and every bin's scaling; the noise levels follow

    def physical(self, u) -> np.ndarray:
        """Physical values of joint unconstrained draws ``(..., n)``."""
        space = self.space.as_jax()
        return np.asarray(physical(reflect(interval(space)(jnp.asarray(u)), space), space.log))

    def covariances(self, x, errors: str):
        """``(nominal, covariance, scales)`` of the varied joint quantities at ``x``: the
        joint sandwich (module doc); ``scales`` each bin's error-model scales, by name."""
        self.objective.reweight(x)
        covariance, nominal, per_bin = self.objective.errors_at(x, errors)
        names = per_bin[0].scales
        return nominal, covariance, {n: [found.scales[n] for found in per_bin] for n in names}


def prepare(ds, init=None, *, params=None, scaling=None, seed: int = 0, **options) -> JointPlan:
    """Build each q-bin's plan (:func:`heterodyne.cmc.prepare`, ``options`` as there)
    with the physics sampled alike in every bin and the priors tempered for the joint
    product (module doc); nothing is sampled."""
    parts = qbins.checked_bins(ds)
    if init is not None:
        inits = list(init.bins)
        scaling = init.info["scaling"] if scaling is None else scaling
        settings = [b.parameters() if params is None else copy.deepcopy(params) for b in inits]
    else:
        inits = [None] * len(parts)
        scaling = scaling or "per_angle"
        start = JointObjective.build(ds, params, scaling=scaling)
        settings = [copy.deepcopy(one.params) for one in start.bins]
    for name in PHYSICS_NAMES:
        low = max(p[name].min for p in settings)
        high = min(p[name].max for p in settings)
        for p in settings:
            p[name].min, p[name].max = low, high
    # the largest q has the smallest floors (priors.log_floors): prepare it first
    last = len(parts) - 1
    plans = {
        last: cmc.prepare(
            parts[last], inits[last], params=settings[last], scaling=scaling, **options
        )
    }
    floors = priors.log_floors(plans[last].problem)
    for k in range(last):
        plans[k] = cmc.prepare(
            parts[k], inits[k], params=settings[k], scaling=scaling, floors=floors, **options
        )
    plans = [plans[k] for k in range(len(parts))]
    counts = [len(plan.shards) for plan in plans]
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), sum(counts))))
    n_physics = plans[0].problem.n_physics
    own = [len(plan.problem.entries) - n_physics for plan in plans]
    noise = [len(plan.entries) - len(plan.problem.entries) for plan in plans]
    n_free = n_physics + sum(own)
    columns, tempered = [], []
    for k, plan in enumerate(plans):
        scale_at = n_physics + sum(own[:k]) + np.arange(own[k])
        noise_at = n_free + sum(noise[:k]) + np.arange(noise[k])
        columns.append(np.concatenate([np.arange(n_physics), scale_at, noise_at]))
        shared = np.isin(plan.entries.get_level_values("name"), PHYSICS_NAMES)
        power = np.where(shared, 1.0 / sum(counts), 1.0 / counts[k])
        first = sum(counts[:k])
        tempered.append(
            replace(
                plan,
                space=plan.space._replace(power=power),
                keys=keys[first : first + counts[k]],
                seed=int(seed),
            )
        )
    size = n_free + sum(noise)
    low, high, log = np.empty(size), np.empty(size), np.zeros(size, dtype=bool)
    fold = np.zeros(size)
    for plan, column in zip(plans, columns, strict=True):
        low[column], high[column], log[column] = plan.space.low, plan.space.high, plan.space.log
        fold[column] = plan.space.fold
    names, qs, phis, lower, upper, x0 = [], [], [], [], [], []
    for k, plan in enumerate(plans):
        problem, q = plan.problem, float(parts[k]["q"])
        part = slice(0, None) if k == 0 else slice(n_physics, None)
        for name, phi in list(problem.entries)[part]:
            names.append(name)
            qs.append(np.nan if name in PHYSICS_NAMES else q)
            phis.append(phi)
        lower.append(problem.lower[part])
        upper.append(problem.upper[part])
        x0.append(problem.x0[part])
    bins = [plan.problem for plan in plans]
    objective = JointObjective(
        ds,
        bins,
        [c[: n_physics + own[k]] for k, c in enumerate(columns)],
        entries(names, qs, phis),
        np.concatenate(lower),
        np.concatenate(upper),
        np.concatenate(x0),
        scaling,
    )
    space = Space(*(np.zeros(0),) * 2, low, high, log, fold, *(np.zeros(0),) * 6)
    return JointPlan(ds, tuple(tempered), tuple(columns), objective, space, n_free)


def fit(
    ds, init=None, *, params=None, shards="auto", chains=2, warmup=cmc.WARMUP,
    samples=cmc.SAMPLES, seed=0, executor=None, scaling=None, errors="nominal",
    checkpoint=None, likelihood="rows", progress=True,
) -> JointCMCResult:  # fmt: skip
    """:func:`heterodyne.fit_cmc` of a multi-q Dataset (arguments as there; ``init`` a
    :class:`~heterodyne.joint_result.JointResult`, ``shards`` per q-bin): every shard of
    every bin in one executor run, combined into the joint posterior (module doc)."""
    plan = prepare(
        ds, init, params=params, scaling=scaling, seed=seed, shards=shards, chains=chains,
        warmup=warmup, samples=samples, likelihood=likelihood,
    )  # fmt: skip
    jobs, owner = [], []
    for k, part in enumerate(plan.plans):
        for job in part.jobs():
            g = len(jobs)
            job = job._replace(shard=g)
            if checkpoint is not None:
                job = job._replace(checkpoint=str(checkpoint / checkpoint_name(job, g)))
            if isinstance(progress, tracker.Tracker):
                job = job._replace(token=progress.token)
            jobs.append(job)
            owner.append(k)
    resumed = sum(job.checkpoint is not None and Path(job.checkpoint).exists() for job in jobs)
    start = time.perf_counter()
    runs = [None] * len(jobs)
    for g, run in executors.run(
        run_shard, jobs, executor, progress=progress is True, desc="joint cmc shards"
    ):
        runs[g] = run
    seconds = time.perf_counter() - start
    owner = np.array(owner)
    per_bin = [[runs[g] for g in np.flatnonzero(owner == k)] for k in range(len(plan.plans))]
    u = [cmc.shard_draws(part, r) for part, r in zip(plan.plans, per_bin, strict=True)]
    size = plan.space.low.size
    draws = [shard for bin_u in u for shard in bin_u]
    columns = [plan.columns[k] for k in owner]
    combined = consensus(draws, columns, size)
    corrected, scales = adjustment(plan, combined, errors)
    bins = []
    for k, part in enumerate(plan.plans):
        column = plan.columns[k]
        result = cmc.assemble(
            part, per_bin[k], u[k], combined[..., column], corrected[..., column],
            {name: values[k] for name, values in scales.items()},
            cmc.executor_name(executor), seconds, errors,
        )  # fmt: skip
        result.info.update(q_bin=k, joint_shards=len(jobs), checkpoint=str(checkpoint or ""))
        bins.append(result)
    return JointCMCResult(
        bins=tuple(bins),
        info={
            "n_bins": len(bins),
            "shards": len(jobs),
            "n_pairs": int(sum(b.info["n_pairs"] for b in bins)),
            "errors": errors,
            "scaling": plan.objective.scaling,
            "wall_seconds": seconds,
            "from_checkpoint": resumed,
        },
    )


@dataclass(frozen=True, repr=False)
class JointCMCResult:
    """The outcome of :func:`heterodyne.fit_cmc` on a multi-q Dataset.

    Attributes
    ----------
    bins : tuple of CMCResult
        Each q-bin, in order of ``q``: the joint draws of the physics and of the bin's own
        contrast, offset (and noise), its own shards with their draws and diagnostics,
        its priors; ``report()``, ``plot()``, ``hdi()`` as for one bin.
    info : dict
        ``n_bins``, ``shards`` (all bins), ``n_pairs``, ``errors``, ``scaling``,
        ``wall_seconds``, ``from_checkpoint``.
    """

    bins: tuple
    info: dict = field(default_factory=dict)

    @property
    def q(self) -> np.ndarray:
        """The bins' wavevectors [1/Å]."""
        return np.array([float(b.start["q"]) for b in self.bins])

    @property
    def phi(self) -> np.ndarray:
        """The union of the bins' angles [deg]."""
        return np.unique(np.concatenate([b.start["phi"].values for b in self.bins]))

    @property
    def data(self) -> xr.Dataset:
        """The fitted multi-q Dataset."""
        return qbins.combine([b.data for b in self.bins])

    @property
    def posterior(self) -> xr.Dataset:
        """The joint draws ``(chain, draw)``: a variable per varied physics parameter;
        ``contrast``, ``offset`` (and ``noise``) along ``(q, phi)``, NaN where a bin lacks
        the angle."""
        first = self.bins[0].posterior.posterior
        variables = {
            name: (("chain", "draw"), first[name].values, first[name].attrs)
            for name in first.data_vars
            if name not in PER_BIN
        }
        for name in PER_BIN:
            if name in first:
                grid = self._grid([b.posterior.posterior[name] for b in self.bins])
                variables[name] = (("chain", "draw", "q", "phi"), grid, first[name].attrs)
        coords = {
            "chain": first["chain"].values,
            "draw": first["draw"].values,
            "q": ("q", self.q, {"units": "1/Å"}),
            "phi": ("phi", self.phi, {"units": "deg"}),
        }
        return xr.Dataset(variables, coords=coords)

    def _grid(self, per_bin) -> np.ndarray:
        """Per-bin arrays ``(..., phi_k)`` (or ``(...)``, shared by the bin's angles) on
        the joint ``(..., q, phi)`` grid."""
        phi = self.phi
        shape = per_bin[0].shape[: per_bin[0].ndim - ("phi" in per_bin[0].dims)]
        grid = np.full((*shape, self.q.size, phi.size), np.nan)
        for k, (values, result) in enumerate(zip(per_bin, self.bins, strict=True)):
            own = result.start["phi"].values
            at = np.searchsorted(phi, own)
            v = values.values if "phi" in values.dims else values.values[..., None]
            grid[..., k, at] = np.broadcast_to(v, (*shape, own.size))
        return grid

    def _layout(self, kind: str) -> xr.Dataset:
        per_bin = [getattr(b, kind) for b in self.bins]
        physics = np.array([float(per_bin[0][n]) for n in PHYSICS_NAMES])
        contrast, offset = (self._grid([p[n] for p in per_bin]) for n in SCALING_NAMES)
        out = layout(physics, contrast, offset, self.q, self.phi)
        if "noise" in per_bin[0]:
            out["noise"] = (("q", "phi"), self._grid([p["noise"] for p in per_bin]), {"units": ""})
        return out

    @property
    def params(self) -> xr.Dataset:
        """Posterior means (fixed parameters at their values) in the joint layout of
        :class:`~heterodyne.joint_result.JointResult`."""
        return self._layout("params")

    @property
    def stderr(self) -> xr.Dataset:
        """Posterior standard deviations (NaN for fixed parameters), joint layout."""
        return self._layout("stderr")

    def value(self, name: str, q: float | None = None, phi: float | None = None) -> float:
        """Posterior mean of a physics parameter, or of ``contrast``/``offset`` at ``q``
        and ``phi``."""
        return value_at(self.params, name, q, phi)

    def error(self, name: str, q: float | None = None, phi: float | None = None) -> float:
        """Posterior standard deviation, as :meth:`value`."""
        return value_at(self.stderr, name, q, phi)

    @property
    def converged(self) -> bool:
        """True when every shard of every bin passes every diagnostic threshold."""
        return all(b.converged for b in self.bins)

    def failures(self) -> dict[tuple[float, int], list[str]]:
        """The failed diagnostic figures by ``(q, shard of that bin)`` (empty when
        converged)."""
        return {
            (float(q), s): lines
            for q, b in zip(self.q, self.bins, strict=True)
            for s, lines in b.failures().items()
        }

    def _physics_rows(self):
        """``(name, mean, sd, hdi lower, hdi higher, worst R-hat over all shards, unit)``
        of each varied physics parameter."""
        draws = self.bins[0].posterior.posterior
        hdi = self.bins[0].hdi()
        worst = {}
        for b in self.bins:
            index = index_of(b.diagnostics)
            for (name, _), rhat in zip(
                index, b.diagnostics["rhat"].max("shard").values, strict=True
            ):
                worst[name] = max(worst.get(name, 0.0), float(rhat))
        for name in PHYSICS_NAMES:
            if name in draws:
                yield (
                    name, self.value(name), self.error(name),
                    float(hdi[name].sel(hdi="lower")), float(hdi[name].sel(hdi="higher")),
                    worst[name], UNITS[name],
                )  # fmt: skip

    def _verdict(self) -> str:
        if self.converged:
            return f"converged: all {self.info['shards']} shards of {len(self.bins)} q-bins pass"
        failed = "; ".join(f"q = {q:.4g}: shard {s}" for (q, s) in self.failures())
        return f"NOT converged ({failed}); each bin's report lists the figures"

    def report(self) -> str:
        """Text report: the run, the shared physics (mean, sd, 94 % HDI, worst R-hat),
        each bin's contrast and offset, the verdict and each bin's warnings."""
        info, b0 = self.info, self.bins[0].info
        lines = [
            "[[Joint CMC fit]]",
            "    method            consensus Monte Carlo over the shards of all q-bins "
            "(physics shared, contrast/offset per bin)",
            f"    q-bins            {len(self.bins)}: q = "
            f"{', '.join(f'{v:.4g}' for v in self.q)} 1/Å",
            f"    shards            {info['shards']} ("
            f"{', '.join(str(b.info['shards']) for b in self.bins)} per bin); "
            f"{info['n_pairs']} pairs",
            f"    chains            {b0['chains']} per shard, {b0['warmup']} warmup + "
            f"{b0['samples']} draws",
            f"    errors            {info['errors']}",
            f"    priors            {self.bins[0].tempering()}",
            f"    wall time         {info['wall_seconds']:.1f} s",
            f"    verdict           {self._verdict()}",
            "[[Physics]] (shared by all q-bins; mean, sd, 94 % HDI, worst R-hat of all shards)",
        ]
        for name, mean, sd, lo, hi, rhat, unit in self._physics_rows():
            lines.append(
                f"    {name:<16}{mean:>13.6g}{sd:>11.4g}{lo:>13.6g}{hi:>13.6g}{rhat:>8.4f}  {unit}"
            )
        lines.append("[[Per q-bin]] (contrast, offset: mean ± sd per angle)")
        params, stderr = self.params, self.stderr
        for q in self.q:
            for phi in self.phi:
                c = float(params["contrast"].sel(q=q, phi=phi))
                if np.isnan(c):
                    continue
                o = float(params["offset"].sel(q=q, phi=phi))
                dc = float(stderr["contrast"].sel(q=q, phi=phi))
                do = float(stderr["offset"].sel(q=q, phi=phi))
                lines.append(
                    f"    q {q:<9.4g} phi {phi:>7.4g}   contrast {c:.6g} ± {dc:.3g}   "
                    f"offset {o:.6g} ± {do:.3g}"
                )
        per_bin = [b.warnings() for b in self.bins]
        common = [w for w in per_bin[0] if all(w in other for other in per_bin[1:])]
        warns = common + [
            f"q = {q:.4g}: {w}"
            for q, own in zip(self.q, per_bin, strict=True)
            for w in own
            if w not in common
        ]
        lines += warning_lines(warns)
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"<JointCMCResult bins={len(self.bins)} converged={self.converged} "
            f"shards={self.info['shards']}>"
        )

    def _repr_html_(self):
        return f"<pre>{html.escape(self.report())}</pre>"

    def plot(self):
        """Each bin's posterior view (:func:`heterodyne.plot.posterior`: the joint physics
        draws over that bin's shards), one after the other."""
        views = [b.plot() for b in self.bins]
        out = views[0]
        for view in views[1:]:
            out = out + view
        return out

    def to_netcdf(self, path, *, overwrite: bool = False):
        """Write the whole result (bin ``k``'s :class:`CMCResult` in group ``bin_<k>``) to
        one netCDF-4 file; ``hd.open_result`` reads it back."""
        groups = {}
        for k, result in enumerate(self.bins):
            groups[f"bin_{k}"] = xr.Dataset(attrs=result.info)
            for name, part in result.groups().items():
                groups[f"bin_{k}/{name}"] = part
        return write_result("JointCMCResult", self.info, groups, path, overwrite=overwrite)

    @classmethod
    def _from_tree(cls, tree):
        _, info = read_groups(tree)
        bins = tuple(CMCResult._from_tree(tree[f"bin_{k}"]) for k in range(int(info["n_bins"])))
        return cls(bins=bins, info=info)


RESULT_TYPES["JointCMCResult"] = JointCMCResult
