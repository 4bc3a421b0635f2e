"""The NUTS run of one CMC shard, and its checkpoint.

Likelihood
    The Gaussian of the residuals NLSQ minimises (:func:`heterodyne.pairs.residuals`
    on the shard's pairs): ``r ~ Normal(0, 1)`` with ``sigma`` from the Dataset
    (``r = (model - c2) / sigma``), or ``r ~ Normal(0, noise[angle])`` with
    ``r = model - c2`` otherwise. ``-2 log L`` differs from NLSQ's ``chi2`` by a constant.
    A shard holds whole rows of the two-time matrices (``likelihood="rows"``, the
    default): the model is evaluated on the ``R x N`` block of its rows by
    :func:`heterodyne.model.c2_rows` (exponentials shared by the angles, the flow phase
    as a rank-2 product, dense array operations whose gradients are matrix products),
    the pairs outside the upper triangle weighted 0. ``likelihood="pairs"`` evaluates
    the same pairs one by one (:func:`heterodyne.model.c2_pairs`, gathers and scatters
    per pair): the reference the tests hold the fast path against (to 1e-10), slower
    per gradient (``benchmarks/cmc.py`` times both). No shard forms an ``N x N`` array: a block has
    ``R = N / S`` rows.

Checkpoints
    With ``checkpoint=DIR`` each shard's draws and statistics are written to ``DIR`` (an
    ``.npz`` file named by a hash of the shard's data, sampled space, PRNG key and run
    lengths) by the process that sampled it, as soon as it ends. A run stopped by an
    interrupt or a crashed worker keeps the finished shards; rerun with the same
    arguments, it reads them back and samples only the others. Each shard's draws
    depend on nothing else, so the combined result is the one an uninterrupted run
    gives. On a cluster ``DIR`` must be a folder every worker can write.

Sampler
    NUTS (numpyro's functional ``hmc`` kernel, target acceptance 0.8), ``warmup`` adaptation
    steps and ``samples`` draws per chain, chains run one after the other (chain method
    "sequential"; the package never sets ``jax_num_cpu_devices``). With an NLSQ ``init`` the
    whitening is the posterior's curvature at its mode, so the mass matrix stays the
    identity in ``w`` and warmup adapts the step size only: there the posterior has unit
    scale already, and a dense mass matrix estimated from a short warmup only adds noise to
    it, which lengthens the trajectories. Without ``init`` the start can be far from the
    posterior and a dense mass matrix is adapted. Chains start uniformly within ±1
    (whitened) posterior standard deviation of the start values: ``init``'s values, else
    ``params``'.
    Shard ``s`` draws with key ``split(key(seed), S)[s]``, chain ``c`` with
    ``split(that, chains)[c]``: the same seed gives bit-identical draws on any executor.

References
----------
Hoffman, Gelman, "The No-U-Turn sampler", JMLR 15 (2014).
"""

from __future__ import annotations

import time
import zipfile
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.experimental import io_callback
from numpyro.distributions import constraints
from numpyro.infer.hmc import hmc
from numpyro.infer.util import potential_energy

from heterodyne import identity, tracker
from heterodyne.errors import Cancelled, FileFormatError
from heterodyne.files import atomic_write
from heterodyne.pairs import Pairs, Rows, residuals

CHAIN_METHOD = "sequential"
STATS = ("energy", "diverging", "n_steps", "acceptance_rate", "step_size", "lp")


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
    fold: jax.Array  #: +1 (-1): y reflected at the lower (upper) bound of x, 0: not, (n,)
    normal: jax.Array  #: truncated-normal prior (else uniform), (n,)
    loc: jax.Array  #: prior centre in y, (n,)
    scale: jax.Array  #: prior standard deviation in y, (n,)
    u0: jax.Array  #: start in the unconstrained space, (n,)
    whiten: jax.Array  #: u = u0 + whiten @ w, (n, n)
    power: jax.Array  #: each entry's prior is raised to this power, 1 / S, () or (n,)

    def as_jax(self) -> Space:
        """The same space with every field a JAX array (what the compiled chain takes)."""
        return Space(*(jnp.asarray(a) for a in self))


class ShardJob(NamedTuple):
    """Everything one shard's NUTS run needs, as numpy arrays and builtins (picklable)."""

    data: Rows | Pairs
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


def reflect(y, space: Space):
    """``y`` of the interval ``[low, high]`` folded at its midpoint ``m`` where
    ``space.fold`` is ±1: ``m + fold |y - m|``, into ``[m, high]`` (``+1``) or ``[low, m]``
    (``-1``), the parameter's bounds (:func:`heterodyne.priors.sampled_bounds`)."""
    mid = 0.5 * (space.low + space.high)
    return jnp.where(space.fold != 0, mid + space.fold * jnp.abs(y - mid), y)


def fold_unconstrained(u, fold):
    """Unconstrained ``u`` reflected as :func:`reflect` reflects ``y``: the logistic map
    of a folded entry is odd about its midpoint, ``u = 0``, so the fold is ``fold |u|``."""
    return np.where(fold != 0, fold * np.abs(u), u)


def physical(y, log):
    """The physical value of a sampled-space ``y``: ``exp(y)`` where ``log``, else ``y``."""
    # exp is taken of 0 where the entry is linear: exp(1e5) would overflow and its
    # infinite gradient, multiplied by the unselected branch's 0, would give NaN.
    return jnp.where(log, jnp.exp(jnp.where(log, y, 0.0)), y)


def shard_model(data, space: Space, *, n_scale: int, n_free: int):
    """NumPyro model of one shard: tempered prior times the Gaussian of the residuals.

    ``log p(w) = log|dy/du| + power * log prior(y) + sum_k log N(r_k | 0, s_k)``

    with ``u = u0 + A w``, ``y`` reflected where the space folds (:func:`reflect`,
    ``|dy/du|`` unchanged), ``r`` the residuals of :func:`heterodyne.pairs.residuals`
    on the shard's pairs (``data``: :class:`~heterodyne.pairs.Rows`, or the
    reference pairwise path's :class:`~heterodyne.pairs.Pairs`) and ``s_k = 1``
    (``sigma`` in the data) or the noise level of the pair's angle; weight-0 entries
    (padding, ``t_j <= t_i``, masked pairs) are left out. The prior is tempered by a
    factor, not by ``numpyro.handlers.scale`` on the sample sites: that would also
    temper the Jacobian of the support transform, which is not part of the prior.
    """
    n = space.u0.shape[0]
    w = numpyro.sample("w", dist.ImproperUniform(constraints.real_vector, (), (n,)))
    u = space.u0 + space.whiten @ w
    transform = interval(space)
    unfolded = transform(u)
    numpyro.factor("log_det_jacobian", jnp.sum(transform.log_abs_det_jacobian(u, unfolded)))
    y = reflect(unfolded, space)
    uniform = -jnp.log(space.high - space.low)
    normal = dist.TruncatedNormal(space.loc, space.scale, low=space.low, high=space.high)
    numpyro.factor(
        "prior", jnp.sum(space.power * jnp.where(space.normal, normal.log_prob(y), uniform))
    )
    x = physical(y, space.log)
    z = space.template.at[space.free].set(x[:n_free])
    r = residuals(z, data, n_scale)
    noise = x[n_free:]
    if not noise.shape[0]:
        scale = 1.0
    elif isinstance(data, Rows):
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
        try:
            out = jax.device_get(chain())
        except jax.errors.JaxRuntimeError as err:
            # Ctrl-C that lands while the chain's progress callback runs in Python reaches
            # here wrapped in JAX's error, with the interrupt's traceback as its text:
            # it is still the user's Ctrl-C (finished shards are kept; a rerun resumes)
            if "KeyboardInterrupt" in str(err):
                raise KeyboardInterrupt from err
            raise
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
    missing = sorted({"w", "seconds", *STATS} - set(out))
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
