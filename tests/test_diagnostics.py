"""The diagnostics verdict on synthetic draws whose R-hat, ESS, BFMI and divergences are
known independently."""

import numpy as np
import pytest
import xarray as xr

from heterodyne import diagnostics
from heterodyne.errors import OptionError

CHAINS, DRAWS = 2, 1000


def posterior(values, phi=None):
    """A shard posterior Dataset with variable ``a`` from ``(shard, chain, draw)`` values,
    and ``b`` along phi when ``phi`` values ``(shard, chain, draw, phi)`` are given."""
    variables = {"a": (("shard", "chain", "draw"), values)}
    if phi is not None:
        variables["b"] = (("shard", "chain", "draw", "phi"), phi)
    shape = values.shape
    coords = {
        "shard": np.arange(shape[0]),
        "chain": np.arange(shape[1]),
        "draw": np.arange(shape[2]),
    }
    if phi is not None:
        coords["phi"] = [0.0, 60.0]
    return xr.Dataset(variables, coords=coords)


def stats(energy, diverging=None):
    diverging = np.zeros(energy.shape, bool) if diverging is None else diverging
    return xr.Dataset(
        {
            "energy": (("shard", "chain", "draw"), energy),
            "diverging": (("shard", "chain", "draw"), diverging),
        },
        coords={"chain": np.arange(energy.shape[1])},
    )


def iid(rng, shards=1, *extra):
    return rng.standard_normal((shards, CHAINS, DRAWS, *extra))


def test_independent_draws_pass_every_threshold():
    rng = np.random.default_rng(0)
    figures = diagnostics.shard_diagnostics(
        posterior(iid(rng, 2), iid(rng, 2, 2)), stats(iid(rng, 2))
    )
    assert diagnostics.failures(figures) == {}
    assert list(figures["name"].values) == ["a", "b", "b"]
    np.testing.assert_array_equal(figures["phi"].values, [np.nan, 0.0, 60.0])
    assert figures["rhat"].dims == ("shard", "entry")
    assert figures["bfmi"].dims == ("shard", "chain")
    # iid draws: ESS close to the number of draws, R-hat close to 1
    np.testing.assert_allclose(figures["ess_bulk"], CHAINS * DRAWS, rtol=0.3)
    assert float(abs(figures["rhat"] - 1).max()) < 0.01


def test_bfmi_is_the_energy_formula():
    rng = np.random.default_rng(1)
    # a slowly varying energy (random walk plus noise) gives a small BFMI
    energy = np.cumsum(rng.standard_normal((1, CHAINS, DRAWS)), axis=-1) + iid(rng)
    figures = diagnostics.shard_diagnostics(posterior(iid(rng)), stats(energy))
    expected = np.mean(np.diff(energy[0], axis=-1) ** 2, axis=-1) / np.var(
        energy[0], axis=-1, ddof=1
    )
    np.testing.assert_allclose(figures["bfmi"].values[0], expected, rtol=1e-12)
    assert np.all(expected < 0.3)
    (found,) = diagnostics.failures(figures).values()
    assert any(f.startswith("BFMI of chain 0 = ") and "(needs >= 0.3)" in f for f in found)


def test_rhat_flags_chains_that_disagree():
    rng = np.random.default_rng(2)
    values = iid(rng, 2)
    values[1, 1] += 0.5  # shard 1: its second chain sits half a sd away
    figures = diagnostics.shard_diagnostics(posterior(values), stats(iid(rng, 2)))
    # the classic split R-hat (Gelman et al., BDA3) of normal draws, computed here
    halves = values[1].reshape(2 * CHAINS, DRAWS // 2)
    n = halves.shape[1]
    within = halves.var(axis=1, ddof=1).mean()
    between = n * halves.mean(axis=1).var(ddof=1)
    classic = np.sqrt(((n - 1) / n * within + between / n) / within)
    a = figures["rhat"].sel(shard=1).where(figures["name"] == "a", drop=True)
    assert float(a.squeeze()) == pytest.approx(classic, abs=0.005)
    failed = diagnostics.failures(figures)
    assert list(failed) == [1]
    assert failed[1][0].startswith(
        f"R-hat of a = {float(figures['rhat'][1, 0]):.4g} (needs < 1.01)"
    )
    n_failed = sum(f.startswith("R-hat of ") for f in failed[1])
    worst = int(np.nanargmax(figures["rhat"].values[1]))  # the line names the worst one
    label = figures["name"].values[worst]
    assert diagnostics.brief(figures)[1].startswith(
        f"R-hat >= 1.01 for {n_failed} of {figures.sizes['entry']} quantities, worst "
        f"{label} = {float(figures['rhat'][1, worst]):.4g}"
    )


def test_ess_of_an_autocorrelated_chain_is_that_of_ar1():
    rng = np.random.default_rng(3)
    rho = 0.95
    values = np.empty((1, CHAINS, 20 * DRAWS))
    values[..., 0] = rng.standard_normal((1, CHAINS))
    noise = rng.standard_normal(values.shape) * np.sqrt(1 - rho**2)
    for k in range(1, values.shape[-1]):
        values[..., k] = rho * values[..., k - 1] + noise[..., k]
    energy = rng.standard_normal(values.shape)
    figures = diagnostics.shard_diagnostics(posterior(values), stats(energy))
    # AR(1): ESS = n (1 - rho) / (1 + rho)
    expected = values[0].size * (1 - rho) / (1 + rho)
    assert float(figures["ess_bulk"].squeeze()) == pytest.approx(expected, rel=0.25)
    short = diagnostics.shard_diagnostics(
        posterior(values[..., :DRAWS]), stats(energy[..., :DRAWS])
    )
    (found,) = diagnostics.failures(short).values()
    assert any(f.startswith("ESS_bulk of a = ") and "needs >= 200" in f for f in found)


def ar1(rng, rho, draws):
    values = np.empty((1, CHAINS, draws))
    values[..., 0] = rng.standard_normal((1, CHAINS))
    noise = rng.standard_normal(values.shape) * np.sqrt(1 - rho**2)
    for k in range(1, draws):
        values[..., k] = rho * values[..., k - 1] + noise[..., k]
    return values


def test_draws_needed_by_chains_too_short_for_their_ess_make_them_pass():
    """AR(1) chains (rho 0.95) of 1000 draws have an ESS of ~50 of the 200 asked: the
    draws needed are those that make the same chains, continued, pass (ESS in proportion
    to the draws); none for chains that pass, diverge or disagree."""
    rng = np.random.default_rng(5)
    values = ar1(rng, 0.95, 20 * DRAWS)
    energy = rng.standard_normal(values.shape)

    def figures(n, diverging=None, shift=0.0):
        part = values[..., :n] + shift * np.arange(CHAINS)[:, None]
        flags = None if diverging is None else diverging[..., :n]
        return diagnostics.shard_diagnostics(posterior(part), stats(energy[..., :n], flags))

    short = figures(DRAWS)
    needed = diagnostics.draws_needed(short, DRAWS, 100 * DRAWS)
    least = min(float(short["ess_bulk"].min()), float(short["ess_tail"].min()))
    assert needed == int(np.ceil(DRAWS * diagnostics.EXTEND_MARGIN * 200 / least))
    assert 3 * DRAWS < needed < 20 * DRAWS
    assert diagnostics.failures(figures(needed)) == {}
    assert diagnostics.draws_needed(short, DRAWS, 2 * DRAWS) == 2 * DRAWS  # the cap
    assert diagnostics.draws_needed(figures(needed), needed, 100 * DRAWS) == needed
    diverging = np.zeros(values.shape, bool)
    diverging[0, 0, :100] = True
    assert diagnostics.draws_needed(figures(DRAWS, diverging), DRAWS, 100 * DRAWS) == DRAWS
    # chains a whole sd apart: R-hat far above 1.05, length does not cure that
    apart = figures(DRAWS, shift=3.0)
    assert float(apart["rhat"].max()) > diagnostics.RHAT_EXTENDABLE
    assert diagnostics.draws_needed(apart, DRAWS, 100 * DRAWS) == DRAWS


def test_divergences_above_one_percent_fail():
    rng = np.random.default_rng(4)
    diverging = np.zeros((2, CHAINS, DRAWS), bool)
    diverging[0, 0, :20] = True  # 20 of 2000 = 1 %: passes
    diverging[1, 1, :21] = True  # 21 of 2000: fails
    figures = diagnostics.shard_diagnostics(posterior(iid(rng, 2)), stats(iid(rng, 2), diverging))
    assert figures["divergences"].values.tolist() == [20, 21]
    assert diagnostics.failures(figures) == {
        1: ["21 divergent transitions = 1.05 % of the draws (needs <= 1 %)"]
    }
    assert diagnostics.brief(figures) == {
        1: "21 divergent transitions = 1.05 % of the draws (needs <= 1 %)"
    }


def test_thresholds_travel_with_the_figures():
    rng = np.random.default_rng(5)
    loose = diagnostics.Thresholds(
        rhat_max=2.0, ess_per_chain_min=1.0, bfmi_min=0.0, divergence_max=1.0
    )
    values = iid(rng)
    values[0, 1] += 3.0
    figures = diagnostics.shard_diagnostics(posterior(values), stats(iid(rng)), loose)
    assert diagnostics.thresholds_of(figures) == loose
    assert diagnostics.failures(figures) == {}
    strict = diagnostics.shard_diagnostics(posterior(values), stats(iid(rng)))
    assert diagnostics.thresholds_of(strict) == diagnostics.THRESHOLDS
    assert list(diagnostics.failures(strict)) == [0]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_figures_fail():
    rng = np.random.default_rng(6)
    values = iid(rng)
    values[0] = 1.0  # a chain that never moves: R-hat and ESS are undefined
    figures = diagnostics.shard_diagnostics(posterior(values), stats(iid(rng)))
    (found,) = diagnostics.failures(figures).values()
    assert any(f.startswith("R-hat of a = nan") for f in found)


def test_hdi_of_normal_draws():
    rng = np.random.default_rng(7)
    draws = xr.Dataset({"a": (("chain", "draw"), rng.standard_normal((2, 50_000)))})
    lower, higher = diagnostics.hdi(draws, 0.94)["a"].values
    # the shortest interval holding 94 % of a standard normal is +-1.8808
    assert higher - lower == pytest.approx(2 * 1.8808, abs=0.02)
    inside = (draws["a"] >= lower) & (draws["a"] <= higher)
    assert float(inside.mean()) == pytest.approx(0.94, abs=1e-3)
    with pytest.raises(OptionError, match="prob"):
        diagnostics.hdi(draws, 1.5)


def test_the_verdict_table_holds_each_shards_worst_figure_and_agrees_with_failures():
    rng = np.random.default_rng(4)
    values = iid(rng, 2)
    values[1, 1] += 0.5  # shard 1 fails its R-hat
    figures = diagnostics.shard_diagnostics(posterior(values, iid(rng, 2, 2)), stats(iid(rng, 2)))
    table = diagnostics.verdict(figures)
    assert list(table["shard"]) == [0, 1]
    np.testing.assert_array_equal(table["max R-hat"], figures["rhat"].max("entry").values)
    np.testing.assert_array_equal(table["min ESS tail"], figures["ess_tail"].min("entry").values)
    np.testing.assert_array_equal(table["min BFMI"], figures["bfmi"].min("chain").values)
    assert list(table["max R-hat ok"]) == [True, False]
    failed = diagnostics.failures(figures)
    assert list(table["verdict"]) == ["fail" if s in failed else "pass" for s in (0, 1)]
