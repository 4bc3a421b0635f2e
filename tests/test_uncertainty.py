"""Standard errors for two-time data: the speckle covariance against physics, against a
pair-by-pair computation, and the nominal errors where the noise is independent."""

import jax
import numpy as np
import pytest
from _work import Compiles

import heterodyne as hd
from heterodyne import model, objective, speckle, structured, uncertainty
from heterodyne.results import at_entries, entry_label, index_of

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
PHI = [-45.0, 0.0, 45.0]
FIXED = ("alpha_ref", "alpha_sample", "beta", "f1")


# compiled once, rather than op by op
c2_grid = jax.jit(model.c2_grid)


@jax.jit
def factors(physics, t, phi):
    frames = model.frame_integrals(physics, t)
    return model.correlation_factors(frames, 0.01, model.parallel_wavevector(physics, phi, 0.01))


def guess():
    return hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()}).fix(*FIXED)


def ratios(result):
    """stderr / nominal stderr of every varied quantity, by display label."""
    index = index_of(result.covariance)
    ratio = at_entries(result.stderr, index) / at_entries(result.stderr_nominal, index)
    return {entry_label(*entry): r for entry, r in zip(index, ratio, strict=True)}


@pytest.fixture(scope="module")
def speckled():
    ds = hd.simulate(TRUTH, n_frames=50, phi=PHI, noise="speckle", n_pixels=300, seed=3)
    return hd.fit_nlsq(ds, guess(), errors="speckle", progress=False)


def test_independent_noise_gives_the_nominal_errors():
    ds = hd.simulate(TRUTH, n_frames=50, phi=PHI, noise=0.01, seed=1)
    result = hd.fit_nlsq(ds, guess(), errors="speckle", progress=False)
    # Neighbouring residuals are uncorrelated, so the speckle scale is (near) 0 and the
    # white variance is the residual variance; 8 seeds gave ratios 1.00 to 1.08.
    assert result.info["white_variance"] == pytest.approx(0.01**2, rel=0.05)
    assert all(0.95 < r < 1.2 for r in ratios(result).values()), ratios(result)


def test_speckle_errors_exceed_the_nominal_ones_and_kappa_counts_the_pixels(speckled):
    assert speckled.success and speckled.info["errors"] == "speckle"
    # kappa = 1 / pixels where the four frames of two pairs are not all within a
    # correlation time; nearer the diagonal the variance is larger (up to 1.5 times at
    # lag 1), which kappa partly absorbs at N = 50.
    assert 1.0 / 300 < speckled.info["speckle_kappa"] < 1.4 / 300
    assert speckled.info["white_variance"] < 0.1 * speckled.reduced_chi2
    r = ratios(speckled)
    assert all(r[name] > 2.0 for name in TRUTH), r
    for name in TRUTH:
        truth = speckled.data.attrs[f"true_{name}"]
        assert abs(speckled.value(name) - truth) < 3 * speckled.error(name), name


def test_pair_covariance_of_pixel_averaged_c2_is_the_speckle_formula():
    """Cov(c2_ij, c2_kl) = (C_ik C_jl + C_il C_jk) / P for pairs whose early frames are
    far from their late ones, from 800 replicas of P = 200 pixels."""
    truth = {"D0_ref": 2e4, "D0_sample": 2e4, "v0": 0.0, "f0": 0.4}
    n, pixels, replicas = 40, 200, 800
    t = 0.1 + 0.1 * np.arange(n)
    physics = hd.Parameters(truth).physics_values()
    intensity = speckle.intensities(
        physics, np.array([0.5]), t, np.array([0.0]), 0.01, n_pixels=pixels * replicas, seed=7
    )
    c2 = speckle.two_time(intensity[0].reshape(replicas, pixels, n))
    cov = np.asarray(c2_grid(physics, 0.5, 1.0, t, np.array([0.0]), 0.01))[0] - 1.0
    # early frames 0..9, late frames 25..39: the field correlation between them is at most
    # exp(-1.5) (q² D = 2 / s), and within each group it spans several frames
    i, j = (a.ravel() for a in np.meshgrid(np.arange(10), np.arange(25, n), indexing="ij"))
    block = c2[:, i, j].mean(axis=1)
    predicted = np.mean(
        cov[np.ix_(i, i)] * cov[np.ix_(j, j)] + cov[np.ix_(i, j)] * cov[np.ix_(j, i)]
    )
    independent = np.mean(cov[i, i] * cov[j, j] + cov[i, j] ** 2) / i.size
    assert block.var(ddof=1) * pixels == pytest.approx(predicted, rel=0.15)
    assert predicted > 5 * independent


@pytest.mark.parametrize("scaling", ["per_angle", "shared"])
def test_speckle_covariance_equals_the_pair_by_pair_sum(scaling):
    n = 12
    ds = hd.simulate(TRUTH, n_frames=n, phi=[0.0, 60.0], noise="speckle", n_pixels=50, seed=2)
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 2.0, (2, n, n)) * 0.05
    c2 = ds["c2"].values.copy()
    c2[0, 2, 7] = c2[0, 7, 2] = c2[1, 4, 5] = c2[1, 5, 4] = np.nan
    ds = hd.from_arrays(
        c2, ds["t1"].values, ds["phi"].values, 0.01, sigma=sigma + np.swapaxes(sigma, 1, 2)
    )
    problem = hd.Objective.build(ds, guess(), fix=(), scaling=scaling)
    x = problem.x0 * 1.01
    jac = np.asarray(
        jax.jit(jax.jacfwd(objective.free_residuals), static_argnums=4)(
            x, problem.template, problem.free, problem.pairs, problem.n_scale
        )
    )
    r = problem.residuals(x)
    z = np.asarray(problem.template).copy()
    z[np.asarray(problem.free)] = x
    physics, contrast, offset = (np.asarray(a) for a in objective.unpack(z, problem.n_scale))
    grid = np.asarray(c2_grid(physics, contrast, offset, problem.pairs.t, problem.pairs.phi, 0.01))
    cov = uncertainty.intensity_covariance(grid, ds["c2"].values, offset)
    inverse = np.linalg.inv(jac.T @ jac)
    out = uncertainty.speckle_covariance(
        inverse, x, problem.template, problem.free, problem.pairs, problem.n_scale, r, cov
    )

    angle, i, j = (np.asarray(a) for a in (problem.pairs.angle, problem.pairs.i, problem.pairs.j))
    w = np.asarray(problem.pairs.weight)
    index = {(a, b, c): p for p, (a, b, c) in enumerate(zip(angle, i, j, strict=True))}
    pair_cov = np.zeros((r.size, r.size))
    for p, (a, b, c) in enumerate(zip(angle, i, j, strict=True)):
        for q, (a2, d, e) in enumerate(zip(angle, i, j, strict=True)):
            if a == a2:
                pair_cov[p, q] = (
                    w[p] * w[q] * (cov[a, b, d] * cov[a, c, e] + cov[a, b, e] * cov[a, c, d])
                )
    m1 = d1 = 0.0
    for (a, b, c), p in index.items():
        q = index.get((a, b + 1, c + 1))
        if q is not None:
            m1 += r[p] * r[q]
            d1 += (
                w[p]
                * w[q]
                * (cov[a, b, b + 1] * cov[a, c, c + 1] + cov[a, b, c + 1] * cov[a, c, b + 1])
            )
    m0, d0 = r @ r, np.trace(pair_cov)
    share = np.clip((m1 / d1) / (m0 / d0), 0.0, 1.0)
    # E[r^T r] = tr((I - H) Cov(r)) with the hat matrix H of the fit
    hat = jac @ inverse @ jac.T
    kept = (
        share * np.trace(pair_cov - hat @ pair_cov) / d0
        + (1 - share) * np.trace(np.eye(r.size) - hat) / r.size
    )
    kappa, white = share * m0 / kept / d0, (1 - share) * m0 / kept / r.size
    expected = kappa * inverse @ jac.T @ pair_cov @ jac @ inverse + white * inverse
    assert out.kappa == pytest.approx(kappa, rel=1e-9) and kappa > 0
    assert out.white == pytest.approx(white, rel=1e-9, abs=1e-15)
    np.testing.assert_allclose(
        out.covariance, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max()
    )


def test_jacobian_grids_rebuild_the_normal_matrix(speckled):
    ds = speckled.data
    problem = hd.Objective.build(ds, guess(), fix=(), scaling="per_angle")
    x = problem.x0
    jtj = problem.normal_equations(x)[0]
    weight = np.zeros(ds["c2"].shape)
    pairs = problem.pairs
    weight[np.asarray(pairs.angle), np.asarray(pairs.i), np.asarray(pairs.j)] = np.asarray(
        pairs.weight
    )
    rebuilt = np.zeros_like(jtj)
    for k in range(ds.sizes["phi"]):
        columns = uncertainty.angle_columns(problem.free, problem.n_scale, k)
        grids = np.asarray(
            uncertainty.jacobian_grid_jit(
                x,
                problem.template,
                problem.free,
                columns,
                pairs.t,
                pairs.phi,
                pairs.q,
                k,
                weight[k] + weight[k].T,
                problem.n_scale,
            )
        )
        rebuilt[np.ix_(columns, columns)] += 0.5 * np.einsum("aij,bij->ab", grids, grids)
    np.testing.assert_allclose(rebuilt, jtj, rtol=1e-10, atol=1e-12 * np.abs(jtj).max())


@pytest.mark.parametrize("truth", [TRUTH, {**TRUTH, "D0_ref": 0.0, "alpha_sample": 0.6}])
def test_correlation_apply_is_the_dense_product(truth):
    n = 60
    t = 0.1 + 0.1 * np.arange(n)
    physics = hd.Parameters(truth).physics_values()
    dense = np.asarray(c2_grid(physics, 1.0, 0.0, t, np.array([30.0]), 0.01))[0]
    a, b, e = factors(physics, t, 30.0)
    x = np.random.default_rng(1).standard_normal((n, 5))
    np.testing.assert_allclose(
        jax.jit(uncertainty.correlation_apply)(a, b, e, x), dense @ x, rtol=1e-12, atol=1e-12
    )


def test_measured_diagonal_enters_the_intensity_covariance_unless_missing_or_low():
    model_c2 = np.full((1, 3, 3), 1.1) + np.eye(3) * 0.4  # offset 1, contrast 0.5
    data = model_c2.copy()
    data[0, 0, 0], data[0, 1, 1], data[0, 2, 2] = 2.5, np.nan, 1.2  # shot noise, gone, low
    cov = uncertainty.intensity_covariance(model_c2, data, [1.0])
    np.testing.assert_allclose(np.diagonal(cov[0]), [1.5, 0.5, 0.5])
    np.testing.assert_allclose(cov[0][~np.eye(3, dtype=bool)], 0.1)


def test_bad_errors_option_fails_before_any_compile(speckled):
    with Compiles() as compiles, pytest.raises(hd.OptionError, match="errors must be one of"):
        hd.fit_nlsq(speckled.data, guess(), errors="bootstrap", progress=False)
    kernels = (objective.blocked_normal_equations, uncertainty.jacobian_grid_jit)
    assert compiles.of(*kernels, *structured.STAGES) == 0


def test_round_trip_keeps_both_kinds_of_errors_and_the_report_says_which(speckled, tmp_path):
    again = hd.open_result(speckled.to_netcdf(tmp_path / "fit.nc"))
    assert again.stderr.identical(speckled.stderr)
    assert again.stderr_nominal.identical(speckled.stderr_nominal)
    assert again.covariance.identical(speckled.covariance)
    assert again.info == speckled.info
    report = again.report()
    assert report == speckled.report()
    header = next(line for line in report.splitlines() if line.startswith("    name"))
    assert "errors            speckle" in report and "nominal" in header
    assert not any("lower bounds" in w for w in again.warnings())
    nominal = hd.fit_nlsq(speckled.data, guess(), progress=False)
    assert nominal.info["errors"] == "nominal"
    assert any("lower bounds" in w for w in nominal.warnings())
    assert nominal.stderr.identical(nominal.stderr_nominal)
    for name in TRUTH:
        assert nominal.error(name) == pytest.approx(float(speckled.stderr_nominal[name]), rel=1e-6)
