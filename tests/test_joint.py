"""Multi-q Datasets and the joint fit across q-bins (heterodyne.qbins, heterodyne.joint)."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import heterodyne as hd
from heterodyne import joint, model, qbins
from heterodyne.parameters import PHYSICS_INDEX

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
FIXED = (
    "alpha_ref", "alpha_sample", "beta", "f1", "f2", "f3",
    "D_offset_ref", "D_offset_sample", "v_offset",
)  # fmt: skip
Q = [0.006, 0.01, 0.014]
ANGLES = [[0.0, 90.0], [-45.0, 0.0, 45.0], [0.0, 45.0]]


def _params():
    p = hd.Parameters()
    for name in FIXED:
        p[name].vary = False
    return p


@pytest.fixture(scope="module")
def multi():
    return hd.simulate(TRUTH, q=Q, phi=ANGLES, n_frames=40, noise=0.01, store_sigma=True, seed=3)


@pytest.fixture(scope="module")
def fitted(multi):
    return hd.fit_nlsq(multi, _params(), progress=False)


def test_layout_holds_each_bin_as_simulated_alone(multi):
    assert multi["c2"].dims == ("q", "phi", "t1", "t2")
    np.testing.assert_array_equal(multi["phi"].values, [-45.0, 0.0, 45.0, 90.0])
    np.testing.assert_array_equal(
        qbins.present(multi).values,
        [[False, True, False, True], [True, True, True, False], [False, True, True, False]],
    )
    for k, (q, angles) in enumerate(zip(Q, ANGLES, strict=True)):
        one = hd.select(multi, q=q)
        seed = int(np.random.SeedSequence([3, k]).generate_state(1)[0])
        alone = hd.simulate(
            TRUTH, q=q, phi=angles, n_frames=40, noise=0.01, store_sigma=True, seed=seed
        )
        assert one["c2"].dims == ("phi", "t1", "t2") and float(one["q"]) == q
        np.testing.assert_array_equal(one["phi"].values, angles)
        np.testing.assert_array_equal(one["c2"].values, alone["c2"].values)
        hd.validate(one)


def test_multi_q_netcdf_round_trip_and_load_by_q(multi, tmp_path):
    path = hd.to_netcdf(multi, tmp_path / "multi.nc")
    xr.testing.assert_identical(hd.load(path), multi)
    xr.testing.assert_identical(hd.load(path, q=0.01), hd.select(multi, q=0.01))
    two = hd.load(path, q=[0.014, 0.006])
    np.testing.assert_array_equal(two["q"].values, [0.006, 0.014])
    xr.testing.assert_equal(hd.select(two, q=0.014)["c2"], hd.select(multi, q=0.014)["c2"])


def test_single_q_functions_refuse_a_multi_q_dataset_with_the_remedy(multi):
    for call in (lambda: hd.explore(multi), lambda: hd.plot.c2(multi), lambda: hd.validate(multi)):
        with pytest.raises(hd.DataError, match=r"3 q-bins .*hd\.select\(ds, q=\.\.\.\)"):
            call()
    with pytest.raises(hd.OptionError, match=r"init of a multi-q Dataset must be a JointResult"):
        hd.fit_cmc(multi, hd.fit_nlsq(hd.select(multi, q=0.01), _params(), progress=False))
    with pytest.raises(hd.OptionError, match="pick it first"):
        hd.select(multi, phi=0.0)


def test_survey_of_a_multi_q_dataset_fits_each_bin_alone(multi):
    out = hd.survey(multi, params=_params(), progress=False)
    np.testing.assert_array_equal(out["q"].values, Q)
    alone = hd.fit_nlsq(hd.select(multi, q=0.01), _params(), progress=False)
    assert float(out["D0_sample"].sel(q=0.01)) == pytest.approx(alone.value("D0_sample"))


def _independent_covariance(ds, result, names):
    """``(sum_k J_k^T J_k / sigma²)^-1`` over the physics ``names`` and every bin's
    contrast and offset, with ``J_k`` from ``jax.jacfwd`` of the meshgrid model of each
    bin at the joint values: the Fisher information of the joint problem, built apart
    from the structured normal equations."""
    physics = np.array([result.value(n) for n in hd.parameters.PHYSICS_NAMES])
    columns = [PHYSICS_INDEX[n] for n in names]
    blocks, sizes = [], []
    for one in qbins.bins(ds):
        q, phi, t = float(one["q"]), one["phi"].values, one["t1"].values
        contrast = np.array([result.value("contrast", q=q, phi=a) for a in phi])
        offset = np.array([result.value("offset", q=q, phi=a) for a in phi])
        i, j = np.triu_indices(t.size, 1)

        def c2(y, phi=phi, t=t, q=q, i=i, j=j):
            full = jnp.asarray(physics).at[jnp.asarray(columns)].set(y[: len(columns)])
            n = phi.size
            grid = model.c2_grid(full, y[len(columns) : len(columns) + n], y[-n:], t, phi, q)
            return grid[:, i, j].ravel()

        y = np.concatenate([physics[columns], contrast, offset])
        jac = np.asarray(jax.jacfwd(c2)(jnp.asarray(y))) / float(one["sigma"].values[0, 0, 1])
        blocks.append(jac.T @ jac)
        sizes.append(2 * phi.size)
    p = len(columns)
    total = p + sum(sizes)
    info = np.zeros((total, total))
    start = p
    for block, size in zip(blocks, sizes, strict=True):
        index = np.r_[np.arange(p), start + np.arange(size)]
        info[np.ix_(index, index)] += block
        start += size
    return np.linalg.inv(info)[:p, :p]


def test_joint_errors_are_the_summed_fisher_information(multi, fitted):
    names = ["D0_ref", "D0_sample", "v0", "f0", "phi0"]
    expected = np.sqrt(np.diag(_independent_covariance(multi, fitted, names)))
    np.testing.assert_allclose([fitted.error(n) for n in names], expected, rtol=1e-6)


def test_error_reduction_is_what_the_bins_allow(fitted):
    """The joint stderr equals the inverse-variance combination of the bins' own fits
    (each bin's physics covariance, its scaling profiled out), ``(sum_k C_k^-1)^-1/2``,
    and is below the best single bin's by that factor."""
    names = fitted.varied_physics
    information = sum(
        np.linalg.inv(r.covariance.values[: len(names), : len(names)]) for r in fitted.separate
    )
    expected = np.sqrt(np.diag(np.linalg.inv(information)))
    for k, name in enumerate(names):
        best = min(r.error(name) for r in fitted.separate)
        joint = fitted.error(name)
        # the bins' own optima differ slightly from the joint one, and so their Jacobians
        np.testing.assert_allclose(joint, expected[k], rtol=0.05)
        assert best / joint == pytest.approx(best / expected[k], rel=0.05)
        assert best / joint > 1.0


def test_joint_fit_recovers_the_truth_and_each_bin_agrees(multi, fitted):
    assert fitted.success
    for name, value in TRUTH.items():
        assert abs(fitted.value(name) - value) < 4 * fitted.error(name), name
    assert not fitted.inconsistent()
    assert np.all(np.abs(fitted.consistency["z"].values) < 4)
    for q, angles in zip(Q, ANGLES, strict=True):
        for phi in angles:
            assert fitted.value("contrast", q=q, phi=phi) == pytest.approx(0.5, abs=0.02)
    assert np.isnan(fitted.params["contrast"].sel(q=0.006, phi=-45.0))
    # the decay rates scale as q² and the phase rate as q (the joint law)
    rates = fitted.rates
    q = rates["q"].values
    np.testing.assert_allclose(rates["decay_sample_joint"] / q**2, TRUTH["D0_sample"], rtol=0.02)
    np.testing.assert_allclose(rates["phase_joint"] / q, TRUTH["v0"], rtol=0.02)
    for name in ("decay_sample", "phase"):
        deviation = (rates[name] - rates[f"{name}_joint"]) / rates[f"{name}_stderr"]
        assert np.all(np.abs(deviation) < 4), name
    text = fitted.report()
    assert "[[Consistency]]" in text and "q 0.014" in text


def test_a_bin_that_breaks_the_q_independence_is_flagged():
    parts = [
        hd.simulate(TRUTH, q=0.006, phi=[0, 90], n_frames=40, noise=0.005, seed=1),
        hd.simulate(TRUTH, q=0.01, phi=[0, 90], n_frames=40, noise=0.005, seed=2),
        # diffusion that does not follow q²: twice as fast in the last bin
        hd.simulate({**TRUTH, "D0_sample": 4e4}, q=0.014, phi=[0, 90], n_frames=40,
                    noise=0.005, seed=3),
    ]  # fmt: skip
    result = hd.fit_nlsq(qbins.combine(parts), _params(), progress=False)
    assert any(f.startswith("D0_sample at q = 0.014") for f in result.inconsistent())


def test_joint_result_round_trips(fitted, tmp_path):
    path = fitted.to_netcdf(tmp_path / "joint.nc")
    back = hd.open_result(path)
    for name in ("params", "stderr", "stderr_nominal", "covariance", "data", "settings"):
        xr.testing.assert_identical(getattr(back, name), getattr(fitted, name))
    assert back.info == fitted.info
    assert len(back.bins) == len(fitted.bins) == 3
    xr.testing.assert_identical(back.consistency, fitted.consistency)
    xr.testing.assert_identical(back.bins[1].model, fitted.bins[1].model)


def test_speckle_errors_of_a_joint_fit_reduce_to_the_nominal_ones_for_independent_noise():
    """Independent noise per pair has no shared-frame part: the speckle error model's
    sandwich over the bins gives the nominal errors back (to its scale estimates)."""
    ds = hd.simulate(TRUTH, q=[0.006, 0.012], phi=[0.0, 90.0], n_frames=40, noise=0.01, seed=5)
    result = hd.fit_nlsq(ds, _params(), errors="speckle", separate=False, progress=False)
    for name in ("D0_sample", "v0", "phi0"):
        nominal = float(result.stderr_nominal[name])
        assert result.error(name) == pytest.approx(nominal, rel=0.25), name
    with pytest.raises(hd.OptionError, match="separate=True"):
        _ = result.consistency


# Joint CMC: two bins of the same frames with different contrasts (and different angles),
# sigma stored; short chains (their convergence is the CMC tests' business).
CMC_TRUTH = {**TRUTH, "D0_ref": 1e4}
CMC_CONTRAST = (0.3, 0.5)


@pytest.fixture(scope="module")
def joint_cmc():
    parts = [
        hd.simulate(
            CMC_TRUTH,
            q=q,
            phi=phi,
            contrast=c,
            n_frames=24,
            noise=0.02,
            store_sigma=True,
            seed=4 + k,
        )  # fmt: skip
        for k, (q, phi, c) in enumerate(
            zip([0.008, 0.012], [[0.0, 60.0], [0.0, 45.0]], CMC_CONTRAST, strict=True)
        )
    ]
    ds = qbins.combine(parts)
    init = hd.fit_nlsq(ds, _params(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains may fail a diagnostic
        result = hd.fit_cmc(ds, init, shards=1, warmup=150, samples=300, progress=False)
    return ds, init, result


def test_joint_cmc_posterior_agrees_with_the_joint_nlsq(joint_cmc):
    """With sigma given and a prior 10 stderr wide, the joint posterior is Gaussian about
    the joint least-squares solution with the joint covariance (the likelihood is the
    Gaussian of the same residuals, the joint information the sum of the bins'). One shard
    per bin: the consensus of the two bins' shards is then the joint product itself for
    Gaussian shards (halves of 24-frame bins are far from Gaussian: their consensus moves
    the means by up to 0.9 sd, as on one bin alone). The Monte Carlo error of a mean over
    ~300 effective draws is ~0.06 sd, that of an sd ~5 %: means within 0.5 sd, sds within
    20 % (over 5 seeds: at most 0.31 sd, sd ratios 0.91 to 1.05)."""
    ds, init, result = joint_cmc
    assert result.info["shards"] == 2 and [b.info["shards"] for b in result.bins] == [1, 1]
    for name in ("D0_ref", "D0_sample", "v0", "f0", "phi0"):
        assert abs(result.value(name) - init.value(name)) < 0.5 * init.error(name), name
        assert result.error(name) == pytest.approx(init.error(name), rel=0.2), name
        # every bin carries the same joint draws of the physics
        for b in result.bins:
            assert b.value(name) == result.value(name)
    for k, truth in enumerate(CMC_CONTRAST):
        q = float(ds["q"][k])
        for phi in hd.select(ds, q=q)["phi"].values:
            mean, sd = (
                result.value("contrast", q=q, phi=phi),
                result.error("contrast", q=q, phi=phi),
            )
            assert abs(mean - init.value("contrast", q=q, phi=phi)) < 0.5 * sd
            assert sd == pytest.approx(init.error("contrast", q=q, phi=phi), rel=0.2)
            assert abs(mean - truth) < 4 * sd, (q, phi)
    # the angles a bin lacks stay empty
    np.testing.assert_array_equal(
        np.isnan(result.params["contrast"].values), np.isnan(init.params["contrast"].values)
    )


def test_joint_cmc_shards_sample_the_tempered_joint_product(joint_cmc):
    """Each shard's prior is tempered by 1/S over all shards for the physics and by 1/S_k
    over its own bin's shards for its bin's quantities, so the product over all shards is
    the joint prior once."""
    _, _, result = joint_cmc
    total = sum(b.info["shards"] for b in result.bins)
    # every bin samples the physics in the same coordinates (bounds, log or linear space)
    physics = [
        b.prior.isel(entry=np.isin(b.prior["name"], hd.parameters.PHYSICS_NAMES))
        for b in result.bins
    ]
    for name in ("low", "high", "space", "loc", "scale"):
        np.testing.assert_array_equal(physics[0][name].values, physics[1][name].values)
    for b in result.bins:
        power = b.prior["power"].to_series()
        physics = np.isin(b.prior["name"].values, hd.parameters.PHYSICS_NAMES)
        np.testing.assert_allclose(power[physics], 1.0 / total)
        np.testing.assert_allclose(power[~physics], 1.0 / b.info["shards"])


def test_joint_cmc_netcdf_round_trip(joint_cmc, tmp_path):
    _, _, result = joint_cmc
    back = hd.open_result(result.to_netcdf(tmp_path / "joint_cmc.nc"))
    xr.testing.assert_identical(back.posterior, result.posterior)
    # the same draws; their means summed in another order
    xr.testing.assert_allclose(back.params, result.params, rtol=1e-12)
    for one, other in zip(back.bins, result.bins, strict=True):
        xr.testing.assert_identical(one.diagnostics, other.diagnostics)
    assert back.report().replace(" ", "") == result.report().replace(" ", "")
    # a fresh process, which has imported no result module, reads it too
    path = str(tmp_path / "joint_cmc.nc")
    script = f"import heterodyne as hd; print(hd.open_result({path!r}).value('v0'))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout) == result.value("v0")


@pytest.mark.slow
def test_joint_cmc_resumes_from_its_checkpoints_and_corrects_for_speckle(tmp_path):
    """No sigma (a noise level per bin and angle sampled), errors="speckle" from the
    joint fit: every shard of every bin is kept; a rerun reads all of them back and gives
    the same draws; each bin carries its own error-model scales and uncorrected draws."""
    ds = hd.simulate(
        CMC_TRUTH, q=[0.008, 0.012], phi=[[0.0, 60.0], [0.0, 45.0]], n_frames=24, noise=0.02, seed=4
    )
    init = hd.fit_nlsq(ds, _params(), errors="speckle", progress=False)
    options = {"shards": 2, "warmup": 50, "samples": 60, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chains this short fail their diagnostics
        first = hd.fit_cmc(ds, init, checkpoint=tmp_path, **options)
        again = hd.fit_cmc(ds, init, checkpoint=tmp_path, **options)
    assert (first.info["from_checkpoint"], again.info["from_checkpoint"]) == (0, 4)
    assert len(list(tmp_path.glob("*.npz"))) == 4
    xr.testing.assert_identical(again.posterior, first.posterior)
    assert isinstance(first, hd.JointCMCResult) and first.info["errors"] == "speckle"
    assert first.posterior["noise"].dims == ("chain", "draw", "q", "phi")
    for b in first.bins:
        assert np.isfinite(b.info["speckle_kappa"])
        assert "uncorrected_posterior" in b.posterior.groups()


def _bins_with_correlated_noise(n_physics, seed):
    """Three bins' ``(H_k, M_k, columns)``: a random design ``J_k`` over the shared physics
    and two scaling entries of its own, partly along a few shared frames, and the pairs'
    noise correlated by those frames (``Sigma_k``, a shared part of a size that differs by
    bin), ``M_k = J_k^T Sigma_k J_k``."""
    rng = np.random.default_rng(seed)
    hessians, meats, columns, designs, noises = [], [], [], [], []
    for k, shared in enumerate((0.2, 1.5, 4.0)):
        frames = rng.normal(size=(30, 6))
        design = rng.normal(size=(30, n_physics + 2)) + frames @ rng.normal(size=(6, n_physics + 2))
        noise = (1.0 + k) * np.eye(30) + shared * frames @ frames.T
        hessians.append(design.T @ design)
        meats.append(design.T @ noise @ design)
        columns.append(np.concatenate([np.arange(n_physics), n_physics + 2 * k + np.arange(2)]))
        designs.append(design)
        noises.append(noise)
    return hessians, meats, columns, n_physics + 6, designs, noises


def _log_criterion(weights, hessians, meats, columns, size, n_physics):
    covariance = joint.sandwich(weights, hessians, meats, columns, size)
    return float(np.sum(np.log(np.diag(covariance)[:n_physics])))


def test_optimal_weights_reach_the_inverse_variance_combination_for_one_parameter():
    """One varied physics parameter: the joint variance at the optimal weights is
    ``1 / sum_k (1 / var_k)``, ``var_k`` each bin's own sandwich variance (its scaling
    profiled out), computed here from the pairs' design and noise of that bin alone."""
    hessians, meats, columns, size, designs, noises = _bins_with_correlated_noise(1, seed=1)
    alone = []
    for design, noise in zip(designs, noises, strict=True):
        inverse = np.linalg.inv(design.T @ design)
        alone.append((inverse @ design.T @ noise @ design @ inverse)[0, 0])
    start = np.ones(3)
    weights = joint.optimal_weights(hessians, meats, columns, size, 1, start)
    variance = joint.sandwich(weights, hessians, meats, columns, size)[0, 0]
    assert variance == pytest.approx(1.0 / np.sum(1.0 / np.asarray(alone)), rel=1e-6)
    equal = joint.sandwich(start, hessians, meats, columns, size)[0, 0]
    assert variance < 0.95 * equal


def test_optimal_weights_beat_the_inverse_residual_variance_ones_with_correlated_noise():
    """Three varied physics parameters, noise correlated within bins: the optimised
    weights' criterion ``sum_i log Cov_ii`` is below that of the inverse residual variance
    weights (``1 / sigma_k²``, ``sigma_k²`` the mean noise variance of the bin's pairs) and
    no random weighting finds a lower one."""
    hessians, meats, columns, size, _, noises = _bins_with_correlated_noise(3, seed=2)
    inverse_variance = np.array([1.0 / np.mean(np.diag(noise)) for noise in noises])
    weights = joint.optimal_weights(hessians, meats, columns, size, 3, inverse_variance)
    best = _log_criterion(weights, hessians, meats, columns, size, 3)
    assert best < _log_criterion(inverse_variance, hessians, meats, columns, size, 3) - 0.05
    rng = np.random.default_rng(0)
    trials = weights * np.exp(rng.normal(scale=0.5, size=(200, 3)))
    found = [_log_criterion(w, hessians, meats, columns, size, 3) for w in trials]
    assert best <= min(found) + 1e-9
    scaled = joint.sandwich(7.0 * weights, hessians, meats, columns, size)
    np.testing.assert_allclose(scaled, joint.sandwich(weights, hessians, meats, columns, size))


def test_the_joint_warnings_name_a_mirror_flow_only_when_all_bins_share_two_angles(fitted):
    """Three bins with four angles between them fix the flow direction (each 2-angle bin
    alone would not); two bins at the same two angles do not, and the report says so."""
    assert not any("two angles" in w for w in fitted.warnings())
    assert not any("two angles" in r for b in fitted.bins for r in b.verdict.reasons)
    same = hd.simulate(TRUTH, q=Q[:2], phi=[[0.0, 45.0]] * 2, n_frames=40, noise=0.01, seed=4)
    result = hd.fit_nlsq(same, _params(), separate=False, progress=False)
    assert any(w.startswith("two angles (0, 45 deg)") for w in result.warnings())
    assert "[[Warnings]]" in result.report()


def _own_fits(designs, noises, n_physics):
    """Each bin's own least-squares covariance ``C_k = H_k^-1 J_k^T Sigma_k J_k H_k^-1`` and
    the GLS covariance of their physics, ``(sum_k (C_k^theta)^-1)^-1``."""
    own = []
    for design, noise in zip(designs, noises, strict=True):
        inverse = np.linalg.inv(design.T @ design)
        own.append(inverse @ design.T @ noise @ design @ inverse)
    gls = np.linalg.inv(sum(np.linalg.inv(c[:n_physics, :n_physics]) for c in own))
    return own, gls


def test_combination_is_the_gls_of_the_bins_own_estimates_on_a_linear_model():
    """Linear bins ``y_k = J_k beta_k + noise``: the combination's map applied to one draw
    of the bins' own least-squares errors gives the GLS of their physics, each bin's
    scaling refitted by least squares given that physics; its covariance has the GLS
    physics block and matches the scatter of the combination over 4000 draws."""
    n_physics = 3
    hessians, _, columns, size, designs, noises = _bins_with_correlated_noise(n_physics, seed=4)
    own, gls = _own_fits(designs, noises, n_physics)
    mapping = joint.combination(hessians, own, columns, n_physics)
    covariance = joint.spread(mapping, own)
    np.testing.assert_allclose(covariance[:n_physics, :n_physics], gls, rtol=1e-9)

    rng = np.random.default_rng(5)
    draws = []
    for _ in range(4000):
        noise = [rng.multivariate_normal(np.zeros(30), s) for s in noises]
        errors = [np.linalg.lstsq(d, e, rcond=None)[0] for d, e in zip(designs, noise, strict=True)]
        draws.append(mapping @ np.concatenate(errors))
    theta = gls @ sum(
        np.linalg.inv(c[:n_physics, :n_physics]) @ e[:n_physics]
        for c, e in zip(own, errors, strict=True)
    )
    expected = [theta]
    for d, e in zip(designs, noise, strict=True):
        rest = e - d[:, :n_physics] @ theta
        expected.append(np.linalg.lstsq(d[:, n_physics:], rest, rcond=None)[0])
    np.testing.assert_allclose(draws[-1], np.concatenate(expected), rtol=1e-8, atol=1e-12)
    scatter = np.cov(np.asarray(draws).T)
    np.testing.assert_allclose(np.diag(scatter), np.diag(covariance), rtol=0.1)
    assert size == covariance.shape[0]


def test_combination_beats_the_best_bin_weights_with_correlated_noise():
    """Matrix weights do at least as well as one weight per bin on every physics variance,
    and strictly better where the bins' noise differs in shape (the optimised weights
    of ``optimal_weights`` compared)."""
    n_physics = 3
    hessians, meats, columns, size, designs, noises = _bins_with_correlated_noise(n_physics, seed=2)
    own, gls = _own_fits(designs, noises, n_physics)
    weights = joint.optimal_weights(hessians, meats, columns, size, n_physics, np.ones(3))
    weighted = np.diag(joint.sandwich(weights, hessians, meats, columns, size))[:n_physics]
    combined = np.diag(joint.combined_covariances(hessians, [own], columns, n_physics)[0])
    assert np.all(combined[:n_physics] <= weighted * (1 + 1e-9))
    assert np.sum(np.log(combined[:n_physics])) < np.sum(np.log(weighted)) - 0.05
    np.testing.assert_allclose(combined[:n_physics], np.diag(gls), rtol=1e-9)


def test_speckle_joint_fit_is_the_inverse_covariance_combination_of_the_bins_fits():
    """With ``errors="speckle"`` the joint fit's physics is the GLS combination of the
    bins' own fits (each fitted alone, from the joint solution, with its own covariance
    ``C_k``), ``(sum_k C_k^-1)^-1 sum_k C_k^-1 theta_k``, to a small fraction of its error,
    with the covariance ``(sum_k C_k^-1)^-1``; the report says so. To first order: a bin
    whose own fit moves several joint stderr (here ``f0`` of the low-q bin, by 3.6) differs
    from its step from the joint solution, which the fit combines, by a few % of the joint
    stderr. (Speckle noise at 40 frames moves them further: measured in
    ``benchmarks/joint_q.py``.)"""
    ds = hd.simulate(TRUTH, q=[0.006, 0.012], phi=[0.0, 90.0], n_frames=40, noise=0.01, seed=5)
    result = hd.fit_nlsq(ds, _params(), errors="speckle", progress=False)
    assert result.info["combination"] == joint.COMBINATION[True]
    assert "bins combined     by inverse covariance" in result.report()
    names = result.varied_physics
    n = len(names)
    informations = [np.linalg.inv(r.covariance.values[:n, :n]) for r in result.separate]
    covariance = np.linalg.inv(sum(informations))
    own = [np.array([r.value(m) for m in names]) for r in result.separate]
    combined = covariance @ sum(i @ v for i, v in zip(informations, own, strict=True))
    for k, name in enumerate(names):
        error = np.sqrt(covariance[k, k])
        assert result.error(name) == pytest.approx(error, rel=0.05), name
        assert abs(result.value(name) - combined[k]) < 0.05 * error, name
