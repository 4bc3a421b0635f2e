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
    # The speckle shape is the first-order covariance, so kappa is 1 / pixels up to the
    # sampling spread of the moments (0.76 to 1.28 / pixels over seeds 0 to 5; this is
    # seed 3). The Isserlis shape alone needed a factor of 1.0 to 1.4 here.
    assert 0.75 / 300 < speckled.info["speckle_kappa"] < 1.3 / 300
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


def test_pairs_sharing_a_counted_frame_are_correlated_by_its_shot_noise():
    """With Poisson counting at lambda photons per pixel and frame, pairs (i, j), (i, l)
    that share frame i covary by (C_ii + E) (C_jl + E delta_jl) + C_il C_ij, E = 1 / lambda
    (Isserlis on C + E, the shot shape of the module doc): the mean of
    row i over late frames varies as the shot shape says (module doc), from 600 replicas
    of P = 200 pixels; the same pair's variance has the counting term E² (1 + C_ij)."""
    truth = {"D0_ref": 2e4, "D0_sample": 2e4, "v0": 0.0, "f0": 0.4}
    n, pixels, replicas, counts = 40, 200, 600, 0.5
    t = 0.1 + 0.1 * np.arange(n)
    physics = hd.Parameters(truth).physics_values()
    intensity = speckle.intensities(
        physics,
        np.array([0.5]),
        t,
        np.array([0.0]),
        0.01,
        n_pixels=pixels * replicas,
        counts=counts,
        seed=8,
    )
    c2 = speckle.two_time(intensity[0].reshape(replicas, pixels, n))
    cov = np.asarray(c2_grid(physics, 0.5, 1.0, t, np.array([0.0]), 0.01))[0] - 1.0
    total = cov + np.eye(n) / counts
    late = np.arange(25, n)
    rows = c2[:, :10][:, :, late].mean(axis=2)  # (replicas, early frame i)
    predicted = np.mean(
        [
            total[i, i] * total[np.ix_(late, late)] + np.outer(cov[i, late], cov[i, late])
            for i in range(10)
        ]
    )
    assert rows.var(axis=0, ddof=1).mean() * pixels == pytest.approx(predicted, rel=0.12)
    # pairs taken as independent (white), the row mean would vary less than half as much
    assert predicted > 2 * np.mean(total[0, 0] * total[late, late]) / late.size
    # the same pair near the diagonal: Isserlis on C + E, plus E² C_ij from the counting
    i, j = np.arange(0, n - 1), np.arange(1, n)
    isserlis = total[i, i] * total[j, j] + cov[i, j] ** 2
    exact = isserlis + cov[i, j] / counts**2
    measured = c2[:, i, j].var(axis=0, ddof=1).mean() * pixels
    # the rest (~12 %) is the speckle's third cumulant, which the fitted scales take up
    assert isserlis.mean() < 0.8 * measured and exact.mean() < measured < 1.2 * exact.mean()


@pytest.mark.parametrize("seed", [1, 4])
def test_far_below_one_photon_the_shot_scale_counts_the_pixels_and_no_white_is_added(seed):
    """At 0.02 photons per pixel and frame the shot noise is nearly white in the summed
    squares and differs from white only in the weak shared-frame moment; the physics
    (first order in 1 / P, Poisson counting exact) fixes its scale at 1 / P. Fitted
    freely with a white part, the split between the two was arbitrary (shot 0 to 1 / P)
    and the errors 20 % too small. The speckle shape is a tiny part of every moment here,
    so its excess over the shot scale ((A4)'s factor above 1) is not identified: fitted
    freely it came out at 330 / P on seed 4 and inflated the reference rate's errors; it
    stays at the shot scale."""
    pixels = 20000
    ds = hd.simulate(
        TRUTH, n_frames=50, phi=PHI, noise="speckle", n_pixels=pixels, counts=0.02, seed=seed
    )
    result = hd.fit_nlsq(ds, guess(), errors="speckle", progress=False)
    assert result.info["white_variance"] == 0.0
    assert result.info["shot_kappa"] * pixels == pytest.approx(1.0, abs=0.12)
    assert result.info["speckle_kappa"] == result.info["shot_kappa"]


def field_correlation(physics, t, phi):
    """The field correlation of one angle, written out pair by pair from the integrals."""
    frames = model.frame_integrals(physics, t)
    p_ref, p_sample, v, s = (np.asarray(a) for a in frames[1:])
    r, q = 1.0 - s, 0.01
    q_parallel = q * np.cos(np.deg2rad(phi - physics[13]))
    n = len(t)
    out = np.zeros((n, n), complex)
    for a in range(n):
        for b in range(n):
            out[a, b] = (
                r[a] * r[b] * np.exp(-0.5 * q * q * abs(p_ref[b] - p_ref[a]))
                + s[a]
                * s[b]
                * np.exp(-0.5 * q * q * abs(p_sample[b] - p_sample[a]))
                * np.exp(1j * q_parallel * (v[b] - v[a]))
            ) / np.sqrt((r[a] ** 2 + s[a] ** 2) * (r[b] ** 2 + s[b] ** 2))
    return out


def test_field_correlation_squared_is_the_model_correlation():
    physics = hd.Parameters(
        {**TRUTH, "alpha_sample": 0.5, "beta": 0.6, "f1": -0.3, "f3": 0.1}
    ).physics_values()
    t = 0.1 + 0.1 * np.arange(15)
    frames = model.frame_integrals(physics, t)
    gamma = np.asarray(
        model.field_correlation(frames, 0.01, model.parallel_wavevector(physics, 30.0, 0.01))
    )
    np.testing.assert_allclose(gamma, field_correlation(physics, t, 30.0), rtol=1e-12, atol=1e-14)
    g = np.asarray(c2_grid(physics, 1.0, 0.0, t, np.array([30.0]), 0.01))[0]
    np.testing.assert_allclose(np.abs(gamma) ** 2, g, rtol=1e-12, atol=1e-14)


def angle_grids(problem, x, angle, weight):
    """:func:`heterodyne.uncertainty.jacobian_grid` of one angle at ``x``."""
    pairs = problem.pairs
    columns = uncertainty.angle_columns(problem.free, problem.n_scale, angle)
    return uncertainty.jacobian_grid_jit(
        x,
        problem.template,
        problem.free,
        columns,
        pairs.t,
        pairs.phi,
        pairs.q,
        angle,
        weight,
        problem.n_scale,
    )


def speckle_cumulants(y, contrast):
    """Joint cumulants of order 2 to 4 of one pixel's speckle intensity over its mean, for
    equal modes: sums over the cyclic orders of the frames of ``contrast^(n-1) y y ...``,
    with the crossed 4-cycle ``y_ac y_cb y_bd y_da`` given separately."""

    def k2(a, b):
        return contrast * abs(y[a, b]) ** 2

    def k3(a, b, c):
        return 2 * contrast**2 * (y[a, b] * y[b, c] * y[c, a]).real

    def k4(a, b, c, d):
        cycles = y[a, b] * y[b, c] * y[c, d] * y[d, a] + y[a, b] * y[b, d] * y[d, c] * y[c, a]
        return 2 * contrast**3 * cycles.real

    return k2, k3, k4


def beyond_isserlis(y, contrast, i, j, k, l):
    """First-order covariance of the pair estimates ``(i, j)``, ``(k, l)`` without
    counting, less its Isserlis part: ``Cov(y_ij, y_kl)`` of the module doc of
    :mod:`heterodyne.uncertainty` from the cumulants, the crossed cycle
    ``2 contrast³ Re(y_ik y_kj y_jl y_li)`` replaced by ``2 contrast³ Re(y_ik y_jl)
    |y_ij| |y_kl|``."""
    k2, k3, k4 = speckle_cumulants(y, contrast)
    crossed = 2 * contrast**3 * (y[i, k] * y[j, l]).real * abs(y[i, j]) * abs(y[k, l])
    return (
        k4(i, j, k, l)
        + crossed
        - k2(i, j) * (k3(i, k, l) + k3(j, k, l))
        - k2(k, l) * (k3(i, j, k) + k3(i, j, l))
        + k2(i, j) * k2(k, l) * (k2(i, k) + k2(i, l) + k2(j, k) + k2(j, l))
    )


def test_speckle_shape_is_the_first_order_covariance_with_the_crossed_cycle_in_product_form():
    """Without counting, the speckle shape's products with the Jacobian equal the dense
    first-order covariance written from the cumulants (crossed cycle in product form);
    where ``g`` is real (flow perpendicular to q) the product form is exact for pairs
    that share their early or their late frame (the same pair included); and the
    sandwich of the shape gives the physics the standard errors of the exact covariance
    (every term) within 2 % (0.5 % here; contrast and offset within 6 %)."""
    # the start has phi0 = 26: at phi = 116 the flow is perpendicular to q (a real g)
    n, phis = 24, [-45.0, 116.0, 20.0]
    ds = hd.simulate(TRUTH, n_frames=n, phi=phis, noise=0.001, seed=0)
    problem = hd.Objective.build(ds, guess(), fix=(), scaling="per_angle")
    x, pairs = problem.x0, problem.pairs
    z = np.asarray(problem.template).copy()
    z[np.asarray(problem.free)] = x
    physics, contrast, _ = (np.asarray(a) for a in objective.unpack(z, problem.n_scale))
    first, second = np.triu_indices(n, 1)
    i, j, k, l = first[:, None], second[:, None], first[None, :], second[None, :]
    size = x.size
    normal, shaped, exact = (np.zeros((size, size)) for _ in range(3))
    for angle, phi in enumerate(phis):
        c = contrast[angle]
        columns = uncertainty.angle_columns(problem.free, problem.n_scale, angle)
        weight = 1.0 - np.eye(n)
        grids = angle_grids(problem, x, angle, weight)
        products = uncertainty.speckle_products_jit(
            x,
            problem.template,
            problem.free,
            pairs.t,
            pairs.phi,
            pairs.q,
            angle,
            grids,
            weight,
            np.full(n, c),
            np.zeros((n, n)),
            problem.n_scale,
        )[0][0]
        jac = np.asarray(grids)[:, first, second].T
        y = field_correlation(physics, np.asarray(pairs.t), phi)
        k2, _, _ = speckle_cumulants(y, c)
        isserlis = k2(i, k) * k2(j, l) + k2(i, l) * k2(j, k)
        shape = isserlis + beyond_isserlis(y, c, i, j, k, l)
        crossed = 2 * c**3 * (y[i, k] * y[k, j] * y[j, l] * y[l, i]).real
        product_form = 2 * c**3 * (y[i, k] * y[j, l]).real * abs(y[i, j]) * abs(y[k, l])
        full = shape - product_form + crossed
        np.testing.assert_allclose(
            products, jac.T @ shape @ jac, rtol=1e-10, atol=1e-12 * np.abs(products).max()
        )
        if angle == 1:
            assert np.max(np.abs(y.imag)) < 1e-12
            shared = (i == k) | (j == l)
            np.testing.assert_allclose(shape[shared], full[shared], rtol=1e-12, atol=1e-15)
        block = np.ix_(columns, columns)
        normal[block] += jac.T @ jac
        shaped[block] += jac.T @ shape @ jac
        exact[block] += jac.T @ full @ jac
    inverse = np.linalg.inv(normal)
    ratio = np.sqrt(np.diag(inverse @ shaped @ inverse) / np.diag(inverse @ exact @ inverse))
    physics_count = len(TRUTH)
    assert np.all(np.abs(ratio[:physics_count] - 1.0) < 0.02), ratio
    assert np.all(np.abs(ratio - 1.0) < 0.08), ratio


@pytest.mark.parametrize("scaling", ["per_angle", "shared"])
def test_speckle_covariance_equals_the_pair_by_pair_sum(scaling):
    n = 12
    ds = hd.simulate(
        TRUTH, n_frames=n, phi=[0.0, 60.0], noise="speckle", n_pixels=50, counts=2.0, seed=2
    )
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
    base = offset[angle] if problem.n_scale > 1 else np.full(angle.size, offset[0])
    # shot-noise variance of each frame: the measured diagonal above offset + contrast
    excess = (
        np.diagonal(cov, axis1=1, axis2=2)
        - (contrast if problem.n_scale > 1 else np.full(2, contrast[0]))[:, None]
    )
    speckle_cov = cov.copy()
    for a in range(2):
        np.fill_diagonal(speckle_cov[a], contrast[a if problem.n_scale > 1 else 0])
    index = {(a, b, c): p for p, (a, b, c) in enumerate(zip(angle, i, j, strict=True))}
    contrast_of = contrast if problem.n_scale > 1 else np.full(2, contrast[0])
    gammas = [field_correlation(physics, problem.pairs.t, phi_a) for phi_a in problem.pairs.phi]
    shapes = np.zeros((2, r.size, r.size))
    for p, (a, b, c) in enumerate(zip(angle, i, j, strict=True)):
        for q, (a2, d, e) in enumerate(zip(angle, i, j, strict=True)):
            if a != a2:
                continue
            for k, cv in enumerate((speckle_cov[a], cov[a])):
                shapes[k, p, q] = w[p] * w[q] * (cv[b, d] * cv[c, e] + cv[b, e] * cv[c, d])
        # the shot variance beyond Isserlis: E_i E_j C_ij / offset
        shapes[1, p, p] += w[p] ** 2 * excess[a, b] * excess[a, c] * cov[a, b, c] / base[p]
        # a shared frame f, other frames g, h: E_f (2 contrast² Re(y_fg y_gh y_hf) - K_fg K_fh)
        for q, (a2, d, e) in enumerate(zip(angle, i, j, strict=True)):
            if a != a2:
                continue
            for f, g in ((b, c), (c, b)):
                for f2, h in ((d, e), (e, d)):
                    if f == f2:
                        y, k = gammas[a], contrast_of[a] * np.abs(gammas[a]) ** 2
                        cycle = (y[f, g] * y[g, h] * y[h, f]).real
                        shapes[1, p, q] += (
                            w[p]
                            * w[q]
                            * excess[a, f]
                            * (2 * contrast_of[a] ** 2 * cycle - k[f, g] * k[f, h])
                        )
    shapes[1] -= shapes[0]
    # the speckle's own cumulants beyond Isserlis, the crossed cycle in product form
    for p, (a, b, c) in enumerate(zip(angle, i, j, strict=True)):
        for q, (a2, d, e) in enumerate(zip(angle, i, j, strict=True)):
            if a == a2:
                shapes[0, p, q] += (
                    w[p] * w[q] * beyond_isserlis(gammas[a], contrast_of[a], b, c, d, e)
                )
    hat = jac @ inverse @ jac.T
    neighbours = [np.zeros((r.size, r.size)) for _ in range(2)]
    for (a, b, c), p in index.items():
        for k, steps in enumerate((((1, 1),), ((0, 1), (1, 0)))):
            for di, dj in steps:
                q = index.get((a, b + di, c + dj))
                if q is not None:
                    neighbours[k][p, q] = 1.0
    # E[r^T N r] = tr(N (I - H) Cov (I - H)) for residuals (I - H) r_true
    kept = np.eye(r.size) - hat
    expected_moments = np.zeros((3, 3))
    for k, n in enumerate((np.eye(r.size), *neighbours)):
        for c in range(2):
            expected_moments[k, c] = np.trace(n @ kept @ shapes[c] @ kept)
        expected_moments[k, 2] = np.trace(n @ kept)
    moments = np.array([r @ r, r @ neighbours[0] @ r, r @ neighbours[1] @ r])
    terms = np.array([r.size, neighbours[0].sum(), neighbours[1].sum()])
    theta = uncertainty.shape_scales(expected_moments, moments, terms)
    # without the white shape the moments are met within 3 of their standard deviations
    # (sums of independent products of residuals of variance m0 / n); with it, exactly
    # where a solution with speckle >= shot >= 0 and white >= 0 exists
    spread = moments[0] / r.size * np.sqrt([2.0, 1.0, 1.0] * terms)
    assert theta[0] >= theta[1] >= 0 and theta[2] >= 0
    exact = np.linalg.solve(expected_moments, moments)
    if theta[2] == 0:
        assert np.all(np.abs(expected_moments @ theta - moments) <= 3 * spread)
    elif np.all(exact >= 0) and exact[0] >= exact[1]:
        np.testing.assert_allclose(expected_moments @ theta, moments, rtol=1e-9)
    expected = (
        inverse @ jac.T @ (theta[0] * shapes[0] + theta[1] * shapes[1]) @ jac @ inverse
        + theta[2] * inverse
    )
    assert (out.kappa, out.shot, out.white) == pytest.approx(tuple(theta), rel=1e-9, abs=1e-15)
    assert out.kappa > 0 and out.shot > 0
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
        grids = np.asarray(angle_grids(problem, x, k, weight[k] + weight[k].T))
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
    # the Hermitian field correlation, against its entries written out pair by pair
    frames = model.frame_integrals(physics, t)
    field = model.field_factors(frames, 0.01, model.parallel_wavevector(physics, 30.0, 0.01))
    y = x + 1j * np.random.default_rng(2).standard_normal((n, 5))
    np.testing.assert_allclose(
        uncertainty.correlation_apply(*field, y, hermitian=True),
        field_correlation(physics, t, 30.0) @ y,
        rtol=1e-11,
        atol=1e-11,
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
    kernels = (objective.block_normal_equations, uncertainty.jacobian_grid_jit)
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
