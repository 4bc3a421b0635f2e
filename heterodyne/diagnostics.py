"""MCMC diagnostics as a verdict: R-hat, ESS, BFMI and divergences against explicit thresholds.

Every use of ArviZ in the package lives in this module. ``import arviz`` costs several
seconds (its plotting layer), so it is imported inside the functions that need it.

=================  ====================================================  ===============
figure             what it detects                                       passes when
=================  ====================================================  ===============
R-hat              chains (split in halves) that disagree: not mixed     ``< 1.01``
ESS bulk, tail     too few effective draws for the mean or the 5 %/95 %  ``>= 100`` per
                   quantiles (rank-normalised, Vehtari et al. 2021)      chain
BFMI               momentum resampling too slow for the energy           ``>= 0.3`` for
                   distribution (heavy tails, funnels)                   every chain
divergences        leapfrog steps that blew up: regions the sampler      ``<= 1 %`` of
                   cannot enter, so the draws are biased                 the draws
=================  ====================================================  ===============

The thresholds are :data:`THRESHOLDS` (a frozen :class:`Thresholds`); the figures are kept
in an ``xarray.Dataset`` whose attrs carry the thresholds they were judged by, so a
result read back from disk gives the same verdict.

References
----------
Vehtari, Gelman, Simpson, Carpenter, Bürkner, "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC", Bayesian Analysis 16
(2021). Betancourt, "Diagnosing suboptimal cotangent disintegrations in Hamiltonian Monte
Carlo", arXiv:1604.00695 (BFMI).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import xarray as xr

from heterodyne.errors import OptionError
from heterodyne.results import entry_label, index_of


@dataclass(frozen=True)
class Thresholds:
    """The limits a sampler run must meet to be trusted."""

    rhat_max: float = 1.01  #: R-hat must be below this
    ess_per_chain_min: float = 100.0  #: bulk and tail ESS at least this times the chains
    bfmi_min: float = 0.3  #: every chain's BFMI at least this
    divergence_max: float = 0.01  #: fraction of divergent draws at most this


THRESHOLDS = Thresholds()
#: :func:`draws_needed`: an R-hat below this, with no other failure than ESS and R-hat,
#: is taken for chains that agree but are too short; the margin on the ESS ratio (at
#: just the ESS asked, the R-hat of such chains still exceeds 1.01 by chance).
RHAT_EXTENDABLE = 1.1
EXTEND_MARGIN = 2.0


def _arviz():
    with warnings.catch_warnings():
        # arviz 0.23 announces its 1.0 refactor at import; that notice is not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        import arviz

    return arviz


def inference_data(**groups: xr.Dataset):
    """An ``arviz.InferenceData`` from Datasets by group name (``posterior``,
    ``sample_stats``, ``observed_data`` and any extra group such as ``shard_posterior``)."""
    return _arviz().InferenceData(**groups)


def groups(idata) -> list[str]:
    """The group names of an ``arviz.InferenceData``."""
    return list(idata.groups())


def by_entry(ds: xr.Dataset) -> xr.DataArray:
    """Stack the variables of ``ds`` into one array along ``entry``, a ``(name, phi)``
    index: a variable with a ``phi`` dimension gives one entry per angle, a scalar one
    one entry with ``phi`` NaN (the covariance index of ``NLSQResult``)."""
    columns = []
    for name, var in ds.data_vars.items():
        if "phi" not in var.dims:
            var = var.expand_dims(phi=[np.nan])
        columns.append(var.expand_dims(name=[str(name)]).stack(entry=("name", "phi")))
    return xr.concat(columns, dim="entry").reset_index("entry").drop_vars("entry", errors="ignore")


def shard_diagnostics(
    shard_posterior: xr.Dataset,
    sample_stats: xr.Dataset,
    thresholds: Thresholds = THRESHOLDS,
) -> xr.Dataset:
    """R-hat, bulk and tail ESS by shard and parameter, BFMI by shard and chain, and
    divergences by shard.

    Parameters
    ----------
    shard_posterior : xarray.Dataset
        Draws with dims ``(shard, chain, draw, ...)``, one variable per parameter.
    sample_stats : xarray.Dataset
        ``energy`` and ``diverging`` with dims ``(shard, chain, draw)``.
    thresholds : Thresholds
        Stored in the attrs; :func:`failures` judges by them.

    Returns
    -------
    xarray.Dataset
        ``rhat``, ``ess_bulk``, ``ess_tail`` (shard, entry), ``entry`` the stacked
        ``(name, phi)`` index of :func:`by_entry`; ``bfmi`` (shard, chain);
        ``divergences`` (count) and ``divergent_fraction`` (shard).

    Notes
    -----
    R-hat is the rank-normalised split R-hat and ESS the rank-normalised bulk/tail
    effective sample size of Vehtari et al. (2021); both are invariant under monotone
    transforms of a parameter, so they judge the sampled space and the physical units
    alike. BFMI of a chain is ``mean_n (E_n - E_{n-1})² / var(E)``, ``E`` its
    energies (variance with ``n - 1``).
    """
    az = _arviz()
    # draws (shard, chain, draw[, phi]): ArviZ reduces chain and draw and keeps the rest
    energy = sample_stats["energy"]
    n_shards, n_chains = energy.sizes["shard"], energy.sizes["chain"]
    bfmi = az.bfmi(energy.values.reshape(n_shards * n_chains, -1)).reshape(n_shards, n_chains)
    diverging = sample_stats["diverging"]
    count = diverging.sum(("chain", "draw")).astype(np.int64)
    return xr.Dataset(
        {
            "rhat": by_entry(az.rhat(shard_posterior)),
            "ess_bulk": by_entry(az.ess(shard_posterior, method="bulk")),
            "ess_tail": by_entry(az.ess(shard_posterior, method="tail")),
            "bfmi": (("shard", "chain"), bfmi),
            "divergences": count,
            "divergent_fraction": count / (diverging.sizes["chain"] * diverging.sizes["draw"]),
        },
        coords={"chain": sample_stats["chain"].values},
        attrs={f"threshold_{k}": v for k, v in asdict(thresholds).items()},
    )


def thresholds_of(diagnostics: xr.Dataset) -> Thresholds:
    """The thresholds a diagnostics Dataset was judged by (from its attrs)."""
    return Thresholds(**{k: float(diagnostics.attrs[f"threshold_{k}"]) for k in asdict(THRESHOLDS)})


def pass_rules(diagnostics: xr.Dataset) -> dict[str, Callable[[float], bool]]:
    """Whether a value of each figure passes, by the thresholds ``diagnostics`` was judged
    by: ``{"rhat", "ess_bulk", "ess_tail", "bfmi", "divergent_fraction"}``, each a
    predicate on one value (a NaN fails). The one pass/fail rule of the CMC diagnostics,
    read by :func:`failures`, the plots and the dashboard."""
    limits = thresholds_of(diagnostics)
    ess_min = limits.ess_per_chain_min * diagnostics.sizes["chain"]
    return {
        "rhat": lambda v: v < limits.rhat_max,
        "ess_bulk": lambda v: v >= ess_min,
        "ess_tail": lambda v: v >= ess_min,
        "bfmi": lambda v: v >= limits.bfmi_min,
        "divergent_fraction": lambda v: v <= limits.divergence_max,
    }


def draws_needed(diagnostics: xr.Dataset, samples: int, most: int) -> int:
    """Draws per chain that would let every shard pass, where more draws can make it pass.

    The chains mix but too slowly for their length when the only failures are ESS short
    of the threshold or an R-hat below ``RHAT_EXTENDABLE``: ESS grows in proportion to
    the draws, so the answer is ``samples x EXTEND_MARGIN x required / least ESS`` (at
    least twice ``samples`` where an R-hat fails), at most ``most``. Divergences, a low
    BFMI, an R-hat of ``RHAT_EXTENDABLE`` or more (chains in different places) and NaN
    figures are not cured by length: then, or when all pass, ``samples``.
    """
    passes = pass_rules(diagnostics)
    rhat = diagnostics["rhat"].values
    ess = np.concatenate(
        [diagnostics["ess_bulk"].values.ravel(), diagnostics["ess_tail"].values.ravel()]
    )
    if not (
        np.all(np.isfinite(rhat))
        and np.all(np.isfinite(ess))
        and np.all(rhat < RHAT_EXTENDABLE)
        and all(passes["bfmi"](v) for v in diagnostics["bfmi"].values.ravel())
        and all(passes["divergent_fraction"](v) for v in diagnostics["divergent_fraction"].values)
    ):
        return samples
    required = thresholds_of(diagnostics).ess_per_chain_min * diagnostics.sizes["chain"]
    ratio = required / max(float(ess.min()), 1.0)
    if not all(passes["rhat"](v) for v in rhat.ravel()):
        ratio = max(ratio, 2.0 / EXTEND_MARGIN)
    elif ratio <= 1.0:
        return samples
    return int(min(np.ceil(samples * EXTEND_MARGIN * ratio), most))


def divergence_failure(shard: xr.Dataset, limits: Thresholds) -> list[str]:
    """``["21 divergent transitions = 1.05 % of the draws (needs <= 1 %)"]`` when the
    divergences of one shard's figures fail ``limits``, else ``[]``."""
    fraction = float(shard["divergent_fraction"])
    if pass_rules(shard)["divergent_fraction"](fraction):
        return []
    return [
        f"{int(shard['divergences'])} divergent transitions = {100 * fraction:.3g} % of "
        f"the draws (needs <= {100 * limits.divergence_max:g} %)"
    ]


def failures(diagnostics: xr.Dataset) -> dict[int, list[str]]:
    """Every failed figure, by shard: ``{shard: ["R-hat of v0 = 1.034 (needs < 1.01)",
    ...]}``; empty when all shards pass. NaN figures fail (:func:`pass_rules`)."""
    limits = thresholds_of(diagnostics)
    passes = pass_rules(diagnostics)
    n_chains = diagnostics.sizes["chain"]
    ess_min = limits.ess_per_chain_min * n_chains
    out = {}
    for s in diagnostics["shard"].values:
        d = diagnostics.sel(shard=s)
        found = []
        labels = [entry_label(name, phi) for name, phi in index_of(d)]
        for label, value in zip(labels, d["rhat"].values, strict=True):
            if not passes["rhat"](value):
                found.append(f"R-hat of {label} = {value:.4g} (needs < {limits.rhat_max:g})")
        for figure, name in (("ess_bulk", "ESS_bulk"), ("ess_tail", "ESS_tail")):
            for label, value in zip(labels, d[figure].values, strict=True):
                if not passes[figure](value):
                    found.append(
                        f"{name} of {label} = {value:.4g} (needs >= {ess_min:g}: "
                        f"{limits.ess_per_chain_min:g} per chain x {n_chains} chains)"
                    )
        for chain, value in zip(d["chain"].values, d["bfmi"].values, strict=True):
            if not passes["bfmi"](value):
                found.append(f"BFMI of chain {chain} = {value:.3g} (needs >= {limits.bfmi_min:g})")
        found += divergence_failure(d, limits)
        if found:
            out[int(s)] = found
    return out


def brief(diagnostics: xr.Dataset) -> dict[int, str]:
    """One line per failing shard (:func:`failures` in full): for each failed figure, the
    threshold, how many quantities (chains for BFMI) fail it and the worst of them, e.g.
    ``"R-hat >= 1.01 for 7 of 19 quantities, worst v0 = 1.106"``."""
    limits = thresholds_of(diagnostics)
    passes = pass_rules(diagnostics)
    n_chains = diagnostics.sizes["chain"]
    ess_min = limits.ess_per_chain_min * n_chains
    ess_rule = f"< {ess_min:g} ({limits.ess_per_chain_min:g} per chain x {n_chains} chains)"
    figures = (  # figure, name, failing rule, what is counted, worst first (NaN worst)
        ("rhat", "R-hat", f">= {limits.rhat_max:g}", "quantities", -1),
        ("ess_bulk", "ESS_bulk", ess_rule, "quantities", 1),
        ("ess_tail", "ESS_tail", ess_rule, "quantities", 1),
        ("bfmi", "BFMI", f"< {limits.bfmi_min:g}", "chains", 1),
    )
    out = {}
    for s in diagnostics["shard"].values:
        d = diagnostics.sel(shard=s)
        labels = {
            "quantities": [entry_label(name, phi) for name, phi in index_of(d)],
            "chains": [f"chain {c}" for c in d["chain"].values],
        }
        parts = []
        for figure, name, rule, counted, sign in figures:
            values = d[figure].values
            bad = [k for k, value in enumerate(values) if not passes[figure](value)]
            if bad:
                k = min(bad, key=lambda k: (not np.isnan(values[k]), sign * values[k]))
                parts.append(
                    f"{name} {rule} for {len(bad)} of {len(values)} {counted}, worst "
                    f"{labels[counted][k]} = {values[k]:.4g}"
                )
        parts += divergence_failure(d, limits)
        if parts:
            out[int(s)] = "; ".join(parts)
    return out


# The judged figures of a shard in the verdict table: column, figure, how it is reduced.
VERDICT_FIGURES = (
    ("max R-hat", "rhat", "max"),
    ("min ESS bulk", "ess_bulk", "min"),
    ("min ESS tail", "ess_tail", "min"),
    ("min BFMI", "bfmi", "min"),
    ("divergent %", "divergent_fraction", None),
)


def verdict(diagnostics: xr.Dataset) -> pd.DataFrame:
    """The CMC verdict as one table, one row per shard: ``shard``, ``pairs`` and
    ``seconds`` (of a CMC run), the worst value of each judged figure over the
    quantities (or chains) of the shard (``max R-hat``, ``min ESS bulk``, ``min ESS
    tail``, ``min BFMI``, ``divergent %``), whether it passes (``<column> ok``,
    :func:`pass_rules`; a NaN fails) and ``verdict``, ``"pass"`` or ``"fail"``. The
    report, the plots and the dashboard all render this table."""
    passes = pass_rules(diagnostics)
    table = {"shard": diagnostics["shard"].values}
    for column, name in (("pairs", "n_pairs"), ("seconds", "seconds")):
        if name in diagnostics:  # a CMC run's figures; not of bare draws
            table[column] = diagnostics[name].values
    for column, figure, reduce in VERDICT_FIGURES:
        values = diagnostics[figure]
        if reduce is not None:
            other = [d for d in values.dims if d != "shard"]
            values = getattr(values, reduce)(other, skipna=False)
        table[column] = values.values * (100 if figure == "divergent_fraction" else 1)
        table[f"{column} ok"] = [passes[figure](v) for v in values.values]
    frame = pd.DataFrame(table)
    ok = frame[[f"{column} ok" for column, _, _ in VERDICT_FIGURES]].all(axis=1)
    frame["verdict"] = np.where(ok, "pass", "fail")
    return frame


def hdi(posterior: xr.Dataset, prob: float = 0.94) -> xr.Dataset:
    """Highest-density interval of every variable, along a dim ``hdi`` = (lower, higher)."""
    if not 0 < prob < 1:
        raise OptionError(f"prob must be in (0, 1); got {prob!r}")
    return _arviz().hdi(posterior, hdi_prob=prob)


def ess(posterior: xr.Dataset, method: str = "bulk") -> xr.Dataset:
    """Effective sample size of every variable of ``posterior`` (dims chain, draw)."""
    return _arviz().ess(posterior, method=method)
