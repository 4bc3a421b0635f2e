"""Consensus Monte Carlo: ``fit_cmc``.

The fitted pairs are split into ``S`` shards; NUTS samples each shard's posterior, with
the prior raised to ``1/S``, so that the product of the shard posteriors is the full
posterior; the shard draws are then combined draw by draw, weighted by each shard's
posterior precision (Scott et al. 2016). Shards are independent, so they run in this
process, in local worker processes, or on a cluster (:mod:`heterodyne.executors`).

The engine: options, shards, the run and the result. The sampled space and priors are in
:mod:`heterodyne.priors`, the NUTS run of one shard and its checkpoints in
:mod:`heterodyne.sampler`, the combination of the shards in :mod:`heterodyne.consensus`.

Shards
    Shard ``s`` holds the rows (first frames ``t_i``) dealt to it in a snake order:
    frames in groups of ``S`` consecutive ones, row ``s`` of the even groups and
    ``S - 1 - s`` of the odd ones (:func:`split_rows`). Every shard thus spans the whole
    record (all ages; all lags beyond its rows; every angle) and, as row ``i`` holds
    ``N - 1 - i`` pairs, the same number of pairs to within one row. ``shards="auto"``
    takes ``S = ceil(n_pairs / PAIRS_PER_SHARD)`` (at most ``N / 2``: a shard holds two
    rows or more): shards of that size keep a gradient evaluation short and each shard's
    posterior close to Gaussian. Shards are padded to equal size with weight-0 rows, so
    NUTS compiles once for all of them.

Diagnostics
    R-hat, bulk and tail ESS per shard and quantity (one ArviZ call over ``(shard, phi)``),
    BFMI per chain, divergences per shard, judged by
    :data:`heterodyne.diagnostics.THRESHOLDS`. A failing shard is named in a warning with
    its failing figures and ``converged`` is False; it is still combined (dropping it would
    silently change both the data and the prior), so the combined posterior of an
    unconverged run must not be used as is. R-hat needs draws: with short chains, well-mixed
    chains still exceed 1.01 by chance in a share of the figures, so a run of many
    quantities on several shards can be flagged by chance; the default ``SAMPLES`` makes
    that rare (``benchmarks/cmc_defaults.py`` measures it). Where chains agree but mix too
    slowly for their length (the only failures ESS below the threshold, or an R-hat
    below 1.1), the run is repeated once with the draws the ESS asks for
    (:func:`heterodyne.diagnostics.draws_needed`, at most ``EXTEND_MAX`` (4) times
    ``samples``; the same keys give the same chains, continued), and the report says so;
    not for a run asked for no more draws per chain than the ESS threshold (a trial run,
    warned before it starts), a joint run over q-bins, or one under a ``Tracker`` (the
    dashboard), whose step count is fixed.

References
----------
Scott, Blocker, Bonassi, Chipman, George, McCulloch, "Bayes and big data: the consensus
Monte Carlo algorithm", Int. J. Management Science and Engineering Management 11 (2016).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import xarray as xr
from numpyro.distributions import constraints

from heterodyne import (
    checks,
    diagnostics,
    executors,
    priors,
    qbins,
    shapes,
    tracker,
    uncertainty,
)
from heterodyne.cmc_result import CMCResult
from heterodyne.consensus import adjustment, consensus
from heterodyne.data import validate
from heterodyne.errors import OptionError
from heterodyne.memory import FIT_MEMORY, check_memory
from heterodyne.nlsq_result import NLSQResult
from heterodyne.objective import Objective
from heterodyne.pairs import Pairs, Rows, row_block, unpack
from heterodyne.parameters import UNITS
from heterodyne.results import entries, entry_coords, params_layout, settings_dataset
from heterodyne.sampler import (
    CHAIN_METHOD,
    STATS,
    ShardJob,
    Space,
    checkpoint_name,
    fold_unconstrained,
    interval,
    physical,
    reflect,
    run_shard,
    shard_model,
)

if TYPE_CHECKING:
    from heterodyne.joint_cmc import JointCMCResult
    from heterodyne.joint_result import JointResult

PAIRS_PER_SHARD = 20_000  # shards="auto": S = ceil(n_pairs / PAIRS_PER_SHARD)
# Default run lengths per chain: with 2 chains of 2000 draws the worst R-hat over all
# quantities stays well below 1.01 on well-posed data (benchmarks/cmc_defaults.py); 500
# draws leave it above 1.01 in most runs by chance alone.
WARMUP = 500
SAMPLES = 2000
EXTEND_MAX = 4  # a run short of ESS is run once more, with at most this times the draws
LIKELIHOODS = ("rows", "pairs")  # fast whole-row blocks; the pairwise reference path


def split_rows(n_frames: int, n_shards: int) -> list[np.ndarray]:
    """The rows (first frames ``i``) of each shard, dealt in a snake order.

    Rows are taken in groups of ``S`` consecutive frames; shard ``s`` gets row ``s`` of
    the even groups and row ``S - 1 - s`` of the odd ones. Every shard then holds rows
    spread over the whole record (every age, every lag beyond its rows) and, since row
    ``i`` holds ``N - 1 - i`` pairs per angle, the same number of pairs to within one
    row.
    """
    frame = np.arange(n_frames)
    group, position = np.divmod(frame, n_shards)
    shard = np.where(group % 2 == 0, position, n_shards - 1 - position)
    return [frame[shard == s] for s in range(n_shards)]


def pad_shard(pairs: Pairs, index: np.ndarray, size: int) -> Pairs:
    """The pairs at ``index`` padded to ``size`` with weight-0 pairs, the frames to their
    size class (numpy arrays)."""
    pad = size - index.size
    fill = {"angle": 0, "i": 0, "j": 1, "c2": 0.0, "weight": 0.0}
    per_pair = {}
    for name, value in fill.items():
        source = np.asarray(getattr(pairs, name))
        per_pair[name] = np.concatenate([source[index], np.full(pad, value, source.dtype)])
    t = shapes.pad_edge(pairs.t, shapes.size_class(pairs.t.shape[0]))
    return Pairs(t=t, phi=np.asarray(pairs.phi), q=np.asarray(pairs.q), **per_pair)


@dataclass(frozen=True)
class Plan:
    """A CMC run prepared and checked, before any sampling: the problem, the sampled
    space and prior, and the shards (see :func:`prepare`)."""

    ds: xr.Dataset
    problem: Objective
    entries: pd.MultiIndex  #: ``(name, phi)`` of each sampled quantity
    space: Space
    shards: tuple[Rows | Pairs, ...]
    shard_pairs: tuple[int, ...]
    keys: np.ndarray
    chains: int
    warmup: int
    samples: int
    seed: int
    shards_rule: str
    prior_kind: str
    adapt_mass: bool
    floors: np.ndarray

    @property
    def n_free(self) -> int:
        return len(self.problem.entries)

    def jobs(self, checkpoint: Path | None = None) -> list[ShardJob]:
        """One job per shard; with ``checkpoint`` (a folder) each keeps its outcome there
        in a file named by :func:`checkpoint_name`."""
        jobs = [
            ShardJob(
                data=data,
                space=self.space,
                key=self.keys[s],
                chains=self.chains,
                warmup=self.warmup,
                samples=self.samples,
                n_scale=self.problem.n_scale,
                n_free=self.n_free,
                adapt_mass=self.adapt_mass,
                shard=s,
            )
            for s, data in enumerate(self.shards)
        ]
        if checkpoint is None:
            return jobs
        return [
            job._replace(checkpoint=str(Path(checkpoint) / checkpoint_name(job, s)))
            for s, job in enumerate(jobs)
        ]

    def covariances(self, x, errors: str):
        """``(nominal, covariance, scales)`` of the varied quantities at their values
        ``x``: the covariances of NLSQ's errors "nominal" and ``errors``
        (:meth:`heterodyne.objective.Objective.errors_at`), and the error model's scales."""
        jtj, _, chi2 = self.problem.normal_equations(x)
        found = self.problem.errors_at(x, jtj, float(chi2), errors)
        return found.nominal, found.covariance, found.scales

    def physical(self, u) -> np.ndarray:
        """Physical values of unconstrained draws ``(..., n)``."""
        space = self.space.as_jax()
        return np.asarray(physical(reflect(interval(space)(jnp.asarray(u)), space), space.log))

    def unconstrained(self, x) -> np.ndarray:
        """The unconstrained ``u`` of physical values ``x`` (n,)."""
        space = self.space.as_jax()
        y = jnp.where(space.log, jnp.log(jnp.where(space.log, jnp.asarray(x), 1.0)), x)
        return np.asarray(interval(space).inv(y))

    def log_probs(self, x, shard: int = 0) -> dict[str, float]:
        """The terms of shard ``shard``'s log density at physical values ``x`` (n,):
        ``log_det_jacobian``, ``prior`` (tempered) and ``residuals`` (the log
        likelihood)."""
        u = self.unconstrained(x)
        w = np.linalg.solve(self.space.whiten, u - self.space.u0)
        job = self.jobs()[shard]
        shard_fn = partial(shard_model, n_scale=job.n_scale, n_free=job.n_free)
        data = type(job.data)(*(jnp.asarray(a) for a in job.data))
        seeded = numpyro.handlers.substitute(shard_fn, data={"w": jnp.asarray(w)})
        trace = numpyro.handlers.trace(seeded).get_trace(data, job.space.as_jax())
        return {
            name: float(jnp.sum(site["fn"].log_prob(site["value"])))
            for name, site in trace.items()
            if site["type"] == "sample" and name != "w"
        }


def _check_options(init, shards, chains, warmup, samples, seed):
    if init is not None and not isinstance(init, NLSQResult):
        raise OptionError(
            f"init must be an NLSQResult (from hd.fit_nlsq) or None; got {type(init).__name__}"
        )
    if not (shards == "auto" or (isinstance(shards, int | np.integer) and shards >= 1)):
        raise OptionError(f"shards must be 'auto' or an integer >= 1; got {shards!r}")
    if not isinstance(chains, int | np.integer) or chains < 1:
        raise OptionError(f"chains must be an integer >= 1; got {chains!r}")
    if not isinstance(warmup, int | np.integer) or warmup < 0:
        raise OptionError(f"warmup must be an integer >= 0; got {warmup!r}")
    if not isinstance(samples, int | np.integer) or samples < 4:
        raise OptionError(
            f"samples must be an integer >= 4 (R-hat splits each chain in halves); got {samples!r}"
        )
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise OptionError(f"seed must be an integer >= 0; got {seed!r}")
    least = diagnostics.THRESHOLDS.ess_per_chain_min
    if samples < least:
        warnings.warn(
            f"samples={samples} per chain cannot give the {least:g} effective draws per "
            f"chain the diagnostics ask for: the run will be judged not converged (the "
            f"default, {SAMPLES}, passes on well-posed data)",
            stacklevel=4,
        )


def prepare(
    ds: xr.Dataset,
    init: NLSQResult | None = None,
    *,
    params=None,
    shards="auto",
    chains: int = 2,
    warmup: int = WARMUP,
    samples: int = SAMPLES,
    seed: int = 0,
    scaling: str | None = None,
    likelihood: str = "rows",
    floors: dict[str, float] | None = None,
) -> Plan:
    """Check the options, build the sampled space, priors and shards of :func:`fit_cmc`
    (arguments as there); nothing is sampled. ``floors`` replaces the log-space floors
    of :func:`heterodyne.priors.log_floors` (a joint run's, shared by its q-bins)."""
    _check_options(init, shards, chains, warmup, samples, seed)
    if likelihood not in LIKELIHOODS:
        raise OptionError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if init is not None:
        if init.params.sizes["phi"] != ds.sizes["phi"]:
            raise OptionError(
                f"init was fitted to {init.params.sizes['phi']} angles; ds has {ds.sizes['phi']}"
            )
        params = init.parameters() if params is None else params
        scaling = init.info["scaling"] if scaling is None else scaling
    check_memory(validate(ds)["c2"].shape, what="fit_cmc", **FIT_MEMORY["cmc"])
    problem = Objective.build(ds, params, fix=(), scaling=scaling or "per_angle")
    pairs = problem.pairs
    n_frames = ds.sizes["t1"]
    most = max(n_frames // 2, 1)
    if shards == "auto":
        n_shards = min(-(-pairs.n_pairs // PAIRS_PER_SHARD), most)
    elif shards > most:
        raise OptionError(
            f"shards={shards}: a shard holds whole rows of the two-time matrix, at least two "
            f"of the {n_frames} frames; use shards <= {most}"
        )
    else:
        n_shards = int(shards)
    rows = split_rows(n_frames, n_shards)
    first = np.asarray(pairs.i)
    index = [np.flatnonzero(np.isin(first, r)) for r in rows]
    noise = "sigma" not in ds.data_vars
    n_phi = ds.sizes["phi"]
    n_sampled = len(problem.entries) + (n_phi if noise else 0)
    fewest = min(ix.size for ix in index)
    if fewest <= n_sampled:
        raise OptionError(
            f"shards={n_shards} leaves {fewest} pairs in a shard for {n_sampled} sampled "
            "quantities; use fewer shards"
        )
    phi = ds["phi"].values if noise else np.empty(0)
    sampled = problem.entries.append(entries(["noise"] * phi.size, phi))
    floors = priors.log_floors(problem) if floors is None else floors
    low, high, log, fold = priors.sampled_bounds(problem, floors, n_phi if noise else 0, init)
    x0 = problem.x0
    if noise:
        residuals, angle = problem.residuals(x0), np.asarray(pairs.angle)
        counts = np.bincount(angle, minlength=n_phi)
        rms = np.sqrt(np.bincount(angle, residuals**2, minlength=n_phi) / counts)
        x0 = np.concatenate([x0, np.clip(rms, *priors.NOISE_BOUNDS)])
    # Start inside the open interval: a start at a bound (D0_ref = 0) is at u = -inf.
    y0 = np.where(log, np.log(np.where(log, np.maximum(x0, np.exp(low)), 1.0)), x0)
    margin = 1e-6 * (high - low)
    y0 = np.clip(y0, low + margin, high - margin)
    normal, loc, width = priors.prior(init, problem.entries, low, high, log)
    transform = dist.transforms.biject_to(constraints.interval(low, high))
    u0 = np.asarray(transform.inv(jnp.asarray(y0)))
    whiten = priors.whitening(problem, u0, low, high, log, x0, n_shards, noise)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n_shards)))
    if likelihood == "rows":
        # shards padded to a size class: windows of similar length share the sampler
        size = shapes.size_class(max(r.size for r in rows))
        data = tuple(row_block(pairs, r, size) for r in rows)
    else:
        size = shapes.size_class(max(ix.size for ix in index))
        data = tuple(pad_shard(pairs, ix, size) for ix in index)
    space = Space(
        template=np.asarray(problem.template),
        free=np.asarray(problem.free),
        low=low,
        high=high,
        log=log,
        fold=fold,
        normal=normal,
        loc=loc,
        scale=width,
        u0=u0,
        whiten=whiten,
        power=np.float64(1.0 / n_shards),
    )
    return Plan(
        ds=ds,
        problem=problem,
        entries=sampled,
        space=space,
        shards=data,
        shard_pairs=tuple(int(ix.size) for ix in index),
        keys=keys,
        chains=int(chains),
        warmup=int(warmup),
        samples=int(samples),
        seed=int(seed),
        shards_rule=(f"auto: ceil(n_pairs / {PAIRS_PER_SHARD})" if shards == "auto" else "given"),
        prior_kind="nlsq" if init is not None else "table",
        adapt_mass=init is None,
        floors=np.array(
            [
                floors.get(name, np.nan) if log[k] else np.nan
                for k, name in enumerate(sampled.get_level_values("name"))
            ]
        ),
    )


def fit_cmc(
    ds: xr.Dataset,
    init: NLSQResult | JointResult | None = None,
    *,
    params=None,
    shards="auto",
    chains: int = 2,
    warmup: int = WARMUP,
    samples: int = SAMPLES,
    seed: int = 0,
    executor=None,
    scaling: str | None = None,
    errors: str | None = None,
    checkpoint=None,
    likelihood: str = "rows",
    progress: bool | tracker.Tracker = True,
) -> CMCResult | JointCMCResult:
    """Sample the posterior of the heterodyne model by consensus Monte Carlo.

    Parameters
    ----------
    ds : xarray.Dataset
        Canonical two-time Dataset. With a ``sigma`` variable the likelihood uses it;
        without, a noise level per angle is sampled too. A multi-q Dataset
        (:mod:`heterodyne.qbins`) is sampled jointly: the physics shared by all q-bins,
        contrast and offset per bin and angle (:mod:`heterodyne.joint_cmc`).
    init : NLSQResult or JointResult, optional
        A least-squares fit of ``ds`` (a ``JointResult`` of a multi-q ``ds``): the chains
        start at its values and the priors are
        centred on them, ``PRIOR_WIDTH`` (10) x its stderr wide, truncated to the bounds.
        Without it the priors are uniform on the parameter table's bounds.
    params : Parameters or dict, optional
        Which parameters vary, their bounds and start values; default ``init``'s
        parameters, else the parameter table.
    shards : "auto" or int
        Number of shards ``S``; "auto" is ``ceil(n_pairs / 20000)`` (of a multi-q
        Dataset: per q-bin).
    chains, warmup, samples : int
        NUTS chains per shard, adaptation steps and draws per chain (a run whose chains
        agree but fall short of the ESS asked is run once more with up to 4 times the
        draws; module doc, "Diagnostics").
    seed : int
        Seeds every chain: the same seed gives the same draws whatever the executor.
    executor : None, "processes", "dask://HOST:PORT" or concurrent.futures.Executor
        Where the shards run (:mod:`heterodyne.executors`): in this process one after the
        other, in local worker processes (spawned), on a dask cluster, or on any executor
        such as ``distributed.Client(...).get_executor()``.
    scaling : {"per_angle", "shared"}, optional
        Contrast/offset per angle or shared; default ``init``'s, else "per_angle".
    errors : {"nominal", "speckle"}, optional
        ``"speckle"`` corrects the posterior for the correlated errors of two-time pairs
        (curvature adjustment to NLSQ's speckle covariance, module doc); ``"nominal"``
        keeps the independent-pair likelihood. Default: ``init``'s ``errors``, else
        "nominal".
    checkpoint : path, optional
        Folder where each finished shard is kept; a rerun with the same arguments reads
        those back and samples only the rest (module doc, "Checkpoints").
    likelihood : {"rows", "pairs"}
        How a shard's likelihood is evaluated: whole-row blocks (fast), or pair by pair
        (the reference path). Both give the same density to 1e-10.
    progress : bool or heterodyne.tracker.Tracker
        Show a progress bar over shards; or a ``Tracker`` of
        ``shards x chains x (warmup + samples)`` steps, which counts every chain's steps
        as they are made and whose ``cancel()`` stops the run at the chains' next report,
        raising ``heterodyne.Cancelled`` (chains run in this process or its threads; the
        dashboard's Cancel).

    Returns
    -------
    CMCResult or JointCMCResult
        ``.posterior`` (ArviZ InferenceData), ``.params``, ``.stderr``, ``.hdi()``,
        ``.diagnostics``, ``.converged``, ``.report()``, ``.to_netcdf()``. Of a multi-q
        Dataset, a :class:`~heterodyne.joint_cmc.JointCMCResult`: ``.params``,
        ``.stderr`` and ``.posterior`` along ``(q, phi)``, ``.bins`` a ``CMCResult`` per
        q-bin (its own shards and diagnostics).

    Notes
    -----
    Shard ``s`` samples ``p_s(theta) ∝ p(theta)^(1/S) L_s(theta)`` with ``L_s`` the
    Gaussian likelihood of its pairs, so ``prod_s p_s = p(theta | all pairs)``; for
    Gaussian shard posteriors the precision-weighted average of one draw from each shard
    is a draw from the full posterior (Scott et al. 2016). The sampled space, priors,
    the floor of log-space parameters at a bound 0, the sharding rule and the
    diagnostics are described in :mod:`heterodyne.priors`, :mod:`heterodyne.sampler` and
    :mod:`heterodyne.cmc`. Two-time pairs share frames, so
    real data have correlated errors that the independent-pair likelihood ignores (as
    NLSQ's nominal errors do): the posterior is then too narrow (MODEL.md, "Noise");
    ``errors="speckle"`` corrects its widths.

    Examples
    --------
    >>> ds = hd.simulate({"v0": 800.0}, n_frames=60, phi=[0, 60], noise=0.02)
    >>> nlsq = hd.fit_nlsq(ds)
    >>> result = hd.fit_cmc(ds, nlsq, shards=2)  # doctest: +SKIP
    >>> print(result.report())  # doctest: +SKIP
    """
    checks.check_fit_cmc(
        ds, init, params, shards=shards, chains=chains, warmup=warmup, samples=samples,
        seed=seed, scaling=scaling, errors=errors, checkpoint=checkpoint,
        likelihood=likelihood, progress=progress,
    )  # fmt: skip
    executors.check(executor)
    if errors is None:
        errors = init.info["errors"] if init is not None else "nominal"
    if errors not in uncertainty.ERRORS:
        raise OptionError(f"errors must be one of {uncertainty.ERRORS}; got {errors!r}")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.exists() and not checkpoint.is_dir():
            raise OptionError(f"checkpoint must be a folder; {checkpoint} is a file")
        checkpoint.mkdir(parents=True, exist_ok=True)
    if qbins.is_multi_q(ds):
        from heterodyne import joint_cmc  # it builds on this module

        return joint_cmc.fit(
            ds, init, params=params, shards=shards, chains=chains, warmup=warmup,
            samples=samples, seed=seed, executor=executor, scaling=scaling, errors=errors,
            checkpoint=checkpoint, likelihood=likelihood, progress=progress,
        )  # fmt: skip
    plan = prepare(
        ds,
        init,
        params=params,
        shards=shards,
        chains=chains,
        warmup=warmup,
        samples=samples,
        seed=seed,
        scaling=scaling,
        likelihood=likelihood,
    )
    start = time.perf_counter()
    runs, resumed = _run(plan, checkpoint, executor, progress)
    asked = plan.samples
    # Chains that agree but are too short for the ESS asked (a posterior that mixes
    # slowly, such as a weakly determined rate's): run them longer, once, rather than
    # leave the user a flag to act on. The same keys give the same chains, continued.
    more = diagnostics.draws_needed(
        shard_figures(plan, runs, shard_draws(plan, runs)), asked, EXTEND_MAX * asked
    )
    # a run asked for no more draws than the ESS asks per chain was warned that it
    # cannot pass (a trial run): it is left as asked
    least = diagnostics.THRESHOLDS.ess_per_chain_min
    if more > asked > least and not isinstance(progress, tracker.Tracker):
        plan = replace(plan, samples=more)
        runs, resumed = _run(plan, checkpoint, executor, progress)
    result = _result(plan, runs, executor_name(executor), time.perf_counter() - start, errors)
    result.info.update(
        checkpoint=str(checkpoint or ""), from_checkpoint=resumed, samples_asked=asked
    )
    return result


def _run(plan: Plan, checkpoint, executor, progress) -> tuple[list, int]:
    """Every shard's run (its checkpoint where there is one) and how many were read back
    from checkpoints."""
    jobs = plan.jobs(checkpoint)
    resumed = sum(job.checkpoint is not None and Path(job.checkpoint).exists() for job in jobs)
    runs = [None] * len(plan.shards)
    if isinstance(progress, tracker.Tracker):
        jobs = [job._replace(token=progress.token) for job in jobs]
    bar = progress is True
    for s, run in executors.run(run_shard, jobs, executor, progress=bar, desc="cmc shards"):
        runs[s] = run
    return runs, resumed


def executor_name(executor) -> str:
    if executor is None:
        return "sequential (this process)"
    if isinstance(executor, str):
        return executor
    return type(executor).__name__


def _result(plan: Plan, runs, executor_name: str, seconds: float, errors: str) -> CMCResult:
    u = shard_draws(plan, runs)
    combined = consensus(u)
    corrected, scales = adjustment(plan, combined, errors)
    return assemble(plan, runs, u, combined, corrected, scales, executor_name, seconds, errors)


def shard_draws(plan: Plan, runs) -> np.ndarray:
    """The draws of the shards' runs in the unconstrained space, ``(shard, chain, draw,
    n)``, folded where the space reflects (:func:`heterodyne.sampler.reflect`)."""
    w = np.stack([run["w"] for run in runs])
    return fold_unconstrained(plan.space.u0 + w @ plan.space.whiten.T, plan.space.fold)


def assemble(
    plan: Plan, runs, u, combined, corrected, scales, executor_name: str, seconds: float,
    errors: str,
) -> CMCResult:  # fmt: skip
    """The :class:`CMCResult` of ``plan`` from its shards' ``runs`` and unconstrained draws
    ``u``, the combined draws before (``combined``) and after (``corrected``) the
    correction for ``errors``, and the error model's ``scales``."""
    space, problem, ds = plan.space, plan.problem, plan.ds
    posterior = _draws_dataset(plan, plan.physical(corrected), ("chain", "draw"))
    extra = {}
    if errors != "nominal":
        extra["uncorrected_posterior"] = _draws_dataset(
            plan, plan.physical(combined), ("chain", "draw")
        )
    shard_posterior, sample_stats, figures = shard_figures(plan, runs, u, keep=True)
    figures["n_pairs"] = ("shard", np.array(plan.shard_pairs))
    figures["seconds"] = ("shard", np.array([r["seconds"] for r in runs]))
    for s, line in diagnostics.brief(figures).items():
        warnings.warn(
            f"CMC shard {s} of {len(runs)} failed its diagnostics: {line}. It is combined "
            "with the others; result.converged is False (result.failures() lists every figure).",
            stacklevel=3,
        )
    n_phi = ds.sizes["phi"]
    template = np.asarray(space.template)
    physics, contrast, offset = unpack(template, problem.n_scale)
    start = params_layout(physics, contrast, offset, ds["phi"].values, float(ds["q"]))
    n_free = plan.n_free
    if space.u0.size > n_free:
        start["noise"] = ("phi", plan.physical(space.u0)[n_free:], {"units": ""})
    info = {
        "shards": len(runs),
        "shards_rule": plan.shards_rule,
        "chains": plan.chains,
        "warmup": plan.warmup,
        "samples": plan.samples,
        "seed": plan.seed,
        "chain_method": CHAIN_METHOD,
        "mass_matrix": "dense, adapted" if plan.adapt_mass else "identity (whitened at the mode)",
        "devices": jax.local_device_count(),
        "executor": executor_name,
        "n_pairs": problem.pairs.n_pairs,
        "nan_pairs": int(ds.attrs.get("nan_pairs", 0)),
        "dropped_frames": int(ds.attrs.get("dropped_frames", 0)),
        "shard_size": int(plan.shards[0].c2.size),
        "likelihood": "rows" if isinstance(plan.shards[0], Rows) else "pairs",
        "n_phi": n_phi,
        "scaling": problem.scaling,
        "weighted": int("sigma" in ds.data_vars),
        "prior": plan.prior_kind,
        "prior_width": priors.PRIOR_WIDTH,
        "combination": "precision-weighted, in the unconstrained space",
        "errors": errors,
        **scales,
        "wall_seconds": seconds,
        "numpyro_version": numpyro.__version__,
        "jax_version": jax.__version__,
    }
    return CMCResult(
        posterior=diagnostics.inference_data(
            posterior=posterior,
            sample_stats=sample_stats,
            observed_data=ds,
            shard_posterior=shard_posterior,
            **extra,
        ),
        diagnostics=figures,
        prior=_prior_dataset(plan),
        start=start,
        settings=settings_dataset(problem.params),
        info=info,
    )


def shard_figures(plan: Plan, runs, u, keep: bool = False):
    """The diagnostics of the shards' ``runs`` (:func:`heterodyne.diagnostics.
    shard_diagnostics`) from their unconstrained draws ``u``; with ``keep``, the shard
    posterior and sample stats they were computed from first."""
    shard_posterior = _draws_dataset(plan, plan.physical(u), ("shard", "chain", "draw"))
    coords = {
        "shard": np.arange(len(runs)),
        "chain": np.arange(plan.chains),
        "draw": np.arange(plan.samples),
    }
    sample_stats = xr.Dataset(
        {name: (("shard", "chain", "draw"), np.stack([r[name] for r in runs])) for name in STATS},
        coords=coords,
    )
    figures = diagnostics.shard_diagnostics(shard_posterior, sample_stats)
    return (shard_posterior, sample_stats, figures) if keep else figures


def _draws_dataset(plan: Plan, x: np.ndarray, dims: tuple[str, ...]) -> xr.Dataset:
    """Draws ``(..., n)`` as one variable per parameter; per-angle quantities along
    ``phi``."""
    variables = {}
    names = plan.entries.get_level_values("name")
    for name in dict.fromkeys(names):
        columns = np.flatnonzero(names == name)
        if np.isnan(plan.entries[columns[0]][1]):
            variables[name] = (dims, x[..., columns[0]], _attrs(name))
        else:
            # per-angle entries are laid out in the order of the data's phi
            variables[name] = (dims + ("phi",), x[..., columns], _attrs(name))
    ds = plan.ds
    coords = {dim: np.arange(size) for dim, size in zip(dims, x.shape, strict=False)}
    coords["phi"] = ("phi", ds["phi"].values, {"units": "deg"})
    coords["q"] = ((), float(ds["q"]), {"units": "1/Å"})
    return xr.Dataset(variables, coords=coords)


def _attrs(name: str) -> dict:
    if name == "noise":
        return {"units": "", "long_name": "noise level (standard deviation) of c2"}
    return {"units": UNITS[name]}


def _prior_dataset(plan: Plan) -> xr.Dataset:
    space = plan.space
    # a reflected entry's bound is the midpoint of its doubled interval
    mid = 0.5 * (space.low + space.high)
    low, high = np.where(space.fold > 0, mid, space.low), np.where(space.fold < 0, mid, space.high)
    physical_bounds = {
        # exp only of log-space bounds: a linear bound such as f2's 1e4 would overflow
        "low": np.where(space.log, np.exp(np.where(space.log, low, 0.0)), low),
        "high": np.where(space.log, np.exp(np.where(space.log, high, 0.0)), high),
    }
    return xr.Dataset(
        {
            "space": (
                "entry",
                np.where(space.log, "log", np.where(space.fold != 0, "reflected", "linear")),
            ),
            "kind": ("entry", np.where(space.normal, "truncated normal", "uniform")),
            **{
                k: ("entry", v, {"long_name": f"{k} bound (physical units)"})
                for k, v in physical_bounds.items()
            },
            "loc": ("entry", space.loc, {"long_name": "prior centre, sampled space"}),
            "scale": ("entry", space.scale, {"long_name": "prior sd, sampled space"}),
            "floor": ("entry", plan.floors, {"long_name": "log-space floor of a bound 0"}),
            "power": (
                "entry",
                np.broadcast_to(space.power, space.low.shape).copy(),
                {"long_name": "power of the prior in each shard"},
            ),
        },
        coords=entry_coords(plan.entries),
        attrs={"power": float(np.min(space.power))},
    )
