"""Starts read off the data, the labelling convention and the resolvable velocity."""

import numpy as np
import pytest

import heterodyne as hd
from heterodyne import model, starts
from heterodyne.parameters import PHYSICS_NAMES

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}


def first_candidate(ds, p=None):
    p = hd.Parameters() if p is None else p
    vector = starts.candidates(ds, p, 1, starts.resolvable_velocity(ds))[0]
    return dict(zip(PHYSICS_NAMES, vector, strict=True))


@pytest.mark.parametrize(
    ("truth", "options"),
    [
        # a diffusing reference, strong flow, three angles
        (TRUTH, {"n_frames": 100, "phi": [-45.0, 0.0, 45.0]}),
        # a static reference, flow at 0.7 pi per frame, six angles
        (
            {"D0_ref": 0.0, "D0_sample": 5e3, "v0": 2200.0, "f0": 0.6, "phi0": -50.0},
            {"n_frames": 120, "phi": [-75.0, -45.0, -15.0, 15.0, 45.0, 75.0]},
        ),
        # slow decays and many turns of the oscillation: 400 frames, two angles
        (
            {"D0_ref": 233.0, "D0_sample": 877.0, "v0": 847.0, "f0": 0.31, "phi0": -58.9},
            {"n_frames": 400, "phi": [-75.0, 75.0], "q": 0.02},
        ),
        # weak flow: less than a turn while the sample decays
        (
            {"D0_ref": 500.0, "D0_sample": 3e4, "v0": 150.0, "f0": 0.7, "phi0": 10.0},
            {"n_frames": 150, "phi": [-30.0, 30.0, 60.0, 90.0]},
        ),
    ],
)
def test_the_start_lies_near_the_truth_across_the_ranges(truth, options):
    ds = hd.simulate(truth, noise=0.01, seed=4, **options)
    start = first_candidate(ds)
    q2 = float(ds["q"]) ** 2
    span = float(ds["t1"][-1] - ds["t1"][0])
    # rates as decays over the record: within a factor 1.5, or both below 0.1
    for name in ("D0_ref", "D0_sample"):
        fitted, true = q2 * span * start[name], q2 * span * truth[name]
        assert max(fitted, true) < 0.1 or 1 / 1.5 < fitted / true < 1.5, name
    assert abs(start["f0"] - truth["f0"]) < 0.1
    # the per-angle frequencies q v0 |cos(phi - phi0)| are what the data fix
    phi = np.deg2rad(ds["phi"].values)
    fitted = start["v0"] * np.abs(np.cos(phi - np.deg2rad(start["phi0"])))
    true = truth["v0"] * np.abs(np.cos(phi - np.deg2rad(truth["phi0"])))
    np.testing.assert_allclose(fitted, true, atol=0.1 * truth["v0"])


def test_starts_follow_the_convention_and_keep_given_values():
    ds = hd.simulate(TRUTH, n_frames=100, phi=[-45.0, 0.0, 45.0], noise=0.01, seed=1)
    found = starts.candidates(ds, hd.Parameters(), 3, starts.resolvable_velocity(ds))
    # clean data: the polished candidates meet in one start, kept once
    assert len(found) == 1
    for vector in found:
        ref, sample = starts.transport(vector, ds["t1"].values)
        assert ref < sample / 1.4  # never on the symmetry plane (equal rates)
    given = first_candidate(ds, hd.Parameters(phi0=25.0, D0_ref=2500.0))
    assert given["phi0"] == 25.0 and given["D0_ref"] == 2500.0


def test_exchange_is_exact_for_a_constant_fraction():
    rng = np.random.default_rng(7)
    t = 0.1 + 0.1 * np.arange(60)
    p = hd.Parameters()
    for _ in range(5):
        physics = p.physics_values()
        physics[[0, 1, 3, 4]] = [rng.uniform(2e4, 5e4), rng.uniform(-0.3, 0.3), 3e3, 0.1]
        physics[[6, 9, 13]] = [rng.uniform(100, 900), rng.uniform(0.1, 0.9), 30.0]
        mapped, exact = starts.exchange(physics, p, t)
        assert exact
        ref, sample = starts.transport(mapped, t)
        assert ref < sample
        phi = np.array([0.0, 60.0])
        before = model.c2_grid(physics, 0.4, 1.0, t, phi, 0.01)
        after = model.c2_grid(mapped, 0.4, 1.0, t, phi, 0.01)
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-13)
    slower = p.physics_values()
    slower[[0, 3]] = [1e3, 1e4]
    assert starts.exchange(slower, p, t) is None


def test_a_fit_that_ends_exchanged_is_reported_relabelled():
    ds = hd.simulate(TRUTH, n_frames=80, phi=[-45.0, 0.0, 45.0], noise=0.01, seed=2)
    swapped = hd.Parameters(D0_ref=2e4, D0_sample=3e3, f0=0.6, v0=800.0, phi0=20.0)
    swapped["f1"].vary = False  # a constant fraction: the exchange is exact
    result = hd.fit_nlsq(ds, swapped, multistart=0, progress=False)
    assert result.info["exchanged"] == "exact"
    for name, truth in TRUTH.items():
        assert abs(result.value(name) - truth) < 4 * result.error(name), name
    assert "relabelled" in result.report()
    # relabelled with its own contrast and offset: the cost and the model are the fit's
    direct = hd.fit_nlsq(ds, hd.Parameters(TRUTH), fix=["f1"], multistart=0, progress=False)
    assert result.chi2 == pytest.approx(direct.chi2, rel=1e-6)
    np.testing.assert_allclose(result.model["c2"], direct.model["c2"], atol=1e-6)


def test_with_a_fraction_law_the_exchanged_fit_is_refitted_in_the_convention():
    truth = {**TRUTH, "f1": 0.05}
    ds = hd.simulate(truth, n_frames=80, phi=[-45.0, 0.0, 45.0], noise=0.01, seed=3)
    swapped = hd.Parameters(D0_ref=2e4, D0_sample=3e3, f0=0.6, f1=-0.05, v0=800.0, phi0=20.0)
    result = hd.fit_nlsq(ds, swapped, multistart=0, progress=False)
    assert result.info["exchanged"] in ("refit", "")
    ref, sample = starts.transport(
        np.array([float(result.params[n]) for n in PHYSICS_NAMES]), ds["t1"].values
    )
    assert ref < sample
    for name, value in truth.items():
        assert abs(result.value(name) - value) < 4 * result.error(name), name


ALIAS = {"v0": 600.0, "phi0": -12.0, "D0_ref": 1e3, "D0_sample": 1e4, "f0": 0.4}


def alias_data():
    return hd.simulate(
        ALIAS, n_frames=80, dt=0.1, q=0.01, phi=[0.0, 60.0, 120.0], noise=0.01, seed=0
    )


def test_the_default_velocity_bound_is_what_the_frames_resolve():
    ds = alias_data()
    result = hd.fit_nlsq(ds, progress=False)
    assert float(result.settings["max"].sel(name="v0")) == pytest.approx(np.pi / (0.01 * 0.1))
    for name, truth in ALIAS.items():
        assert abs(result.value(name) - truth) < 4 * result.error(name), name
    assert "3142" in result.report()  # the bound is stated in the table


def test_an_aliased_velocity_fits_as_well_and_is_failed():
    """The issue's case: v0 = 159 636 A/s and phi0 = 18.5 fit these frames as well as the
    truth (the phase steps differ by whole turns at every angle)."""
    ds = alias_data()
    p = hd.Parameters(**{**ALIAS, "v0": 159_636.0, "phi0": 18.5})
    p["v0"].max = 1e6  # a bound the user set: the data's default no longer applies
    result = hd.fit_nlsq(ds, p, multistart=0, progress=False)
    truth = hd.fit_nlsq(ds, hd.Parameters(**ALIAS), multistart=0, progress=False)
    assert result.value("v0") > 1e5
    assert result.chi2 == pytest.approx(truth.chi2, rel=1e-3)
    assert result.verdict.status == "fail"
    assert any("aliased" in reason for reason in result.verdict.reasons)
    assert truth.verdict.status == "ok"


def test_given_values_and_bounds_are_remembered_and_round_trip(tmp_path):
    p = hd.Parameters(v0=400.0)
    assert p["v0"].given and not p["D0_ref"].given
    p["D0_ref"].max = 1000.0
    p["f1"].vary = False
    path = p.to_json(tmp_path / "p.json")
    again = hd.Parameters.from_json(path)
    assert again["v0"].given and again["v0"].value == 400.0
    assert not again["D0_ref"].given and again["D0_ref"].max_given
    assert not again["v0"].max_given and again["v0"].max == p["v0"].max
    assert again["f1"].vary is False
    (tmp_path / "bad.json").write_text('{"v0": {"speed": 3}}')
    with pytest.raises(hd.ParameterError, match="v0"):
        hd.Parameters.from_json(tmp_path / "bad.json")
