"""The model against MODEL.md: closed forms, the two paths, symmetry, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import cumulative_trapezoid as scipy_cumtrapz

import heterodyne as hd
from heterodyne import model
from heterodyne.parameters import PHYSICS, PHYSICS_INDEX, PHYSICS_NAMES

T = 0.05 + 0.05 * np.arange(60)
PHI = np.array([-30.0, 0.0, 45.0, 90.0])
Q = 0.01


def random_physics(rng):
    """Draws spanning the interesting range (decays and oscillations on the grid)."""
    p = {
        "D0_ref": 10 ** rng.uniform(2, 4.5),
        "alpha_ref": rng.uniform(-1, 1),
        "D_offset_ref": rng.uniform(-50, 500),
        "D0_sample": 10 ** rng.uniform(2, 4.5),
        "alpha_sample": rng.uniform(-1, 1),
        "D_offset_sample": rng.uniform(-50, 500),
        "v0": 10 ** rng.uniform(1, 3.5),
        "beta": rng.uniform(-1, 1),
        "v_offset": rng.uniform(-100, 100),
        "f0": rng.uniform(0, 1),
        "f1": rng.uniform(-1, 1),
        "f2": rng.uniform(-2, 2),
        "f3": rng.uniform(0, 0.5),
        "phi0": rng.uniform(-90, 90),
    }
    return np.array([p[n] for n in PHYSICS_NAMES])


def test_pairwise_equals_grid_on_random_parameters():
    rng = np.random.default_rng(1)
    n = T.size
    i, j = np.triu_indices(n, 1)
    angle = np.repeat(np.arange(PHI.size), i.size)
    ii, jj = np.tile(i, PHI.size), np.tile(j, PHI.size)
    for _ in range(20):
        physics = random_physics(rng)
        contrast, offset = rng.uniform(0.1, 0.9, PHI.size), rng.uniform(0.9, 1.1, PHI.size)
        grid = np.asarray(model.c2_grid(physics, contrast, offset, T, PHI, Q))
        pairs = np.asarray(model.c2_pairs(physics, contrast, offset, T, PHI, Q, angle, ii, jj))
        np.testing.assert_allclose(pairs, grid[angle, ii, jj], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [7, 60, 128])
def test_grid_by_blocks_of_rows_equals_the_grid(rows, monkeypatch):
    """Blocks of 7 rows (the last one overlapping), exactly the frames, more than them."""
    monkeypatch.setattr(model, "ROW_BLOCK", rows)
    physics = random_physics(np.random.default_rng(3))
    contrast, offset = np.array([0.2, 0.3, 0.4, 0.5]), 1.02
    grid = np.asarray(model.c2_grid(physics, contrast, offset, T, PHI, Q))
    by_rows = model.c2_grid_rows(physics, contrast, offset, T, PHI, Q)
    np.testing.assert_allclose(by_rows, grid, rtol=0, atol=1e-12)


def test_whole_rows_equal_the_grid_on_random_parameters():
    """c2_rows (shared exponentials, the phase as a rank-2 product) against the meshgrid
    path, rows in both triangles and in any order, value and Jacobian."""
    rng = np.random.default_rng(2)
    rows = np.array([0, 59, 17, 3, 30])
    for _ in range(20):
        physics = random_physics(rng)
        contrast, offset = rng.uniform(0.1, 0.9, PHI.size), rng.uniform(0.9, 1.1, PHI.size)
        grid = np.asarray(model.c2_grid(physics, contrast, offset, T, PHI, Q))
        block = np.asarray(model.c2_rows(physics, contrast, offset, T, PHI, Q, rows))
        np.testing.assert_allclose(block, grid[:, rows, :], rtol=0, atol=1e-12)
    jac_rows = jax.jacfwd(lambda p: model.c2_rows(p, contrast, offset, T, PHI, Q, rows))(physics)
    jac_grid = jax.jacfwd(lambda p: model.c2_grid(p, contrast, offset, T, PHI, Q))(physics)
    scale = np.max(np.abs(jac_grid), axis=(0, 1, 2))
    np.testing.assert_allclose(
        np.asarray(jac_rows) / np.where(scale > 0, scale, 1.0),
        np.asarray(jac_grid)[:, rows] / np.where(scale > 0, scale, 1.0),
        rtol=0,
        atol=1e-10,
    )


@pytest.mark.parametrize("f0", [0.0, 0.3, 0.5, 1.0])
def test_constant_rates_give_the_one_time_g2(f0):
    # Trapezoid integration of constant rates is exact, so grid c2 depends on the lag only.
    p = hd.Parameters(D0_ref=3e3, D0_sample=2e4, v0=800.0, f0=f0, phi0=20.0)
    physics = p.physics_values()
    contrast, offset = np.array([0.3, 0.4, 0.5, 0.6]), np.array([1.0, 0.98, 1.02, 1.0])
    grid = np.asarray(model.c2_grid(physics, contrast, offset, T, PHI, Q))
    tau = T[None, :] - T[:, None]
    closed = np.asarray(model.g2(physics, contrast, offset, tau.ravel(), PHI, Q))
    np.testing.assert_allclose(grid, closed.reshape(grid.shape), rtol=0, atol=1e-12)


def test_g2_against_an_independent_numpy_formula():
    D_r, D_s, v, X_frac, phi0 = 3e3, 2e4, 800.0, 0.3, 20.0
    tau = np.linspace(0, 3, 31)
    physics = hd.Parameters(D0_ref=D_r, D0_sample=D_s, v0=v, f0=X_frac, phi0=phi0)
    got = np.asarray(model.g2(physics.physics_values(), 0.4, 1.0, tau, PHI, Q))
    X = X_frac**2 / (X_frac**2 + (1 - X_frac) ** 2)
    for k, phi in enumerate(PHI):
        expected = 1.0 + 0.4 * (
            (1 - X) ** 2 * np.exp(-(Q**2) * D_r * tau)
            + X**2 * np.exp(-(Q**2) * D_s * tau)
            + 2
            * X
            * (1 - X)
            * np.exp(-(Q**2) * (D_r + D_s) * tau / 2)
            * np.cos(Q * v * tau * np.cos(np.deg2rad(phi - phi0)))
        )
        np.testing.assert_allclose(got[k], expected, rtol=1e-14)


def test_rates_and_trapezoid_match_scipy():
    rate = model.transport_rate(T, 2e3, -0.7, 30.0)
    np.testing.assert_allclose(rate, np.maximum(2e3 * T**-0.7 + 30.0, 0), rtol=1e-14)
    cum = model.cumulative_trapezoid(rate, T)
    np.testing.assert_allclose(cum, scipy_cumtrapz(np.asarray(rate), T, initial=0), rtol=1e-13)


def test_power_law_is_zero_at_nonpositive_time_and_rates_are_floored():
    t = np.array([-1.0, 0.0, 1.0, 4.0])
    np.testing.assert_array_equal(model.power_law(t, 2.0, -1.5, 0.0), [0, 0, 2.0, 0.25])
    np.testing.assert_array_equal(model.transport_rate(t, 1.0, 1.0, -2.0), [0, 0, 0, 2.0])
    np.testing.assert_array_equal(model.velocity(t, 1.0, 1.0, -2.0), [-2, -2, -1, 2.0])


def test_fraction_is_clipped_to_unit_interval():
    t = np.linspace(0, 10, 11)
    x = np.asarray(model.sample_fraction(t, 0.1, 0.5, 1.0, 0.0))
    expected = np.clip(0.1 * np.exp(0.5 * (t - 1.0)), 0, 1)
    np.testing.assert_allclose(x, expected, rtol=1e-14)
    assert x[-1] == 1.0 and x.min() > 0
    assert np.all(np.asarray(model.sample_fraction(t, 0.5, 0.0, 0.0, -1.0)) == 0.0)
    # the exponent cap keeps huge growth finite
    assert np.asarray(model.sample_fraction(1e4, 1.0, 10.0, -1e4, 0.0)) == 1.0


def test_symmetry_and_diagonal():
    rng = np.random.default_rng(2)
    physics = random_physics(rng)
    grid = np.asarray(model.c2_grid(physics, np.array([0.2, 0.3, 0.4, 0.5]), 1.05, T, PHI, Q))
    np.testing.assert_allclose(grid, np.swapaxes(grid, 1, 2), rtol=0, atol=1e-15)
    diag = np.diagonal(grid, axis1=1, axis2=2)
    np.testing.assert_allclose(
        diag, (1.05 + np.array([0.2, 0.3, 0.4, 0.5]))[:, None] + 0 * diag, rtol=0, atol=1e-14
    )


def test_phi0_has_period_180_degrees():
    physics = hd.Parameters(v0=2e3, phi0=30.0).physics_values()
    flipped = physics.copy()
    flipped[13] = 30.0 - 180.0
    a = model.c2_grid(physics, 0.5, 1.0, T, PHI, Q)
    b = model.c2_grid(flipped, 0.5, 1.0, T, PHI, Q)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("static_reference", [False, True])
def test_jacobian_is_finite_everywhere_and_matches_finite_differences(static_reference):
    rng = np.random.default_rng(3)
    physics = random_physics(rng)
    if static_reference:  # D0_ref = 0: a bound the optimiser must be able to leave
        physics[PHYSICS_INDEX["D0_ref"]] = physics[PHYSICS_INDEX["D_offset_ref"]] = 0.0
    t = np.concatenate([[0.0], T[:20]])  # t = 0 exercises the power-law guard
    contrast, offset = np.full(PHI.size, 0.4), np.full(PHI.size, 1.0)

    def f(theta):
        return model.c2_grid(theta, contrast, offset, t, PHI, Q)

    jac = np.asarray(jax.jacfwd(f)(jnp.asarray(physics)))
    assert np.all(np.isfinite(jac)), "NaN/inf in the Jacobian"
    # the diagonal is constant, so its Jacobian is zero
    np.testing.assert_allclose(np.diagonal(jac, axis1=1, axis2=2), 0, atol=1e-12)
    scale = np.array([s.max - s.min for s in PHYSICS]) * 1e-7
    for k in range(physics.size):
        if static_reference and k in (0, 2):
            step = np.zeros_like(physics)
            step[k] = scale[k]  # one-sided: the rate is floored at 0 below
            fd = (np.asarray(f(physics + step)) - np.asarray(f(physics))) / scale[k]
            tol = 1e-4
        else:
            step = np.zeros_like(physics)
            step[k] = scale[k]
            fd = (np.asarray(f(physics + step)) - np.asarray(f(physics - step))) / (2 * scale[k])
            tol = 1e-5
        np.testing.assert_allclose(
            jac[..., k], fd, rtol=tol, atol=tol * np.abs(fd).max() + 1e-9, err_msg=PHYSICS_NAMES[k]
        )
