"""Size classes: padded, masked work equals the unpadded sums, and a new frame window of
similar length reuses the compiled code."""

import jax
import numpy as np
import pytest
from _work import Compiles

import heterodyne as hd
from heterodyne import model, objective, shapes, starts

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}


def test_a_size_class_is_the_next_number_of_four_significant_bits():
    sizes = np.arange(1, 5000)
    classes = np.array([shapes.size_class(n) for n in sizes])
    assert classes.min() == shapes.MINIMUM and np.all(np.diff(classes) >= 0)
    big = sizes >= shapes.MINIMUM
    assert np.all(classes[big] >= sizes[big])
    assert np.all(classes[big] <= sizes[big] * (1 + 2.0 ** (1 - shapes.BITS)))
    for c in np.unique(classes):
        # at most BITS binary digits between the leading one and the last one
        assert int(c).bit_length() - (int(c) & -int(c)).bit_length() < shapes.BITS
        assert shapes.size_class(c) == c
    # 8 classes a doubling: 128, 144, ..., 240 lie between 128 and 256
    assert sorted({shapes.size_class(n) for n in range(129, 257)}) == list(range(144, 257, 16))


def test_padded_frames_and_pairs_add_nothing_to_the_normal_equations():
    """37 frames (class 40), a NaN pair, time laws switched on: both paths of the normal
    equations, the residuals and the model grid equal the explicit Jacobian and model on
    the 37 frames alone."""
    physics = {**TRUTH, "alpha_ref": 0.3, "beta": -0.2, "f1": 0.05, "v_offset": 20.0}
    ds = hd.simulate(physics, n_frames=37, phi=[0.0, 60.0], noise=0.01, seed=4)
    c2 = ds["c2"].values.copy()
    c2[:, 3, 9] = c2[:, 9, 3] = np.nan
    ds = hd.from_arrays(c2, ds["t1"].values, ds["phi"].values, float(ds["q"]))
    p = hd.Parameters({k: 1.1 * v for k, v in physics.items()})
    for name in ("alpha_ref", "beta", "f1", "v_offset"):
        p[name].vary = True
    problem = hd.Objective.build(ds, p, fix=("f2",))
    assert problem.blocks is not None and problem.blocks.t.shape[0] == 40
    x = problem.x0
    args = (problem.template, problem.free, problem.pairs, problem.n_scale)
    jac = np.asarray(jax.jacfwd(objective.free_residuals)(x, *args))
    r = np.asarray(objective.free_residuals(x, *args))
    np.testing.assert_allclose(problem.residuals(x), r, rtol=1e-13, atol=1e-15)
    for jtj, jtr, rtr in (
        problem.normal_equations(x),
        objective.blocked_normal_equations(x, *args),
    ):
        np.testing.assert_allclose(jtj, jac.T @ jac, rtol=1e-9, atol=1e-12 * np.abs(jtj).max())
        np.testing.assert_allclose(jtr, jac.T @ r, rtol=1e-9, atol=1e-11 * np.abs(jtr).max())
        assert float(rtr) == pytest.approx(r @ r, rel=1e-9)
    cost, gradient = problem.cost_and_gradient(x)
    assert cost == pytest.approx(0.5 * r @ r, rel=1e-12)
    np.testing.assert_allclose(
        gradient, jac.T @ r, rtol=1e-10, atol=1e-12 * np.abs(jac.T @ r).max()
    )
    physics_values, contrast, offset = problem.unpack(x)
    t, phi, q = (np.asarray(v) for v in (problem.pairs.t, problem.pairs.phi, problem.pairs.q))
    grid = model.c2_grid(physics_values, contrast, offset, t, phi, q)
    rows = model.c2_grid_rows(physics_values, contrast, offset, t, phi, q)
    np.testing.assert_allclose(rows, grid, rtol=1e-13)
    frames = model.frame_integrals(physics_values, t)
    assert starts.transport(physics_values, t) == pytest.approx(
        (float(frames.P_ref[-1]), float(frames.P_sample[-1])), rel=1e-14
    )


def test_a_new_frame_window_of_similar_length_compiles_nothing():
    """Windows of 37 to 40 frames share the size class 40: after the first fit, fits of
    the others (starts read off the data, multistart, result, verdict) compile nothing."""
    ds = hd.simulate(TRUTH, n_frames=48, phi=[-45.0, 0.0, 45.0], noise=0.01, seed=5)
    first = hd.fit_nlsq(hd.select(ds, frames=slice(0, 40)), progress=False)
    assert first.success and first.verdict.status != "fail"
    with Compiles() as compiles:
        for window in (slice(3, 40), slice(8, 46), slice(2, 41)):
            result = hd.fit_nlsq(hd.select(ds, frames=window), progress=False)
            assert result.success and result.verdict.status != "fail", window
            assert abs(result.value("v0") - TRUTH["v0"]) < 4 * result.error("v0"), window
    assert compiles.names == []
