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
import xarray as xr

from heterodyne.errors import OptionError
from heterodyne.parameters import make_label


@dataclass(frozen=True)
class Thresholds:
    """The limits a sampler run must meet to be trusted."""

    rhat_max: float = 1.01  #: R-hat must be below this
    ess_per_chain_min: float = 100.0  #: bulk and tail ESS at least this times the chains
    bfmi_min: float = 0.3  #: every chain's BFMI at least this
    divergence_max: float = 0.01  #: fraction of divergent draws at most this


THRESHOLDS = Thresholds()


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


def by_parameter(ds: xr.Dataset) -> xr.DataArray:
    """Stack the variables of ``ds`` into one array along ``parameter``.

    A variable with a ``phi`` dimension gives one entry per angle, labelled
    ``name[k]`` as in ``NLSQResult``; a scalar variable gives one entry, ``name``.
    """
    labels, columns = [], []
    for name, var in ds.data_vars.items():
        if "phi" in var.dims:
            for k in range(var.sizes["phi"]):
                labels.append(make_label(name, k))
                columns.append(var.isel(phi=k, drop=True))
        else:
            labels.append(str(name))
            columns.append(var)
    stacked = xr.concat(columns, dim="parameter", coords="minimal", compat="override")
    return stacked.assign_coords(parameter=labels)


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
        ``rhat``, ``ess_bulk``, ``ess_tail`` (shard, parameter); ``bfmi`` (shard, chain);
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
    rhat, bulk, tail, bfmi = [], [], [], []
    for s in shard_posterior["shard"].values:
        draws = shard_posterior.sel(shard=s, drop=True)
        rhat.append(by_parameter(az.rhat(draws)))
        bulk.append(by_parameter(az.ess(draws, method="bulk")))
        tail.append(by_parameter(az.ess(draws, method="tail")))
        bfmi.append(az.bfmi(sample_stats["energy"].sel(shard=s).values))
    diverging = sample_stats["diverging"]
    count = diverging.sum(("chain", "draw")).astype(np.int64)
    shard = shard_posterior["shard"]
    return xr.Dataset(
        {
            "rhat": xr.concat(rhat, dim=shard),
            "ess_bulk": xr.concat(bulk, dim=shard),
            "ess_tail": xr.concat(tail, dim=shard),
            "bfmi": (("shard", "chain"), np.asarray(bfmi)),
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
        for label, value in zip(d["parameter"].values, d["rhat"].values, strict=True):
            if not passes["rhat"](value):
                found.append(f"R-hat of {label} = {value:.4g} (needs < {limits.rhat_max:g})")
        for figure, name in (("ess_bulk", "ESS_bulk"), ("ess_tail", "ESS_tail")):
            for label, value in zip(d["parameter"].values, d[figure].values, strict=True):
                if not passes[figure](value):
                    found.append(
                        f"{name} of {label} = {value:.4g} (needs >= {ess_min:g}: "
                        f"{limits.ess_per_chain_min:g} per chain x {n_chains} chains)"
                    )
        for chain, value in zip(d["chain"].values, d["bfmi"].values, strict=True):
            if not passes["bfmi"](value):
                found.append(f"BFMI of chain {chain} = {value:.3g} (needs >= {limits.bfmi_min:g})")
        fraction = float(d["divergent_fraction"])
        if not passes["divergent_fraction"](fraction):
            found.append(
                f"{int(d['divergences'])} divergent transitions = {100 * fraction:.3g} % of "
                f"the draws (needs <= {100 * limits.divergence_max:g} %)"
            )
        if found:
            out[int(s)] = found
    return out


def hdi(posterior: xr.Dataset, prob: float = 0.94) -> xr.Dataset:
    """Highest-density interval of every variable, along a dim ``hdi`` = (lower, higher)."""
    if not 0 < prob < 1:
        raise OptionError(f"prob must be in (0, 1); got {prob!r}")
    return _arviz().hdi(posterior, hdi_prob=prob)


def ess(posterior: xr.Dataset, method: str = "bulk") -> xr.Dataset:
    """Effective sample size of every variable of ``posterior`` (dims chain, draw)."""
    return _arviz().ess(posterior, method=method)
