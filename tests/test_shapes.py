"""Size classes: padded, masked work equals the unpadded sums, and a new frame window of
similar length reuses the compiled code."""

import jax
import numpy as np
import pytest
from _work import Compiles

import heterodyne as hd
from heterodyne import model, objective, shapes, starts, structured

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
    pad = problem.padding  # 2 angles: their own class, nothing appended to x
    for jtj, jtr, rtr in (
        problem.normal_equations(x),
        objective.blocked_normal_equations(x, pad.template, pad.free, problem.pairs, pad.n_scale),
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


def test_an_angle_class_is_the_next_power_of_two():
    counts = np.arange(1, 200)
    classes = np.array([shapes.angle_class(n) for n in counts])
    assert np.all(classes >= counts) and np.all(classes < 2 * counts)
    assert np.all(classes & (classes - 1) == 0)  # powers of two
    assert [shapes.angle_class(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def _unpadded(blocks, n_phi):
    """``blocks`` cut back to its ``n_phi`` real angles: the layout without angle padding."""
    per_angle = ("phi", "weight", "center", "sum_d", "sum_d2")
    cut = {name: getattr(blocks, name)[:n_phi] for name in per_angle}
    return blocks._replace(
        diagonal=blocks.diagonal[:, :n_phi], tiles=blocks.tiles[:, :, :n_phi], **cut
    )


@pytest.mark.parametrize("scaling", ["per_angle", "shared"])
def test_padded_angles_add_nothing_to_the_normal_equations(scaling):
    """3 angles (class 4), a NaN pair, time laws on: the fast path with the padded angle
    equals the same path on the 3 angles alone to 1e-12, and the blocked Jacobian path
    (weights that vary, so the pairs are read one by one) equals the explicit Jacobian of
    the 3 angles."""
    physics = {**TRUTH, "alpha_ref": 0.3, "beta": -0.2, "f1": 0.05}
    ds = hd.simulate(physics, n_frames=37, phi=[-30.0, 15.0, 60.0], noise=0.01, seed=6)
    c2 = ds["c2"].values.copy()
    c2[:, 3, 9] = c2[:, 9, 3] = np.nan
    ds = hd.from_arrays(c2, ds["t1"].values, ds["phi"].values, float(ds["q"]))
    p = hd.Parameters({k: 1.1 * v for k, v in physics.items()})
    for name in ("alpha_ref", "beta", "f1"):
        p[name].vary = True
    problem = hd.Objective.build(ds, p, fix=("f2",), scaling=scaling)
    assert problem.blocks.phi.shape == (4,) and problem.padding.n_scale == problem.n_scale + (
        scaling == "per_angle"
    )
    x = problem.x0 * (1 + 0.01 * np.sin(np.arange(problem.x0.size)))
    padded = problem.normal_equations(x)
    plain = structured.normal_equations(
        jax.device_put(x), problem.template, problem.free, _unpadded(problem.blocks, 3),
        problem.n_scale, problem.n_physics,
    )  # fmt: skip
    for a, b in zip(padded, plain, strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-12, atol=1e-12 * np.abs(b).max())

    sigma = 0.01 * (1 + 0.5 * np.random.default_rng(0).random(ds["c2"].shape))
    weighted = hd.Objective.build(
        ds.assign(sigma=(ds["c2"].dims, sigma)), p, fix=("f2",), scaling=scaling
    )
    assert weighted.blocks is None
    args = (weighted.template, weighted.free, weighted.pairs, weighted.n_scale)
    jac = np.asarray(jax.jacfwd(objective.free_residuals)(x, *args))
    r = np.asarray(objective.free_residuals(x, *args))
    jtj, jtr, rtr = weighted.normal_equations(x)
    np.testing.assert_allclose(jtj, jac.T @ jac, rtol=1e-12, atol=1e-12 * np.abs(jtj).max())
    np.testing.assert_allclose(jtr, jac.T @ r, rtol=1e-12, atol=1e-12 * np.abs(jtr).max())
    assert float(rtr) == pytest.approx(r @ r, rel=1e-12)
    cost, gradient = weighted.cost_and_gradient(x)
    assert cost == pytest.approx(0.5 * r @ r, rel=1e-12)
    np.testing.assert_allclose(gradient, jac.T @ r, rtol=1e-12, atol=1e-12 * np.abs(jtr).max())
    np.testing.assert_allclose(weighted.residuals(x), r, rtol=1e-13, atol=1e-15)


def test_an_angle_subset_of_a_fitted_class_compiles_nothing_and_fits_as_unpadded(monkeypatch):
    """After fits of 4 angles (class 4) and of 2 (class 2), fits of 3 of the 4 and of 2 of
    3 compile nothing (starts estimated or given, multistart, result, verdict), and give
    the fit of the same subset with the padding switched off (every angle count its own
    class) to 1e-8."""
    phi = [-45.0, 0.0, 45.0, 90.0]
    ds = hd.simulate(TRUTH, n_frames=40, phi=phi, noise=0.01, seed=7)
    given = hd.Parameters({k: 1.2 * v for k, v in TRUTH.items()})  # nothing to estimate
    for first in (phi, phi[2:]):
        for params in (None, given):
            result = hd.fit_nlsq(hd.select(ds, phi=first), params, progress=False)
            assert result.success and result.verdict.status != "fail"
    subsets = (phi[:3], phi[1:], [phi[0], phi[2]], phi[1:3])
    fits = []
    with Compiles() as compiles:
        for subset in subsets:
            for params in (None, given):
                fits.append(hd.fit_nlsq(hd.select(ds, phi=subset), params, progress=False))
                assert fits[-1].success and fits[-1].verdict.status != "fail", subset
                assert abs(fits[-1].value("v0") - TRUTH["v0"]) < 4 * fits[-1].error("v0")
    assert compiles.names == []

    monkeypatch.setattr(shapes, "angle_class", lambda n: n)
    for subset, padded in zip(subsets[:2], fits[::2], strict=False):
        plain = hd.fit_nlsq(hd.select(ds, phi=subset), progress=False)
        for name in padded.params.data_vars:
            np.testing.assert_allclose(
                padded.params[name].values, plain.params[name].values, rtol=1e-8, err_msg=name
            )
        np.testing.assert_allclose(padded.stderr["v0"], plain.stderr["v0"], rtol=1e-6)
