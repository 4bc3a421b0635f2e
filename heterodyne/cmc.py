"""Consensus Monte Carlo: ``fit_cmc``.

The fitted pairs are split into ``S`` shards; NUTS samples each shard's posterior, with
the prior raised to ``1/S``, so that the product of the shard posteriors is the full
posterior; the shard draws are then combined draw by draw, weighted by each shard's
posterior precision (Scott et al. 2016). Shards are independent, so they run in this
process, in local worker processes, or on a cluster (:mod:`heterodyne.executors`).

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
    log-space parameter whose bounds allow negative values is sampled linearly. NUTS
    then moves in the unconstrained ``u = logit((y - low) / (high - low))``, whitened by
    the Gauss-Newton curvature at the start (``u = u0 + A w``, ``A A^T`` the inverse
    curvature of one shard): numpyro regularises its mass matrix towards a unit scale,
    which would swamp posteriors as narrow as these (sd ~1e-3 in ``u``) and cut the
    step size tenfold.

Priors
    Densities in the sampled space ``y``: uniform on ``[low, high]`` (uniform or
    log-uniform on the parameter table's bounds), or, when ``init`` is an
    ``NLSQResult``, a normal centred on its value with a standard deviation of
    ``PRIOR_WIDTH`` (10) times its stderr (``10 stderr / value`` in log space), truncated
    to ``[low, high]``; quantities without a finite stderr keep the uniform prior. Such
    a prior keeps the sampler near the NLSQ solution (a wrong local minimum included)
    while shrinking the posterior width by only ``1 - 1/sqrt(1 + 1/100)``, 0.5 %. The
    noise level (no ``sigma``) is log-uniform on ``NOISE_BOUNDS``.

Likelihood
    The Gaussian of the residuals NLSQ minimises (:func:`heterodyne.objective.residuals`
    on the shard's pairs): ``r ~ Normal(0, 1)`` with ``sigma`` from the Dataset
    (``r = (model - c2) / sigma``), or ``r ~ Normal(0, noise[angle])`` with
    ``r = model - c2`` otherwise. ``-2 log L`` differs from NLSQ's ``chi2`` by a constant.
    A shard holds whole rows of the two-time matrices (``likelihood="rows"``, the
    default): the model is evaluated on the ``R x N`` block of its rows by
    :func:`heterodyne.model.c2_rows` (exponentials shared by the angles, the flow phase
    as a rank-2 product, dense array operations whose gradients are matrix products),
    the pairs outside the upper triangle weighted 0. ``likelihood="pairs"`` evaluates
    the same pairs one by one (:func:`heterodyne.model.c2_pairs`, gathers and scatters
    per pair): the reference the tests hold the fast path against (to 1e-10), about
    four times slower per gradient. No shard forms an ``N x N`` array: a block has
    ``R = N / S`` rows.

Shards
    Shard ``s`` holds the rows (first frames ``t_i``) dealt to it in a snake order:
    frames in groups of ``S`` consecutive ones, row ``s`` of the even groups and
    ``S - 1 - s`` of the odd ones (:func:`split_rows`). Every shard thus spans the whole
    record (all ages; all lags beyond its rows; every angle) and, as row ``i`` holds
    ``N - 1 - i`` pairs, the same number of pairs to within one row. ``shards="auto"``
    takes ``S = ceil(n_pairs / PAIRS_PER_SHARD)`` (at most ``N / 2``: a shard holds two
    rows or more): shards of about 20 000 pairs keep a gradient evaluation well under a
    millisecond and each shard's posterior close to Gaussian. Shards are padded to equal
    size with weight-0 rows, so NUTS compiles once for all of them.

Checkpoints
    With ``checkpoint=DIR`` each shard's draws and statistics are written to ``DIR`` (an
    ``.npz`` file named by a hash of the shard's data, sampled space, PRNG key and run
    lengths) by the process that sampled it, as soon as it ends. A run stopped by an
    interrupt or a crashed worker keeps the finished shards; rerun with the same
    arguments, it reads them back and samples only the others. Each shard's draws
    depend on nothing else, so the combined result is the one an uninterrupted run
    gives. On a cluster ``DIR`` must be a folder every worker can write.

Sampler
    NUTS (numpyro's functional ``hmc`` kernel, target acceptance 0.8), ``warmup``
    adaptation steps and ``samples`` draws per chain, chains run one after the other
    (chain method "sequential"; the package never sets ``jax_num_cpu_devices``). With
    an NLSQ ``init`` the whitening is the posterior's curvature at its mode, so the mass
    matrix stays the identity in ``w`` and warmup adapts the step size only: at N = 200,
    4 angles, a dense mass matrix estimated in a 150-step warmup tripled the leapfrog
    steps per draw (37 against 7) and cut the ESS per second fourfold, while the identity
    needed 7 steps whatever the warmup. Without ``init`` the start can be far from the
    posterior and a dense mass matrix is adapted. Chains start uniformly within ±1
    (whitened) posterior standard deviation of the start values: ``init``'s values,
    else ``params``'.
    Shard ``s`` draws with key ``split(key(seed), S)[s]``, chain ``c`` with
    ``split(that, chains)[c]``: the same seed gives bit-identical draws on any executor.

Combination
    In the unconstrained space ``u``, where posteriors are closest to Gaussian and any
    combined draw maps back inside the bounds: ``u^(c,d) = (sum_s W_s)^-1 sum_s W_s
    u_s^(c,d)``, ``W_s`` the inverse covariance of shard ``s``'s draws. With one shard
    the draws are that shard's, unchanged.

Diagnostics
    R-hat, bulk and tail ESS per shard and parameter, BFMI per chain, divergences per
    shard, judged by :data:`heterodyne.diagnostics.THRESHOLDS`. A failing shard is named
    in a warning with its failing figures and ``converged`` is False; it is still
    combined (dropping it would silently change both the data and the prior), so the
    combined posterior of an unconverged run must not be used as is. R-hat needs draws:
    with 2 chains of 500, a well-mixed chain whose tail ESS is half its draws still
    exceeds 1.01 in about 3 % of the figures, so a run of ten parameters on four shards
    is often flagged by chance; ``samples=1000`` (or more chains) makes that rare.

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
    keep their shape and centre, and their covariance becomes ``Sigma_s``. Noise levels
    are left as they are. It reduces to no change for independent noise. The draws
    before the correction are kept (``uncorrected_posterior``).

References
----------
Ribatet, Cooley, Davison, "Bayesian inference from composite likelihoods, with an
application to spatial extremes", Statistica Sinica 22 (2012).
Scott, Blocker, Bonassi, Chipman, George, McCulloch, "Bayes and big data: the consensus
Monte Carlo algorithm", Int. J. Management Science and Engineering Management 11 (2016).
Hoffman, Gelman, "The No-U-Turn sampler", JMLR 15 (2014).
"""

from __future__ import annotations

import time
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import xarray as xr
from jax.experimental import io_callback
from numpyro.distributions import constraints
from numpyro.infer.hmc import hmc
from numpyro.infer.util import potential_energy

from heterodyne import (
    checks,
    diagnostics,
    executors,
    identity,
    model,
    objective,
    tracker,
    uncertainty,
)
from heterodyne.data import validate
from heterodyne.errors import Cancelled, FileFormatError, OptionError, ParameterError
from heterodyne.files import atomic_write
from heterodyne.memory import FIT_MEMORY, check_memory
from heterodyne.objective import Objective
from heterodyne.parameters import (
    LOG_SCALE,
    PHYSICS_INDEX,
    UNITS,
    make_label,
    parse_label,
)
from heterodyne.results import CMCResult, NLSQResult, params_layout, settings_dataset

PAIRS_PER_SHARD = 20_000  # shards="auto": S = ceil(n_pairs / PAIRS_PER_SHARD)
# Default run lengths per chain: with 2 chains of 2000 draws the worst R-hat over all
# quantities stays well below 1.01 on well-posed data (benchmarks/cmc_defaults.py); 500
# draws leave it above 1.01 in most runs by chance alone.
WARMUP = 500
SAMPLES = 2000
PRIOR_WIDTH = 10.0  # NLSQ-centred priors: standard deviation = PRIOR_WIDTH x NLSQ stderr
FLOOR_EFFECT = 1e-4  # a log-space parameter's floor: q² ∫J (or q ∫v) over the record
NOISE_BOUNDS = (1e-6, 1.0)  # log-uniform prior of the per-angle noise level of c2
LIKELIHOODS = ("rows", "pairs")  # fast whole-row blocks; the pairwise reference path
CHAIN_METHOD = "sequential"
# Whitening: curvature added to every unconstrained direction. A quantity the data do not
# constrain has the logistic density of a uniform prior seen through the logit, whose
# curvature is at most 1/2; this keeps such directions at unit scale.
_RIDGE = 0.25
_STATS = ("energy", "diverging", "n_steps", "acceptance_rate", "step_size", "lp")


class Space(NamedTuple):
    """The map from the sampler's vector ``w`` to the physical parameters, and the prior.

    A pytree of arrays over the sampled entries (the varied quantities of NLSQ's order,
    then the per-angle noise levels when the Dataset has no ``sigma``).
    """

    template: jax.Array  #: packed vector z with the fixed and start values, (14 + 2 n_scale,)
    free: jax.Array  #: index in z of each varied quantity, (n_free,)
    low: jax.Array  #: lower bound of y, (n,)
    high: jax.Array  #: upper bound of y, (n,)
    log: jax.Array  #: y = log x (else y = x), (n,)
    normal: jax.Array  #: truncated-normal prior (else uniform), (n,)
    loc: jax.Array  #: prior centre in y, (n,)
    scale: jax.Array  #: prior standard deviation in y, (n,)
    u0: jax.Array  #: start in the unconstrained space, (n,)
    whiten: jax.Array  #: u = u0 + whiten @ w, (n, n)
    power: jax.Array  #: the prior is raised to this power, 1 / S, ()

    def as_jax(self) -> Space:
        """The same space with every field a JAX array (what the compiled chain takes)."""
        return Space(*(jnp.asarray(a) for a in self))


class ShardJob(NamedTuple):
    """Everything one shard's NUTS run needs, as numpy arrays and builtins (picklable)."""

    data: objective.Rows | objective.Pairs
    space: Space
    key: np.ndarray  #: raw key data of the shard's PRNG key
    chains: int
    warmup: int
    samples: int
    n_scale: int
    n_free: int
    adapt_mass: bool = True  #: adapt a dense mass matrix during warmup
    checkpoint: str | None = None  #: file where the finished shard is kept
    shard: int = 0  #: index of the shard in the run
    token: int = 0  #: the run's :class:`heterodyne.tracker.Tracker` (0: none)


def interval(space: Space):
    """The transform ``u -> y = low + (high - low) sigmoid(u)`` (numpyro's bijection onto
    the interval, the one NUTS would use)."""
    return dist.transforms.biject_to(constraints.interval(space.low, space.high))


def physical(y, log):
    """The physical value of a sampled-space ``y``: ``exp(y)`` where ``log``, else ``y``."""
    # exp is taken of 0 where the entry is linear: exp(1e5) would overflow and its
    # infinite gradient, multiplied by the unselected branch's 0, would give NaN.
    return jnp.where(log, jnp.exp(jnp.where(log, y, 0.0)), y)


def shard_model(data, space: Space, *, n_scale: int, n_free: int):
    """NumPyro model of one shard: tempered prior times the Gaussian of the residuals.

    ``log p(w) = log|dy/du| + power * log prior(y) + sum_k log N(r_k | 0, s_k)``

    with ``u = u0 + A w``, ``r`` the residuals of :func:`heterodyne.objective.residuals`
    on the shard's pairs (``data``: :class:`~heterodyne.objective.Rows`, or the
    reference pairwise path's :class:`~heterodyne.objective.Pairs`) and ``s_k = 1``
    (``sigma`` in the data) or the noise level of the pair's angle; weight-0 entries
    (padding, ``t_j <= t_i``, masked pairs) are left out. The prior is tempered by a
    factor, not by ``numpyro.handlers.scale`` on the sample sites: that would also
    temper the Jacobian of the support transform, which is not part of the prior.
    """
    n = space.u0.shape[0]
    w = numpyro.sample("w", dist.ImproperUniform(constraints.real_vector, (), (n,)))
    u = space.u0 + space.whiten @ w
    transform = interval(space)
    y = transform(u)
    numpyro.factor("log_det_jacobian", jnp.sum(transform.log_abs_det_jacobian(u, y)))
    uniform = -jnp.log(space.high - space.low)
    normal = dist.TruncatedNormal(space.loc, space.scale, low=space.low, high=space.high)
    numpyro.factor(
        "prior", space.power * jnp.sum(jnp.where(space.normal, normal.log_prob(y), uniform))
    )
    x = physical(y, space.log)
    z = space.template.at[space.free].set(x[:n_free])
    r = objective.residuals(z, data, n_scale)
    noise = x[n_free:]
    if not noise.shape[0]:
        scale = 1.0
    elif isinstance(data, objective.Rows):
        scale = noise[:, None, None]
    else:
        scale = noise[data.angle]
    log_density = -0.5 * (r / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2.0 * jnp.pi)
    numpyro.factor("residuals", jnp.sum(jnp.where(data.weight > 0, log_density, 0.0)))


def potential(data, space: Space, *, n_scale: int, n_free: int):
    """The potential energy (negative log density) of one shard as NUTS sees it: a
    function of ``{"w": w}``, the whitened coordinates of :class:`Space`."""
    shard = partial(shard_model, n_scale=n_scale, n_free=n_free)
    return lambda params: potential_energy(shard, (data, space), {}, params)


@partial(jax.jit, static_argnames=("warmup", "samples", "n_scale", "n_free", "adapt_mass"))
def nuts_chain(key, data, space, where, *, warmup, samples, n_scale, n_free, adapt_mass):
    """One NUTS chain, warmup and draws, as one compiled program.

    Data and settings are arguments, not constants: every shard (same padded size) and
    every chain reuse the code compiled for the first. ``where`` is ``(token, shard,
    chain)``: every ``tracker.REPORT_EVERY`` steps the chain reports its steps to the
    run's tracker (:func:`heterodyne.tracker.step`); once asked to stop it skips the rest.
    """
    init_kernel, sample_kernel = hmc(
        potential_fn_gen=partial(potential, n_scale=n_scale, n_free=n_free), algo="NUTS"
    )
    key_start, key_nuts = jax.random.split(key)
    w0 = jax.random.uniform(key_start, space.u0.shape, minval=-1.0, maxval=1.0)
    args = (data, space)
    state = init_kernel(
        {"w": w0},
        warmup,
        dense_mass=True,
        adapt_mass_matrix=adapt_mass,
        model_args=args,
        rng_key=key_nuts,
    )

    def step(carry, i):
        state, stop = carry
        # once stopped, the remaining steps are skipped without calling the host
        report = ((i % tracker.REPORT_EVERY == 0) | (i == warmup + samples - 1)) & ~stop
        stop = stop | jax.lax.cond(
            report,
            lambda: io_callback(tracker.step, jax.ShapeDtypeStruct((), jnp.bool_), *where, i + 1),
            lambda: jnp.bool_(False),
        )
        state = jax.lax.cond(stop, lambda s: s, lambda s: sample_kernel(s, model_args=args), state)
        return (state, stop), {
            "w": state.z["w"],
            "energy": state.energy,
            "diverging": state.diverging,
            "n_steps": state.num_steps,
            "acceptance_rate": state.accept_prob,
            "step_size": state.adapt_state.step_size,
            "lp": -state.potential_energy,
        }

    # One scan over warmup and draws (the kernel adapts while state.i < warmup): one copy
    # of the NUTS step to compile instead of two. The warmup part of the trace is dropped.
    steps = jnp.arange(warmup + samples)
    trace = jax.lax.scan(step, (state, jnp.bool_(False)), steps)[1]
    return jax.tree.map(lambda a: a[warmup:], trace)


def run_shard(job: ShardJob) -> dict[str, np.ndarray]:
    """Run the chains of one shard; numpy arrays ``(chain, draw, ...)`` by name, and the
    wall time in ``seconds``. A module-level function of picklable input: it runs the
    same in this process, a spawned worker or a dask worker.

    With ``job.checkpoint`` the outcome is written there as soon as it exists (in the
    process that ran it), and read back instead of sampling when the file is there.
    """
    if job.checkpoint is not None and Path(job.checkpoint).exists():
        return _load_shard(Path(job.checkpoint))
    start = time.perf_counter()
    data = type(job.data)(*(jnp.asarray(a) for a in job.data))
    space = Space(*(jnp.asarray(a) for a in job.space))
    keys = jax.random.split(jax.random.wrap_key_data(jnp.asarray(job.key)), job.chains)
    chains = [
        _unless_cancelled(
            job,
            lambda key=key, c=c: nuts_chain(
                key,
                data,
                space,
                (job.token, job.shard, c),
                warmup=job.warmup,
                samples=job.samples,
                n_scale=job.n_scale,
                n_free=job.n_free,
                adapt_mass=job.adapt_mass,
            ),
        )
        for c, key in enumerate(keys)
    ]
    out = {name: np.stack([c[name] for c in chains]) for name in chains[0]}
    out["seconds"] = np.float64(time.perf_counter() - start)
    if job.checkpoint is not None:
        atomic_write(lambda tmp: _save(tmp, out), Path(job.checkpoint), overwrite=True)
    return out


def _unless_cancelled(job: ShardJob, chain):
    """``chain()`` as numpy arrays; ``Cancelled`` when the run's tracker asked to stop,
    before it starts or while it ran (its draws are then incomplete)."""
    if not tracker.cancelled(job.token):
        out = jax.device_get(chain())
        if not tracker.cancelled(job.token):
            return out
    raise Cancelled("the CMC run was cancelled")


def _load_shard(path: Path) -> dict[str, np.ndarray]:
    """A shard's outcome from its checkpoint file; ``FileFormatError`` when the file is
    damaged (atomic writes never leave one half written: something else changed it)."""
    try:
        with np.load(path) as stored:
            out = {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise FileFormatError(
            f"{path}: a damaged CMC checkpoint ({err}); delete it to sample that shard again"
        ) from err
    missing = sorted({"w", "seconds", *_STATS} - set(out))
    if missing:
        raise FileFormatError(
            f"{path}: a CMC checkpoint without {', '.join(missing)}; delete it to sample "
            "that shard again"
        )
    return out


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def checkpoint_name(job: ShardJob, shard: int) -> str:
    """A file name unique to the shard's data, sampled space, key, run lengths and the
    package version (:func:`heterodyne.identity.digest`)."""
    settings = (type(job.data).__name__, job.chains, job.warmup, job.samples, job.adapt_mass)
    digest = identity.digest(tuple(job.data), tuple(job.space), job.key, settings)
    return f"shard{shard:04d}_{digest[:16]}.npz"


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


def pad_shard(pairs: objective.Pairs, index: np.ndarray, size: int) -> objective.Pairs:
    """The pairs at ``index`` padded to ``size`` with weight-0 pairs (numpy arrays)."""
    pad = size - index.size
    fill = {"angle": 0, "i": 0, "j": 1, "c2": 0.0, "weight": 0.0}
    per_pair = {}
    for name, value in fill.items():
        source = np.asarray(getattr(pairs, name))
        per_pair[name] = np.concatenate([source[index], np.full(pad, value, source.dtype)])
    return objective.Pairs(
        t=np.asarray(pairs.t), phi=np.asarray(pairs.phi), q=np.asarray(pairs.q), **per_pair
    )


def consensus(draws: np.ndarray) -> np.ndarray:
    """Precision-weighted consensus of shard draws ``(S, chain, draw, n)`` -> ``(chain,
    draw, n)``: ``(sum_s W_s)^-1 sum_s W_s u_s`` draw by draw, ``W_s`` the inverse
    covariance of shard ``s``'s draws."""
    if draws.shape[0] == 1:
        return draws[0]
    n = draws.shape[-1]
    flat = draws.reshape(draws.shape[0], -1, n)
    # Pseudo-inverses: a shard whose draws do not move along some direction (a stuck
    # chain, which fails its diagnostics) gets no weight there rather than infinite weight.
    precisions = np.stack(
        [np.linalg.pinv(np.atleast_2d(np.cov(f, rowvar=False)), hermitian=True) for f in flat]
    )
    weighted = np.einsum("sij,scdj->cdi", precisions, draws)
    return weighted @ np.linalg.pinv(precisions.sum(axis=0), hermitian=True).T


@dataclass(frozen=True)
class Plan:
    """A CMC run prepared and checked, before any sampling: the problem, the sampled
    space and prior, and the shards (see :func:`prepare`)."""

    ds: xr.Dataset
    problem: Objective
    labels: tuple[str, ...]
    space: Space
    shards: tuple[objective.Rows | objective.Pairs, ...]
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
        return len(self.problem.labels)

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

    def physical(self, u) -> np.ndarray:
        """Physical values of unconstrained draws ``(..., n)``."""
        space = self.space.as_jax()
        return np.asarray(physical(interval(space)(jnp.asarray(u)), space.log))

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
) -> Plan:
    """Check the options, build the sampled space, priors and shards of :func:`fit_cmc`
    (arguments as there); nothing is sampled."""
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
    check_memory(validate(ds)["c2"].shape, what="fit_cmc", **FIT_MEMORY["nominal"])
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
    entries = len(problem.labels) + (n_phi if noise else 0)
    fewest = min(ix.size for ix in index)
    if fewest <= entries:
        raise OptionError(
            f"shards={n_shards} leaves {fewest} pairs in a shard for {entries} sampled "
            "quantities; use fewer shards"
        )
    labels = problem.labels + tuple(make_label("noise", k) for k in range(n_phi) if noise)
    floors = _log_floors(problem)
    low, high, log = _sampled_bounds(problem, floors, n_phi if noise else 0)
    x0 = problem.x0
    if noise:
        residuals, angle = problem.residuals(x0), np.asarray(pairs.angle)
        counts = np.bincount(angle, minlength=n_phi)
        rms = np.sqrt(np.bincount(angle, residuals**2, minlength=n_phi) / counts)
        x0 = np.concatenate([x0, np.clip(rms, *NOISE_BOUNDS)])
    # Start inside the open interval: a start at a bound (D0_ref = 0) is at u = -inf.
    y0 = np.where(log, np.log(np.where(log, np.maximum(x0, np.exp(low)), 1.0)), x0)
    margin = 1e-6 * (high - low)
    y0 = np.clip(y0, low + margin, high - margin)
    normal, loc, width = _prior(init, problem.labels, low, high, log)
    transform = dist.transforms.biject_to(constraints.interval(low, high))
    u0 = np.asarray(transform.inv(jnp.asarray(y0)))
    whiten = _whitening(problem, u0, low, high, log, x0, n_shards, noise)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n_shards)))
    if likelihood == "rows":
        size = max(r.size for r in rows)
        data = tuple(objective.row_block(pairs, r, size) for r in rows)
    else:
        size = max(ix.size for ix in index)
        data = tuple(pad_shard(pairs, ix, size) for ix in index)
    space = Space(
        template=np.asarray(problem.template),
        free=np.asarray(problem.free),
        low=low,
        high=high,
        log=log,
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
        labels=labels,
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
            [floors.get(label, np.nan) if log[k] else np.nan for k, label in enumerate(labels)]
        ),
    )


def _sampled_bounds(problem: Objective, floors: dict[str, float], n_noise: int):
    """``(low, high, log)`` of the sampled space ``y`` for the varied quantities, then
    ``n_noise`` noise levels."""
    n = len(problem.labels)
    low, high = np.empty(n + n_noise), np.empty(n + n_noise)
    log = np.zeros(n + n_noise, dtype=bool)
    for k, label in enumerate(problem.labels):
        lo, hi = problem.lower[k], problem.upper[k]
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ParameterError(
                f"{label}: CMC samples inside finite bounds with min < max; got "
                f"[{lo:g}, {hi:g}] (set finite bounds, or fix the parameter)"
            )
        if label in floors and lo >= 0 and hi > floors[label]:
            log[k], low[k], high[k] = True, np.log(max(lo, floors[label])), np.log(hi)
        else:
            low[k], high[k] = lo, hi
    log[n:] = True
    low[n:], high[n:] = np.log(NOISE_BOUNDS[0]), np.log(NOISE_BOUNDS[1])
    return low, high, log


def _prior(init, labels, low, high, log):
    """``(normal, loc, scale)`` of the prior in the sampled space: uniform on ``[low,
    high]`` (loc and scale then only keep the truncated normal finite), or centred on
    ``init`` with ``PRIOR_WIDTH`` x its stderr where it has a finite one."""
    normal = np.zeros(low.size, dtype=bool)
    loc, scale = 0.5 * (low + high), high - low
    if init is None:
        return normal, loc, scale
    for k, label in enumerate(labels):
        value, error = init.value(label), init.error(label)
        if not (np.isfinite(error) and error > 0):
            continue
        if log[k]:
            value = max(value, np.exp(low[k]))
            value, error = np.log(value), error / value
        normal[k], loc[k], scale[k] = True, np.clip(value, low[k], high[k]), PRIOR_WIDTH * error
    return normal, loc, scale


def _log_floors(problem: Objective) -> dict[str, float]:
    """The floor of each log-space parameter: the value whose effect over the record is
    ``FLOOR_EFFECT`` (``q² D0 ∫t^alpha dt``, ``q v0 ∫t^beta dt``)."""
    template = np.asarray(problem.template)
    t, q = problem.pairs.t, float(problem.pairs.q)
    exponents = {"D0_ref": "alpha_ref", "D0_sample": "alpha_sample", "v0": "beta"}
    out = {}
    for name in LOG_SCALE:
        exponent = template[PHYSICS_INDEX[exponents[name]]]
        integral = float(model.cumulative_trapezoid(model.power_law(t, 1.0, exponent, 0.0), t)[-1])
        out[name] = FLOOR_EFFECT / ((q * q if name.startswith("D0") else q) * integral)
    return out


def _whitening(problem, u0, low, high, log, x0, n_shards, noise) -> np.ndarray:
    """``A`` with ``A A^T`` the inverse Gauss-Newton curvature of one shard's log density
    in ``u`` at the start, plus ``_RIDGE``: NUTS then samples ``w`` of about unit scale."""
    n_free = len(problem.labels)
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


def fit_cmc(
    ds: xr.Dataset,
    init: NLSQResult | None = None,
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
) -> CMCResult:
    """Sample the posterior of the heterodyne model by consensus Monte Carlo.

    Parameters
    ----------
    ds : xarray.Dataset
        Canonical two-time Dataset. With a ``sigma`` variable the likelihood uses it;
        without, a noise level per angle is sampled too.
    init : NLSQResult, optional
        A least-squares fit of ``ds``: the chains start at its values and the priors are
        centred on them, ``PRIOR_WIDTH`` (10) x its stderr wide, truncated to the bounds.
        Without it the priors are uniform on the parameter table's bounds.
    params : Parameters or dict, optional
        Which parameters vary, their bounds and start values; default ``init``'s
        parameters, else the parameter table.
    shards : "auto" or int
        Number of shards ``S``; "auto" is ``ceil(n_pairs / 20000)``.
    chains, warmup, samples : int
        NUTS chains per shard, adaptation steps and draws per chain.
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
    CMCResult
        ``.posterior`` (ArviZ InferenceData), ``.params``, ``.stderr``, ``.hdi()``,
        ``.diagnostics``, ``.converged``, ``.report()``, ``.to_netcdf()``.

    Notes
    -----
    Shard ``s`` samples ``p_s(theta) ∝ p(theta)^(1/S) L_s(theta)`` with ``L_s`` the
    Gaussian likelihood of its pairs, so ``prod_s p_s = p(theta | all pairs)``; for
    Gaussian shard posteriors the precision-weighted average of one draw from each shard
    is a draw from the full posterior (Scott et al. 2016). The sampled space, priors,
    the floor of log-space parameters at a bound 0, the sharding rule and the
    diagnostics are described in :mod:`heterodyne.cmc`. Two-time pairs share frames, so
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
        errors = init.info["errors"] if isinstance(init, NLSQResult) else "nominal"
    if errors not in uncertainty.ERRORS:
        raise OptionError(f"errors must be one of {uncertainty.ERRORS}; got {errors!r}")
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
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.exists() and not checkpoint.is_dir():
            raise OptionError(f"checkpoint must be a folder; {checkpoint} is a file")
        checkpoint.mkdir(parents=True, exist_ok=True)
    jobs = plan.jobs(checkpoint)
    if isinstance(progress, tracker.Tracker):
        jobs = [job._replace(token=progress.token) for job in jobs]
    resumed = sum(job.checkpoint is not None and Path(job.checkpoint).exists() for job in jobs)
    start = time.perf_counter()
    runs = [None] * len(plan.shards)
    bar = progress is True
    for s, run in executors.run(run_shard, jobs, executor, progress=bar, desc="cmc shards"):
        runs[s] = run
    result = _result(plan, runs, _executor_name(executor), time.perf_counter() - start, errors)
    result.info.update(checkpoint=str(checkpoint or ""), from_checkpoint=resumed)
    return result


def _executor_name(executor) -> str:
    if executor is None:
        return "sequential (this process)"
    if isinstance(executor, str):
        return executor
    return type(executor).__name__


def adjustment(plan: Plan, u: np.ndarray, errors: str) -> tuple[np.ndarray, dict]:
    """The combined draws ``u`` (chain, draw, n) corrected for ``errors`` (module doc,
    "Correlated noise"), and the scales of the error model."""
    if errors == "nominal":
        return u, {}
    n_free, flat = plan.n_free, u.reshape(-1, u.shape[-1])
    centre = flat.mean(axis=0)
    x = plan.physical(centre)[:n_free]
    found = plan.problem.errors_at(x, plan.problem.normal_equations(x)[0], errors)
    # dx/du at the centre: dx/dy (x in log space, else 1) times dy/du of the logistic map
    space = plan.space
    sigmoid = 1.0 / (1.0 + np.exp(-centre[:n_free]))
    dy_du = (space.high - space.low)[:n_free] * sigmoid * (1.0 - sigmoid)
    dx_du = np.where(space.log[:n_free], x, 1.0) * dy_du
    nominal = found.nominal / np.outer(dx_du, dx_du)
    target = found.covariance / np.outer(dx_du, dx_du)
    # C = Sigma_s^(1/2) Sigma_n^(-1/2), on the matrices scaled to unit nominal diagonal
    scale = np.sqrt(np.diag(nominal))
    scale = np.where(scale > 0, scale, 1.0)
    ratio = _matrix_power(target / np.outer(scale, scale), 0.5) @ _matrix_power(
        nominal / np.outer(scale, scale), -0.5
    )
    matrix = scale[:, None] * ratio / scale[None, :]
    out = u.copy()
    out[..., :n_free] = centre[:n_free] + (u[..., :n_free] - centre[:n_free]) @ matrix.T
    return out, found.scales


def _matrix_power(m: np.ndarray, power: float) -> np.ndarray:
    """``m^power`` of a symmetric positive semi-definite matrix; directions with no
    variance (eigenvalue below 1e-12 of the largest) map to 0."""
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    keep = w > 1e-12 * max(w.max(), 0.0)
    return (v * np.where(keep, np.where(keep, w, 1.0) ** power, 0.0)) @ v.T


def _result(plan: Plan, runs, executor_name: str, seconds: float, errors: str) -> CMCResult:
    space, problem, ds = plan.space, plan.problem, plan.ds
    w = np.stack([run["w"] for run in runs])
    u = space.u0 + w @ space.whiten.T
    combined = consensus(u)
    corrected, scales = adjustment(plan, combined, errors)
    posterior = _draws_dataset(plan, plan.physical(corrected), ("chain", "draw"))
    extra = {}
    if errors != "nominal":
        extra["uncorrected_posterior"] = _draws_dataset(
            plan, plan.physical(combined), ("chain", "draw")
        )
    shard_posterior = _draws_dataset(plan, plan.physical(u), ("shard", "chain", "draw"))
    coords = {
        "shard": np.arange(len(runs)),
        "chain": np.arange(plan.chains),
        "draw": np.arange(plan.samples),
    }
    sample_stats = xr.Dataset(
        {name: (("shard", "chain", "draw"), np.stack([r[name] for r in runs])) for name in _STATS},
        coords=coords,
    )
    figures = diagnostics.shard_diagnostics(shard_posterior, sample_stats)
    figures["n_pairs"] = ("shard", np.array(plan.shard_pairs))
    figures["seconds"] = ("shard", np.array([r["seconds"] for r in runs]))
    for s, found in diagnostics.failures(figures).items():
        warnings.warn(
            f"CMC shard {s} of {len(runs)} failed its diagnostics: {'; '.join(found)}. It is "
            "combined with the others; result.converged is False.",
            stacklevel=3,
        )
    n_phi = ds.sizes["phi"]
    template = np.asarray(space.template)
    physics, contrast, offset = objective.unpack(template, problem.n_scale)
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
        "likelihood": "rows" if isinstance(plan.shards[0], objective.Rows) else "pairs",
        "n_phi": n_phi,
        "scaling": problem.scaling,
        "weighted": int("sigma" in ds.data_vars),
        "prior": plan.prior_kind,
        "prior_width": PRIOR_WIDTH,
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


def _draws_dataset(plan: Plan, x: np.ndarray, dims: tuple[str, ...]) -> xr.Dataset:
    """Draws ``(..., n)`` as one variable per parameter; per-angle quantities along
    ``phi``."""
    variables = {}
    entries = [parse_label(label) for label in plan.labels]
    for k, (name, angle) in enumerate(entries):
        if name in variables:
            continue
        if angle is None:
            variables[name] = (dims, x[..., k], _attrs(name))
        else:
            columns = [m for m, (other, _) in enumerate(entries) if other == name]
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
    physical_bounds = {
        "low": np.where(space.log, np.exp(space.low), space.low),
        "high": np.where(space.log, np.exp(space.high), space.high),
    }
    return xr.Dataset(
        {
            "space": ("parameter", np.where(space.log, "log", "linear")),
            "kind": ("parameter", np.where(space.normal, "truncated normal", "uniform")),
            **{
                k: ("parameter", v, {"long_name": f"{k} bound (physical units)"})
                for k, v in physical_bounds.items()
            },
            "loc": ("parameter", space.loc, {"long_name": "prior centre, sampled space"}),
            "scale": ("parameter", space.scale, {"long_name": "prior sd, sampled space"}),
            "floor": ("parameter", plan.floors, {"long_name": "log-space floor of a bound 0"}),
        },
        coords={"parameter": list(plan.labels)},
        attrs={"power": float(space.power)},
    )
