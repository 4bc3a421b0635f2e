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
    on the shard's pairs, pairwise path): ``r ~ Normal(0, 1)`` with ``sigma`` from the
    Dataset (``r = (model - c2) / sigma``), or ``r ~ Normal(0, noise[angle])`` with
    ``r = model - c2`` otherwise. ``-2 log L`` differs from NLSQ's ``chi2`` by a constant.

Shards
    Pairs are grouped by (angle, age quartile ``(t1 + t2) / 2``, lag quartile
    ``t2 - t1``), shuffled within each group with ``seed`` and dealt to the shards in
    turn, so every shard holds an equal share (to one pair) of every angle and every
    part of the time range. ``shards="auto"`` takes ``S = ceil(n_pairs /
    PAIRS_PER_SHARD)``: shards of at most 20 000 pairs keep a gradient evaluation in the
    millisecond range and each shard's posterior close to Gaussian. Shards are padded
    to equal size with weight-0 pairs, so NUTS compiles once for all of them.

Sampler
    NUTS (numpyro's functional ``hmc`` kernel, dense mass matrix, target acceptance
    0.8), ``warmup`` adaptation steps and ``samples`` draws per chain, chains run one
    after the other (chain method "sequential"; the package never sets
    ``jax_num_cpu_devices``). Chains start uniformly within ±1 (whitened) posterior
    standard deviation of the start values: ``init``'s values, else ``params``'.
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

References
----------
Scott, Blocker, Bonassi, Chipman, George, McCulloch, "Bayes and big data: the consensus
Monte Carlo algorithm", Int. J. Management Science and Engineering Management 11 (2016).
Hoffman, Gelman, "The No-U-Turn sampler", JMLR 15 (2014).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import xarray as xr
from numpyro.distributions import constraints
from numpyro.infer.hmc import hmc
from numpyro.infer.util import potential_energy

from heterodyne import diagnostics, executors, model, objective
from heterodyne.errors import OptionError, ParameterError
from heterodyne.nlsq import LOG_SCALE, _Problem
from heterodyne.parameters import PHYSICS_NAMES, UNITS
from heterodyne.results import CMCResult, NLSQResult, params_layout, settings_dataset

PAIRS_PER_SHARD = 20_000  # shards="auto": S = ceil(n_pairs / PAIRS_PER_SHARD)
PRIOR_WIDTH = 10.0  # NLSQ-centred priors: standard deviation = PRIOR_WIDTH x NLSQ stderr
FLOOR_EFFECT = 1e-4  # a log-space parameter's floor: q² ∫J (or q ∫v) over the record
NOISE_BOUNDS = (1e-6, 1.0)  # log-uniform prior of the per-angle noise level of c2
STRATA = 4  # shards take equal shares of each (angle, age quartile, lag quartile)
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


class ShardJob(NamedTuple):
    """Everything one shard's NUTS run needs, as numpy arrays and builtins (picklable)."""

    pairs: objective.Pairs
    space: Space
    key: np.ndarray  #: raw key data of the shard's PRNG key
    chains: int
    warmup: int
    samples: int
    n_scale: int
    n_free: int


def interval(space: Space):
    """The transform ``u -> y = low + (high - low) sigmoid(u)`` (numpyro's bijection onto
    the interval, the one NUTS would use)."""
    return dist.transforms.biject_to(constraints.interval(space.low, space.high))


def physical(y, log):
    """The physical value of a sampled-space ``y``: ``exp(y)`` where ``log``, else ``y``."""
    # exp is taken of 0 where the entry is linear: exp(1e5) would overflow and its
    # infinite gradient, multiplied by the unselected branch's 0, would give NaN.
    return jnp.where(log, jnp.exp(jnp.where(log, y, 0.0)), y)


def shard_model(pairs: objective.Pairs, space: Space, *, n_scale: int, n_free: int):
    """NumPyro model of one shard: tempered prior times the Gaussian of the residuals.

    ``log p(w) = log|dy/du| + power * log prior(y) + sum_k log N(r_k | 0, s_k)``

    with ``u = u0 + A w``, ``r`` the residuals of :func:`heterodyne.objective.residuals`
    on the shard's pairs and ``s_k = 1`` (``sigma`` in the data) or the noise level of
    the pair's angle; weight-0 padding pairs are masked out. The prior is tempered by a
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
    r = objective.residuals(z, pairs, n_scale)
    noise = x[n_free:]
    scale = noise[pairs.angle] if noise.shape[0] else 1.0
    numpyro.sample("residuals", dist.Normal(jnp.zeros_like(r), scale).mask(pairs.weight > 0), obs=r)


def _potential(pairs, space, *, n_scale, n_free):
    shard = partial(shard_model, n_scale=n_scale, n_free=n_free)
    return lambda params: potential_energy(shard, (pairs, space), {}, params)


@partial(jax.jit, static_argnames=("warmup", "samples", "n_scale", "n_free"))
def _chain(key, pairs, space, *, warmup, samples, n_scale, n_free):
    """One NUTS chain, warmup and draws, as one compiled program.

    Data and settings are arguments, not constants: every shard (same padded size) and
    every chain reuse the code compiled for the first.
    """
    init_kernel, sample_kernel = hmc(
        potential_fn_gen=partial(_potential, n_scale=n_scale, n_free=n_free), algo="NUTS"
    )
    key_start, key_nuts = jax.random.split(key)
    w0 = jax.random.uniform(key_start, space.u0.shape, minval=-1.0, maxval=1.0)
    args = (pairs, space)
    state = init_kernel({"w": w0}, warmup, dense_mass=True, model_args=args, rng_key=key_nuts)

    def step(state, _):
        state = sample_kernel(state, model_args=args)
        return state, {
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
    trace = jax.lax.scan(step, state, None, length=warmup + samples)[1]
    return jax.tree.map(lambda a: a[warmup:], trace)


def run_shard(job: ShardJob) -> dict[str, np.ndarray]:
    """Run the chains of one shard; numpy arrays ``(chain, draw, ...)`` by name, and the
    wall time in ``seconds``. A module-level function of picklable input: it runs the
    same in this process, a spawned worker or a dask worker."""
    start = time.perf_counter()
    pairs = objective.Pairs(*(jnp.asarray(a) for a in job.pairs))
    space = Space(*(jnp.asarray(a) for a in job.space))
    keys = jax.random.split(jax.random.wrap_key_data(jnp.asarray(job.key)), job.chains)
    chains = [
        jax.device_get(
            _chain(
                key,
                pairs,
                space,
                warmup=job.warmup,
                samples=job.samples,
                n_scale=job.n_scale,
                n_free=job.n_free,
            )
        )
        for key in keys
    ]
    out = {name: np.stack([c[name] for c in chains]) for name in chains[0]}
    out["seconds"] = time.perf_counter() - start
    return out


def split_pairs(pairs: objective.Pairs, n_shards: int, seed: int) -> list[np.ndarray]:
    """Indices of the pairs of each shard, stratified by angle, age and lag quartile."""
    n = int(pairs.t.shape[0])
    i, j, angle = np.asarray(pairs.i), np.asarray(pairs.j), np.asarray(pairs.angle)
    age = np.minimum((i + j) * STRATA // (2 * n), STRATA - 1)
    lag = np.minimum((j - i) * STRATA // n, STRATA - 1)
    shuffle = np.random.default_rng(seed).random(i.size)
    order = np.lexsort((shuffle, lag, age, angle))
    shard = np.empty(i.size, dtype=np.int64)
    shard[order] = np.arange(i.size) % n_shards
    return [np.flatnonzero(shard == s) for s in range(n_shards)]


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
    problem: _Problem
    labels: tuple[str, ...]
    space: Space
    shards: tuple[objective.Pairs, ...]
    shard_pairs: tuple[int, ...]
    keys: np.ndarray
    chains: int
    warmup: int
    samples: int
    seed: int
    shards_rule: str
    prior_kind: str
    floors: np.ndarray

    @property
    def n_free(self) -> int:
        return len(self.problem.labels)

    def jobs(self) -> list[ShardJob]:
        return [
            ShardJob(
                pairs=pairs,
                space=self.space,
                key=self.keys[s],
                chains=self.chains,
                warmup=self.warmup,
                samples=self.samples,
                n_scale=self.problem.n_scale,
                n_free=self.n_free,
            )
            for s, pairs in enumerate(self.shards)
        ]

    def physical(self, u) -> np.ndarray:
        """Physical values of unconstrained draws ``(..., n)``."""
        space = _jax_space(self.space)
        return np.asarray(physical(interval(space)(jnp.asarray(u)), space.log))

    def unconstrained(self, x) -> np.ndarray:
        """The unconstrained ``u`` of physical values ``x`` (n,)."""
        space = _jax_space(self.space)
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
        pairs = objective.Pairs(*(jnp.asarray(a) for a in job.pairs))
        seeded = numpyro.handlers.substitute(shard_fn, data={"w": jnp.asarray(w)})
        trace = numpyro.handlers.trace(seeded).get_trace(pairs, _jax_space(job.space))
        return {
            name: float(jnp.sum(site["fn"].log_prob(site["value"])))
            for name, site in trace.items()
            if site["type"] == "sample" and name != "w"
        }


def _jax_space(space: Space) -> Space:
    return Space(*(jnp.asarray(a) for a in space))


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


def prepare(
    ds: xr.Dataset,
    init: NLSQResult | None = None,
    *,
    params=None,
    shards="auto",
    chains: int = 2,
    warmup: int = 500,
    samples: int = 500,
    seed: int = 0,
    scaling: str | None = None,
) -> Plan:
    """Check the options, build the sampled space, priors and shards of :func:`fit_cmc`
    (arguments as there); nothing is sampled."""
    _check_options(init, shards, chains, warmup, samples, seed)
    if init is not None:
        if init.params.sizes["phi"] != ds.sizes["phi"]:
            raise OptionError(
                f"init was fitted to {init.params.sizes['phi']} angles; ds has {ds.sizes['phi']}"
            )
        params = init.parameters() if params is None else params
        scaling = init.info["scaling"] if scaling is None else scaling
    problem = _Problem.build(ds, params, fix=(), scaling=scaling or "per_angle")
    pairs = problem.pairs
    n_shards = -(-pairs.n_pairs // PAIRS_PER_SHARD) if shards == "auto" else int(shards)
    noise = "sigma" not in ds.data_vars
    n_phi = ds.sizes["phi"]
    entries = len(problem.labels) + (n_phi if noise else 0)
    if -(-pairs.n_pairs // n_shards) <= entries:
        raise OptionError(
            f"shards={n_shards} leaves about {pairs.n_pairs // n_shards} pairs per shard for "
            f"{entries} sampled quantities; use fewer shards"
        )
    labels = problem.labels + tuple(f"noise[{k}]" for k in range(n_phi) if noise)
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
    index = split_pairs(pairs, n_shards, seed)
    size = max(ix.size for ix in index)
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
        shards=tuple(pad_shard(pairs, ix, size) for ix in index),
        shard_pairs=tuple(int(ix.size) for ix in index),
        keys=keys,
        chains=int(chains),
        warmup=int(warmup),
        samples=int(samples),
        seed=int(seed),
        shards_rule=(f"auto: ceil(n_pairs / {PAIRS_PER_SHARD})" if shards == "auto" else "given"),
        prior_kind="nlsq" if init is not None else "table",
        floors=np.array(
            [floors.get(label, np.nan) if log[k] else np.nan for k, label in enumerate(labels)]
        ),
    )


def _sampled_bounds(problem: _Problem, floors: dict[str, float], n_noise: int):
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


def _log_floors(problem: _Problem) -> dict[str, float]:
    """The floor of each log-space parameter: the value whose effect over the record is
    ``FLOOR_EFFECT`` (``q² D0 ∫t^alpha dt``, ``q v0 ∫t^beta dt``)."""
    template = np.asarray(problem.template)
    t, q = problem.pairs.t, float(problem.pairs.q)
    exponents = {"D0_ref": "alpha_ref", "D0_sample": "alpha_sample", "v0": "beta"}
    out = {}
    for name in LOG_SCALE:
        exponent = template[PHYSICS_NAMES.index(exponents[name])]
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
    warmup: int = 500,
    samples: int = 500,
    seed: int = 0,
    executor=None,
    scaling: str | None = None,
    progress: bool = True,
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
        Seeds the split into shards and every chain: the same seed gives the same draws
        whatever the executor.
    executor : None, "processes", "dask://HOST:PORT" or concurrent.futures.Executor
        Where the shards run (:mod:`heterodyne.executors`): in this process one after the
        other, in local worker processes (spawned), on a dask cluster, or on any executor
        such as ``distributed.Client(...).get_executor()``.
    scaling : {"per_angle", "shared"}, optional
        Contrast/offset per angle or shared; default ``init``'s, else "per_angle".
    progress : bool
        Show a progress bar over shards.

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
    real data have correlated errors that this independent-pair likelihood ignores (as
    NLSQ's nominal errors do): the posterior is then too narrow (MODEL.md, "Noise").

    Examples
    --------
    >>> ds = hd.simulate({"v0": 800.0}, n_frames=60, phi=[0, 60], noise=0.02)
    >>> nlsq = hd.fit_nlsq(ds)
    >>> result = hd.fit_cmc(ds, nlsq, shards=2)  # doctest: +SKIP
    >>> print(result.report())  # doctest: +SKIP
    """
    executors.check(executor)
    if not isinstance(progress, bool):
        raise OptionError(f"progress must be True or False; got {progress!r}")
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
    )
    start = time.perf_counter()
    runs = [None] * len(plan.shards)
    for s, run in executors.run(
        run_shard, plan.jobs(), executor, progress=progress, desc="cmc shards"
    ):
        runs[s] = run
    return _result(plan, runs, _executor_name(executor), time.perf_counter() - start)


def _executor_name(executor) -> str:
    if executor is None:
        return "sequential (this process)"
    if isinstance(executor, str):
        return executor
    return type(executor).__name__


def _result(plan: Plan, runs, executor_name: str, seconds: float) -> CMCResult:
    space, problem, ds = plan.space, plan.problem, plan.ds
    w = np.stack([run["w"] for run in runs])
    u = space.u0 + w @ space.whiten.T
    posterior = _draws_dataset(plan, plan.physical(consensus(u)), ("chain", "draw"))
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
        "devices": jax.local_device_count(),
        "executor": executor_name,
        "n_pairs": problem.pairs.n_pairs,
        "shard_size": int(plan.shards[0].c2.shape[0]),
        "n_phi": n_phi,
        "scaling": problem.scaling,
        "weighted": int("sigma" in ds.data_vars),
        "prior": plan.prior_kind,
        "prior_width": PRIOR_WIDTH,
        "combination": "precision-weighted, in the unconstrained space",
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
    for k, label in enumerate(plan.labels):
        name, _, index = label.partition("[")
        if name in variables:
            continue
        if index:
            entries = [m for m, other in enumerate(plan.labels) if other.partition("[")[0] == name]
            variables[name] = (dims + ("phi",), x[..., entries], _attrs(name))
        else:
            variables[name] = (dims, x[..., k], _attrs(name))
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
