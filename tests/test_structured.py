"""The separable normal equations against the blocked-Jacobian path they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _work import Compiles

import heterodyne as hd
from heterodyne import model, nlsq, objective, pairs, structured
from heterodyne.parameters import PHYSICS_NAMES

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
# every physics parameter varies, so that each column of the Jacobian is checked
pytestmark = pytest.mark.filterwarnings("ignore:f0 and f2 enter only")


def random_physics(rng, **overrides):
    """Rates that decay and oscillate on the grid, with every time dependence switched on
    (``alpha``, ``beta``, ``f1`` and the offsets non-zero)."""
    p = {
        "D0_ref": 10 ** rng.uniform(2.5, 4),
        "alpha_ref": rng.uniform(-1, 1),
        "D_offset_ref": rng.uniform(0, 300),
        "D0_sample": 10 ** rng.uniform(3, 4.5),
        "alpha_sample": rng.uniform(-1, 1),
        "D_offset_sample": rng.uniform(0, 300),
        "v0": 10 ** rng.uniform(2, 3.3),
        "beta": rng.uniform(-1, 1),
        "v_offset": rng.uniform(-100, 100),
        "f0": rng.uniform(0.1, 0.8),
        "f1": rng.uniform(-0.5, 0.5),
        "f2": rng.uniform(-1, 1),
        "f3": rng.uniform(0, 0.2),
        "phi0": rng.uniform(-90, 90),
    }
    return {**p, **overrides}


def problem_for(ds, values, scaling="per_angle", fix=()):
    """The NLSQ problem with every physics parameter varied except ``fix``."""
    p = hd.Parameters(values)
    for name in PHYSICS_NAMES:
        p[name].vary = True
    return hd.Objective.build(ds, p, fix=fix, scaling=scaling)


def both_paths(problem, x, block=None):
    """``(J^T J, J^T r, r^T r)`` from the blocked Jacobian and from the separable form,
    both on the data in float64, with the angles padded to their class and cut back."""
    pad, n = problem.padding, np.size(x)
    padded_x = jnp.asarray(np.concatenate([x, pad.tail]))
    plain = objective.blocked_normal_equations(
        padded_x, pad.template, pad.free, problem.pairs, pad.n_scale
    )
    n_physics = int(np.sum(np.asarray(problem.free) < len(PHYSICS_NAMES)))
    fast = structured.normal_equations(
        padded_x,
        pad.template,
        pad.free,
        structured.blocks(problem.ds, block, dtype=np.float64),
        pad.n_scale,
        n_physics,
    )
    return [
        [np.asarray(jtj)[:n, :n], np.asarray(jtr)[:n], np.asarray(rtr)]
        for jtj, jtr, rtr in (plain, fast)
    ]


def assert_same_normal_equations(plain, fast, rtol=1e-10):
    """Entry by entry to ``rtol``; entries that cancel to nearly zero are held to ``rtol``
    of their natural scale, ``sqrt(A_pp A_qq)`` for ``J^T J`` and ``sqrt(A_pp r^T r)``
    for ``J^T r`` (Cauchy-Schwarz bounds). A parameter without effect at ``x`` (a zero
    column) must be exactly zero on both paths."""
    (jtj, jtr, rtr), (jtj_f, jtr_f, rtr_f) = plain, fast
    live = np.diag(jtj) > 0
    assert np.all(jtj_f[~live] == 0) and np.all(jtr_f[~live] == 0)
    jtj, jtj_f = jtj[np.ix_(live, live)], jtj_f[np.ix_(live, live)]
    jtr, jtr_f = jtr[live], jtr_f[live]
    norms = np.sqrt(np.diag(jtj))
    for got, want, scale in (
        (jtj_f, jtj, np.outer(norms, norms)),
        (jtr_f, jtr, norms * np.sqrt(rtr)),
    ):
        error = np.abs(got - want) / (np.abs(want) + 1e-3 * scale)
        assert error.max() < rtol, np.unravel_index(np.argmax(error), error.shape)
    assert rtr_f == pytest.approx(rtr, rel=rtol)


def test_correlation_factors_reproduce_the_correlation_on_the_upper_triangle():
    rng = np.random.default_rng(0)
    t = 0.05 + 0.05 * np.arange(40)
    phi = np.array([-30.0, 0.0, 60.0])
    i, j = np.triu_indices(t.size)
    for _ in range(10):
        physics = jnp.asarray([random_physics(rng)[n] for n in PHYSICS_NAMES])
        frames = model.frame_integrals(physics, t)
        q_parallel = model.parallel_wavevector(physics, phi, 0.01)
        direct = model.correlation(
            frames._replace(**{k: v[:, None] for k, v in frames._asdict().items()}),
            frames._replace(**{k: v[None, :] for k, v in frames._asdict().items()}),
            0.01,
            q_parallel[:, None, None],
        )
        a, b, e = (np.asarray(v) for v in model.correlation_factors(frames, 0.01, q_parallel))
        separable = np.sum(a[:, i] * b[:, j] * np.exp(-(e[j] - e[i])), axis=-1)
        np.testing.assert_allclose(separable, np.asarray(direct)[:, i, j], rtol=0, atol=1e-13)
        assert np.all(np.diff(e, axis=0) >= 0)


@pytest.mark.parametrize(
    ("case", "phi", "scaling", "n_frames", "block"),
    [
        ("one angle, static reference, many steps", [10.0], "per_angle", 300, 16),
        ("several angles", [-45.0, 0.0, 30.0, 80.0], "per_angle", 50, 16),
        ("shared scaling", [-45.0, 0.0, 30.0], "shared", 50, 16),
        ("default block size, padded frames", [-20.0, 40.0], "per_angle", 37, None),
    ],
)
def test_fast_path_equals_the_blocked_jacobian_on_random_parameters(
    case, phi, scaling, n_frames, block
):
    rng = np.random.default_rng(len(case))
    overrides = {"D0_ref": 0.0, "D_offset_ref": 0.0} if "static" in case else {}
    truth = random_physics(rng, **overrides)
    ds = hd.simulate(truth, n_frames=n_frames, phi=phi, noise=0.01, seed=1)
    problem = problem_for(ds, truth, scaling)
    for _ in range(3):
        start = random_physics(rng, **overrides)
        z = np.asarray(problem.template).copy()
        z[: len(PHYSICS_NAMES)] = [start[n] for n in PHYSICS_NAMES]
        x = z[np.asarray(problem.free)] * rng.uniform(0.95, 1.05, problem.x0.size)
        plain, fast = both_paths(problem, x, block)
        if "static" in case:
            # J_r is floored at 0: alpha_ref has no effect on a static reference
            assert np.diag(plain[0])[problem.labels.index("alpha_ref")] == 0
        assert_same_normal_equations(plain, fast)


@pytest.mark.parametrize("n_frames", [3, 4, 9])
def test_a_handful_of_frames(n_frames):
    """Fewer frames than one block of either layout: all pairs are in a diagonal block."""
    ds = hd.simulate(TRUTH, n_frames=n_frames, phi=[0.0, 30.0], noise=0.01, seed=3)
    fix = tuple(name for name in PHYSICS_NAMES if name not in ("v0", "D0_sample"))
    problem = hd.Objective.build(ds, hd.Parameters(TRUTH), fix=fix, scaling="shared")
    assert problem.x0.size <= problem.pairs.n_pairs
    x = problem.x0 * np.random.default_rng(n_frames).uniform(0.9, 1.1, problem.x0.size)
    assert_same_normal_equations(*both_paths(problem, x))


def test_masked_pairs_and_a_fixed_contrast():
    rng = np.random.default_rng(7)
    truth = random_physics(rng)
    ds = hd.simulate(truth, n_frames=48, phi=[-30.0, 15.0, 70.0], noise=0.01, seed=2)
    c2 = ds["c2"].values.copy()
    c2[:, 5:9, 20:33] = np.nan  # a rectangle crossing block boundaries
    c2[1, 3, 4] = np.nan  # a pair next to the diagonal, one angle only
    c2[2, :, 40] = np.nan  # a dead frame
    c2 = c2 + 0.0 * np.swapaxes(c2, 1, 2)  # mirror the NaNs: the matrix stays symmetric
    ds = hd.from_arrays(c2, ds["t1"].values, ds["phi"].values, float(ds["q"]))
    problem = problem_for(ds, truth, fix=("contrast", "f2"))
    upper = np.triu(np.ones((48, 48), dtype=bool), 1)
    assert problem.pairs.n_pairs == int(np.sum(~np.isnan(c2) & upper))
    for _ in range(3):
        x = problem.x0 * rng.uniform(0.9, 1.1, problem.x0.size)
        assert_same_normal_equations(*both_paths(problem, x, block=16))


def test_sigma_constant_per_angle_uses_the_fast_path_and_per_pair_sigma_does_not():
    rng = np.random.default_rng(3)
    truth = random_physics(rng)
    ds = hd.simulate(truth, n_frames=40, phi=[0.0, 50.0], noise=0.01, seed=3, store_sigma=True)
    ds["sigma"].values[1] = 0.02
    problem = problem_for(ds, truth)
    assert structured.blocks(problem.ds) is not None  # the rule: one weight per angle
    x = problem.x0 * rng.uniform(0.9, 1.1, problem.x0.size)
    assert_same_normal_equations(*both_paths(problem, x, block=16))

    ds["sigma"].values[0, 3, 10] = ds["sigma"].values[0, 10, 3] = 0.03
    assert structured.blocks(problem_for(ds, truth).ds) is None


def test_mostly_masked_data_falls_back_to_the_blocked_jacobian():
    ds = hd.simulate(TRUTH, n_frames=30, phi=[0.0], noise=0.01, seed=4)
    c2 = ds["c2"].values.copy()
    far = np.abs(np.subtract.outer(np.arange(30), np.arange(30))) > 8
    c2[:, far] = np.nan
    ds = hd.from_arrays(c2, ds["t1"].values, ds["phi"].values, float(ds["q"]))
    assert structured.blocks(problem_for(ds, TRUTH).ds) is None


def test_gram_in_chunks_equals_the_pairwise_sum(monkeypatch):
    """``sum v v^T`` over the upper triangle, with the frames in one chunk, in chunks of
    one block and of two (the last a block of padding), against the pairs summed one by one in
    numpy: ``v = [c dg, g, 1]`` from the factors of the module docstring."""
    rng = np.random.default_rng(11)
    truth = random_physics(rng)
    ds = hd.simulate(truth, n_frames=100, phi=[-30.0, 20.0, 70.0], noise=0.01, seed=2)
    problem = problem_for(ds, truth)
    pad, data = problem.padding, problem.blocks
    n_physics = int(np.sum(np.asarray(problem.free) < len(PHYSICS_NAMES)))
    x = jnp.asarray(np.concatenate([problem.x0, pad.tail]))
    a, b, e, Da, Db, scale, _ = structured._factor_stage(
        x, pad.template, pad.free, data.t, data.live, data.phi, data.q, data.center,
        pad.n_scale, n_physics,
    )  # fmt: skip
    # the 100 frames of the data (the class pads them with zero factors)
    a, b, Da, Db = (np.asarray(v)[:, :100] for v in (a, b, Da, Db))
    e, scale = np.asarray(e)[:100], np.asarray(scale)
    i, j = np.triu_indices(100, 1)
    E = np.exp(e[i] - e[j])  # (pairs, M)
    g = np.einsum("apm,pm->ap", a[:, i] * b[:, j], E)
    dg = np.einsum("apmq,pm->apq", Da[:, i] * b[:, j, :, None] + a[:, i, :, None] * Db[:, j], E)
    v = np.concatenate([scale[:, None, None] * dg, g[..., None], np.ones_like(g[..., None])], -1)
    pairwise = np.einsum("apq,apr->aqr", v, v)

    def gram():  # a new function each time: traced with the GRAM_CHUNK of the moment
        return jax.jit(lambda *f: structured._separable_gram(*f, 100))(a, b, e, Da, Db, scale)[0]

    whole = np.asarray(gram())
    scale_of = np.sqrt(np.einsum("aqq,arr->aqr", pairwise, pairwise))
    assert np.max(np.abs(whole - pairwise) / scale_of) < 1e-12
    # one block a step (13 steps); two blocks a step (7 steps, the last a padding block)
    for chunk in (1, 64):
        monkeypatch.setattr(structured, "GRAM_CHUNK", chunk)
        chunked = np.asarray(gram())
        assert np.max(np.abs(chunked - pairwise) / scale_of) < 1e-12
        np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-14 * np.max(whole))


def test_no_overflow_where_the_exponents_span_thousands():
    """q² P reaches ~5e3 here (exp(710) overflows): blocks split at their first frame,
    wide diagonal blocks pair by pair; both stay exact."""
    truth = {**TRUTH, "D0_ref": 2e6, "D0_sample": 5e6, "alpha_sample": 0.5}
    ds = hd.simulate(truth, n_frames=60, phi=[0.0, 45.0], noise=0.01, seed=5)
    problem = problem_for(ds, truth)
    frames = model.frame_integrals(problem.template[: len(PHYSICS_NAMES)], problem.pairs.t)
    assert 1e-4 * float(frames.P_sample[-1]) > 4000
    plain, fast = both_paths(problem, problem.x0, block=16)
    assert np.all(np.isfinite(fast[0]))
    assert_same_normal_equations(plain, fast)


def test_cancelling_columns_are_zero_not_rounding_of_either_sign():
    """The exchange symmetry plane: r = s and equal rates, where the reference and sample
    terms of d/df0 and d/df1 cancel. Near it the pairwise path gives rounding (~1e-21)
    and the expanded sums rounding of their terms (~1e-15, of either sign): both are
    zero."""
    ds = hd.simulate(TRUTH, n_frames=30, phi=[0.0, 45.0], noise=0.01, seed=9)
    plane = hd.Parameters(D0_ref=1e4, D0_sample=1e4, f0=0.5, v0=1e3, phi0=0.0)
    problem = hd.Objective.build(ds, plane, fix=(), scaling="per_angle")
    x = problem.x0.copy()
    x[problem.labels.index("D0_sample")] *= 1 + 1e-13
    plain, fast = both_paths(problem, x, block=16)
    dead = [problem.labels.index(name) for name in ("f0", "f1")]
    assert np.all(fast[0][dead] == 0) and np.all(fast[1][dead] == 0)
    assert np.all(np.diag(plain[0])[dead] < 1e-18 * np.diag(plain[0]).max())
    live = np.ones(x.size, dtype=bool)
    live[dead] = False
    assert_same_normal_equations(
        [plain[0][np.ix_(live, live)], plain[1][live], plain[2]],
        [fast[0][np.ix_(live, live)], fast[1][live], fast[2]],
    )


def test_fits_agree_with_the_blocked_jacobian_path():
    ds = hd.simulate(
        {**TRUTH, "alpha_ref": 0.2, "beta": 0.3},
        n_frames=50,
        phi=[-40.0, 0.0, 40.0],
        noise=0.01,
        seed=6,
    )
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()})
    fits = []
    for fast in (True, False):
        problem = hd.Objective.build(ds, guess, fix=(), scaling="per_angle")
        # the dispatch's "rule does not apply" value, or the data in float64
        problem.blocks = structured.blocks(problem.ds, dtype=np.float64) if fast else None
        options = {"x_scale": "jac", "method": "trf"}
        fits.append(nlsq.solve(problem, problem.x0, options, progress=False))
    fast, plain = fits
    assert fast.nfev == plain.nfev
    np.testing.assert_allclose(fast.x, plain.x, rtol=1e-10)
    assert fast.cost == pytest.approx(plain.cost, rel=1e-10)
    np.testing.assert_allclose(fast.jtj, plain.jtj, rtol=1e-10)


def test_compiled_once_per_shape():
    """Refits, multistarts and another dataset of the same shape (other values, a
    different number of NaN pairs) reuse the compiled code."""
    ds = hd.simulate(TRUTH, n_frames=40, phi=[0.0, 60.0], noise=0.01, seed=8)
    guess = hd.Parameters({k: 1.2 * v for k, v in TRUTH.items()})
    hd.fit_nlsq(ds, guess, progress=False)
    with Compiles() as compiles:
        hd.fit_nlsq(ds, guess, multistart=2, progress=False)
    assert compiles.of(*structured.STAGES) == 0
    other = hd.simulate({**TRUTH, "v0": 500.0}, n_frames=40, phi=[0.0, 60.0], noise=0.02)
    with Compiles() as compiles:
        for rows in (slice(2, 4), slice(2, 5)):
            c2 = other["c2"].values.copy()
            c2[:, rows, 30:35] = np.nan
            c2[:, 30:35, rows] = np.nan
            masked = hd.from_arrays(c2, other["t1"].values, other["phi"].values, float(other["q"]))
            hd.fit_nlsq(masked, guess, progress=False)
    # the masked pairs (20, then 30) are padded to one length: one more compile in all
    assert compiles.of(*structured.STAGES) == 1


def test_float32_storage_moves_the_fit_by_a_negligible_fraction_of_its_errors():
    """The data stored in float32 (half the memory) against float64: the normal equations
    agree to 1e-4, the fitted physics to 1e-4 of their stderr; in float32 the fast path's
    centered data are exact, so both paths see the same numbers."""
    ds = hd.simulate(TRUTH, n_frames=60, phi=[-30.0, 30.0], noise=0.01, seed=9)
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()})
    problem = hd.Objective.build(ds, guess, fix=(), scaling="per_angle")
    assert problem.pairs.c2.dtype == problem.blocks.tiles.dtype == np.float32
    single = both_paths(problem, problem.x0)
    assert_same_normal_equations(*single)
    fits = {}
    for dtype in (np.float32, np.float64):
        problem.pairs = pairs.fitted_pairs(ds, dtype=dtype)
        problem.blocks = structured.blocks(ds, storage=dtype)
        assert problem.blocks.tiles.dtype == problem.blocks.diagonal.dtype == dtype
        fits[dtype] = (
            problem.normal_equations(problem.x0),
            nlsq.solve(problem, problem.x0, {"x_scale": "jac", "method": "trf"}, progress=False),
        )
    (single, fit32), (double, fit64) = fits[np.float32], fits[np.float64]
    assert_same_normal_equations(double, single, rtol=1e-4)
    result = hd.fit_nlsq(ds, guess, progress=False)
    physics = [k for k, label in enumerate(problem.labels) if label in PHYSICS_NAMES]
    stderr = np.array([result.error(problem.labels[k]) for k in physics])
    assert np.all(np.abs(fit32.x - fit64.x)[physics] < 1e-4 * stderr)
    assert fit32.cost == pytest.approx(fit64.cost, rel=1e-6)
