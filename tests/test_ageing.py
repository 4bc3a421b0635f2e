"""Age scans: windows along the diagonal follow a power law in time within their errors,
a change the law cannot express is flagged, windows share their compiled code."""

from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from scipy.stats import chi2 as chi2_distribution

import heterodyne as hd
from heterodyne import model
from heterodyne.ageing import QUANTITIES, law_check
from heterodyne.examples import AGEING_TRUTH
from tests._work import Compiles

# Rates and velocity that grow as t^0.5 from 10 s to 70 s, at speckle noise with photon
# counting: the errors the scan reports are then the speckle errors that the honest-error
# benchmark validates.
POWER_LAW = AGEING_TRUTH


def power_law_data(seed):
    return hd.simulate(
        POWER_LAW, n_frames=600, dt=0.1, t_start=10.0, phi=[0.0, 90.0],
        noise="speckle", n_pixels=1000, counts=1.0, seed=seed,
    )  # fmt: skip


def test_on_a_power_law_in_time_the_points_follow_the_true_law_within_their_errors():
    chi2, dof = 0.0, 0
    for seed in (1, 2, 3):
        scan = hd.age_scan(
            power_law_data(seed), window=100, step=100, law=hd.Parameters(**POWER_LAW),
            progress=False,
        )  # fmt: skip
        assert scan.sizes["age"] == 6
        np.testing.assert_allclose(scan["age"], 10.0 + 0.1 * (100 * np.arange(6) + 49.5))
        check = law_check(scan)
        assert (check["status"] == "follows the law").all(), check
        chi2 += check["chi2"].sum()
        dof += check["windows"].sum()
        # the scan resolves the ageing: the sample rate and the velocity change across
        # the scan by many times their errors, so following the law is not a matter of
        # large error bars
        for name in ("rate_sample", "velocity"):
            law = scan[f"{name}_law"].values
            assert abs(law[-1] - law[0]) > 5 * np.median(scan[f"{name}_stderr"].values)
    # chi2 of all points of three seeds against the true law: honest errors put it in
    # the central 99.8 % of its distribution (47 on 64 windows when written)
    p = chi2_distribution.sf(chi2, dof)
    assert dof >= 60
    assert 1e-3 < p < 0.999, (chi2, dof)


def test_the_points_follow_the_law_of_a_whole_matrix_fit():
    ds = power_law_data(1)
    whole = hd.fit_nlsq(ds, hd.Parameters(**POWER_LAW), progress=False)
    scan = hd.age_scan(ds, window=100, step=100, law=whole, progress=False)
    check = law_check(scan)
    assert set(check["quantity"]) == set(QUANTITIES)
    assert (check["status"] == "follows the law").all(), check
    assert scan.attrs["law_alpha_sample"] == pytest.approx(whole.value("alpha_sample"))
    assert "[[Law]] followed" in hd.ageing.report(scan)


def step_change_data(seed=0):
    """A sample rate that triples at mid-time: c2 from the model's own formula
    (:func:`heterodyne.model.correlation`) on frame integrals of a piecewise rate, plus
    independent Gaussian noise."""
    n, dt, t0, q, phi = 400, 0.1, 10.0, 0.01, np.array([0.0, 90.0])
    t = t0 + dt * np.arange(n)
    rate_sample = np.where(t < t[n // 2], 2e3, 6e3)
    frames = model.FrameIntegrals(
        t=t,
        P_ref=np.asarray(model.cumulative_trapezoid(np.full(n, 300.0), t)),
        P_sample=np.asarray(model.cumulative_trapezoid(rate_sample, t)),
        V=np.asarray(model.cumulative_trapezoid(np.full(n, 300.0), t)),
        x_sample=np.full(n, 0.4),
    )
    rows = jax.tree.map(lambda f: f[:, None], frames)
    cols = jax.tree.map(lambda f: f[None, :], frames)
    q_parallel = q * np.cos(np.deg2rad(phi - 20.0))
    c2 = np.stack([1.0 + 0.5 * np.asarray(model.correlation(rows, cols, q, k)) for k in q_parallel])
    rng = np.random.default_rng(seed)
    for matrix in c2:
        upper = np.triu(rng.standard_normal((n, n)) * 0.01)
        matrix += upper + np.triu(upper, 1).T
    return hd.from_arrays(c2, t, phi, q)


@pytest.fixture(scope="module")
def step_scan():
    return hd.age_scan(step_change_data(), window=50, step=50, progress=False)


def test_a_step_change_of_the_sample_rate_is_flagged_as_violating_the_law(step_scan):
    scan = step_scan
    check = law_check(scan).set_index("quantity")
    # no power law in time follows a step: the whole fit's law misses the windows
    assert check.loc["rate_sample", "status"] == "violated", check
    assert check.loc["rate_sample", "p"] < 1e-6
    text = hd.ageing.report(scan)
    assert "VIOLATED by rate_sample" in text
    # each window that is not ok is listed with its reasons
    not_ok = scan["reasons"].values[scan["verdict"].values != "ok"]
    assert not_ok.size
    assert all(reasons in text for reasons in not_ok)
    # while the windows themselves read the two rates, each within its errors
    early, late = scan["t_last"] < 30.0, scan["t_first"] >= 30.0
    for where, truth in ((early, 2e3), (late, 6e3)):
        values = scan["rate_sample"].values[where.values]
        errors = scan["rate_sample_stderr"].values[where.values]
        assert np.all(np.abs(values - truth) < 4 * errors), (values, errors)


def test_the_age_plot_draws_the_points_the_law_read_by_the_windows_and_the_law(step_scan):
    layout = hd.plot.age(step_scan)
    rates, velocity, fraction = layout
    assert "J_s violated" in rates.opts.get().kwargs["title"]
    assert "v follows the law" in velocity.opts.get().kwargs["title"]
    by_label = {element.label: element for element in rates}
    np.testing.assert_array_equal(by_label["J_s"].dimension_values(1), step_scan["rate_sample"])
    np.testing.assert_array_equal(
        by_label["J_s law, read by a window"].dimension_values(1), step_scan["rate_sample_law"]
    )
    # the law itself, D0 t^alpha + D_offset, from the whole fit's parameters
    curve = by_label["J_s law"]
    t = curve.dimension_values(0)
    a = step_scan.attrs
    np.testing.assert_allclose(
        curve.dimension_values(1),
        a["law_D0_sample"] * t ** a["law_alpha_sample"] + a["law_D_offset_sample"],
        rtol=1e-12,
    )
    assert t.min() == step_scan["t_first"].min() and t.max() == step_scan["t_last"].max()
    with pytest.raises(hd.OptionError, match="age_scan"):
        hd.plot.age(step_scan.isel(age=0).drop_dims("phi"))


def test_windows_share_one_compilation_and_a_rerun_resumes_from_the_checkpoint(tmp_path):
    law = hd.Parameters(**POWER_LAW)
    small = hd.simulate(POWER_LAW, n_frames=120, t_start=10.0, phi=[0.0, 90.0], noise=0.01)
    hd.age_scan(small, window=100, law=law, progress=False)  # compiles (the window size of
    # the tests above: in this file, their programs serve)
    ds = hd.simulate(POWER_LAW, n_frames=300, t_start=10.0, phi=[0.0, 90.0], noise=0.01, seed=2)
    with Compiles() as compiles:
        scan = hd.age_scan(ds, window=100, step=50, law=law, checkpoint=tmp_path, progress=False)
    # five windows of new data, each fitted twice, with the programs of the first scan
    assert scan.sizes["age"] == 5 and scan.attrs["fitted"] == 10
    assert compiles.names == []
    again = hd.age_scan(ds, window=100, step=50, law=law, checkpoint=tmp_path, progress=False)
    assert again.attrs["fitted"] == 0 and again.attrs["from_checkpoint"] == 10
    for name in QUANTITIES:
        np.testing.assert_array_equal(again[name], scan[name])
    with ThreadPoolExecutor(2) as pool:
        there = hd.age_scan(ds, window=100, step=50, law=law, executor=pool, progress=False)
    for name in QUANTITIES:
        np.testing.assert_allclose(there[name], scan[name], rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 2}, "window"),
        ({"window": 500}, "window"),
        ({"window": 20.0}, "window"),
        ({"window": 20, "step": 0}, "step"),
        ({"window": 20, "errors": "white"}, "errors"),
        ({"window": 20, "law": "power"}, "law"),
        ({"window": 20, "fix": ["v0"]}, "fix"),
        ({"window": 20, "executor": "threads"}, "executor"),
        ({"window": 20, "loss": "huber"}, "loss"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, match):
    ds = hd.simulate(POWER_LAW, n_frames=60, t_start=10.0, noise=0.01)
    with Compiles() as compiles, pytest.raises(hd.OptionError, match=match):
        hd.age_scan(ds, progress=False, **kwargs)
    assert compiles.names == []


def test_a_law_fitted_to_other_frames_is_refused():
    ds = hd.simulate(POWER_LAW, n_frames=60, t_start=10.0, noise=0.01)
    other = hd.fit_nlsq(hd.select(ds, frames=slice(0, 50)), progress=False)
    with pytest.raises(hd.OptionError, match="other frames"):
        hd.age_scan(ds, window=20, law=other, progress=False)
