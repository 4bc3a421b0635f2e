"""fit_nlsq against truth, against an independent curve_fit, and its contracts."""

import dataclasses

import jax
import numpy as np
import pytest
from _work import Compiles
from scipy.optimize import curve_fit

import heterodyne as hd
from heterodyne import model, nlsq, objective, starts, structured
from heterodyne.pairs import fitted_pairs
from heterodyne.parameters import LOG_DECADES, PHYSICS_NAMES
from heterodyne.results import at_entries, entry_label, index_of

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
PHI = [-45.0, 0.0, 45.0]


# the compiled normal equations, on either path
NORMAL_EQUATIONS = (objective.block_normal_equations, *structured.STAGES)


def off_by_30_percent(truth=TRUTH):
    p = hd.Parameters(truth)
    for name, value in truth.items():
        p[name].value = value * 1.3
    return p


@pytest.fixture(scope="module")
def dataset():
    return hd.simulate(TRUTH, n_frames=60, phi=PHI, noise=0.01, seed=1)


def test_recovers_truth_from_a_guess_30_percent_off(dataset):
    result = hd.fit_nlsq(dataset, off_by_30_percent(), progress=False)
    assert result.success
    assert result.reduced_chi2 == pytest.approx(0.01**2, rel=0.05)
    for name in result.params.data_vars:
        value, error = result.params[name].values, result.stderr[name].values
        truth = dataset.attrs[f"true_{name}"]
        varied = np.isfinite(error)
        assert np.all(np.abs(value - truth)[varied] < 3 * error[varied] + 1e-12), name


@pytest.mark.parametrize("sampled", [False, True])
def test_starting_scaling_is_the_least_squares_line_through_the_data(dataset, sampled, monkeypatch):
    """At the true physics, contrast and offset come out of the closed-form line fit; it
    equals numpy's lstsq on the same pairs (all of them, or those of two blocks of rows
    when the budget of pairs is small) and recovers the simulated 0.5 and 1.0."""
    c2 = dataset["c2"].values.copy()
    c2[1, 3:9, 20:30] = c2[1, 20:30, 3:9] = np.nan
    ds = hd.from_arrays(c2, dataset["t1"].values, dataset["phi"].values, float(dataset["q"]))
    physics = hd.Parameters(TRUTH).physics_values()
    n = c2.shape[-1]
    rows = np.arange(n)
    if sampled:  # blocks of 16 rows: the first and the last
        monkeypatch.setattr(model, "ROW_BLOCK", 16)
        monkeypatch.setattr(starts, "SCALING_VALUES", 2 * 16 * n)
        last = (n - 1) // 16 * 16
        rows = np.concatenate([np.arange(16), np.arange(last, n)])
    got = starts.estimate_scaling(ds, physics)
    t, phi, q = ds["t1"].values, ds["phi"].values, float(ds["q"])
    g = np.asarray(model.c2_grid(physics, 1.0, 0.0, t, phi, q))
    i, j = np.triu_indices(n, 1)
    in_rows = np.isin(i, rows)
    i, j = i[in_rows], j[in_rows]
    for k in range(c2.shape[0]):
        ok = np.isfinite(c2[k, i, j])
        design = np.stack([np.ones(ok.sum()), g[k, i, j][ok]], axis=1)
        (offset, contrast), *_ = np.linalg.lstsq(design, c2[k, i, j][ok], rcond=None)
        assert got["contrast"][k] == pytest.approx(contrast, rel=1e-10)
        assert got["offset"][k] == pytest.approx(offset, rel=1e-10)
    np.testing.assert_allclose(got["contrast"], 0.5, rtol=0.02)
    np.testing.assert_allclose(got["offset"], 1.0, rtol=0.002)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_starting_scaling_falls_back_to_the_plateaus_where_g_does_not_vary(dataset, rate):
    """No transport at all: g is the same at every pair, the line has no slope; or
    hardly any (D = 1 Å²/s: g varies by ~1e-4 where the data vary by the contrast), the
    line's contrast is in the hundreds, which no speckle has. The start comes from the
    far-lag median (offset) and the lag-1 mean (offset + contrast)."""
    still = hd.Parameters(
        {**TRUTH, "D0_ref": rate, "D0_sample": rate, "v0": 0.0, "f0": 0.0}
    ).physics_values()
    got = starts.estimate_scaling(dataset, still)
    c2 = dataset["c2"].values
    n = c2.shape[-1]
    i, j = np.triu_indices(n, 1)
    far, near = (j - i) >= int(0.9 * (n - 1)), (j - i) == 1
    for k in range(c2.shape[0]):
        offset = np.median(c2[k, i[far], j[far]])
        assert got["offset"][k] == pytest.approx(offset, rel=1e-12)
        assert got["contrast"][k] == pytest.approx(np.mean(c2[k, i[near], j[near]]) - offset)


@pytest.mark.slow
def test_stderr_matches_the_scatter_over_noise_seeds():
    """Issue 3: noise 0.01, 3 angles, N = 200, start 30 % off; 20 seeds."""
    fits = []
    for seed in range(20):
        ds = hd.simulate(TRUTH, n_frames=200, phi=PHI, noise=0.01, seed=seed)
        fits.append(hd.fit_nlsq(ds, off_by_30_percent(), progress=False))
    index = index_of(fits[0].covariance)
    labels = list(index)
    values = np.array([at_entries(f.params, index) for f in fits])
    errors = np.array([at_entries(f.stderr, index) for f in fits])
    attrs, layout = fits[0].data.attrs, fits[0].params
    truth = at_entries(
        layout.copy(
            data={n: np.broadcast_to(attrs[f"true_{n}"], v.shape) for n, v in layout.items()}
        ),
        index,
    )
    z = (values - np.asarray(truth)) / errors
    assert np.all(np.abs(z) < 3.5), dict(zip(labels, np.abs(z).max(axis=0), strict=True))
    ratio = errors.mean(axis=0) / values.std(axis=0, ddof=1)
    assert np.all((ratio > 1 / 1.5) & (ratio < 1.5)), dict(zip(labels, ratio, strict=True))


def test_one_time_limit_matches_curve_fit_of_closed_form_g2():
    truth = {**TRUTH, "f0": 0.35}
    ds = hd.simulate(
        truth,
        n_frames=40,
        phi=[0.0, 60.0],
        contrast=[0.4, 0.3],
        offset=[1.0, 1.02],
        noise=0.01,
        seed=3,
    )
    p = off_by_30_percent(truth).fix("alpha_ref", "alpha_sample", "beta", "f1")
    tight = {"ftol": 1e-14, "xtol": 1e-14, "gtol": 1e-14}
    result = hd.fit_nlsq(ds, p, progress=False, **tight)

    i, j = np.triu_indices(ds.sizes["t1"], 1)
    tau = ds["t1"].values[j] - ds["t1"].values[i]
    phi = ds["phi"].values
    y = ds["c2"].values[:, i, j].ravel()
    angle = np.repeat(np.arange(phi.size), tau.size)
    tau_all = np.tile(tau, phi.size)
    q = float(ds["q"])

    def g2(_, D_r, D_s, v, f0, phi0, c0, c1, o0, o1):
        X = f0**2 / (f0**2 + (1 - f0) ** 2)
        cos = np.cos(q * v * tau_all * np.cos(np.deg2rad(phi[angle] - phi0)))
        g = (
            (1 - X) ** 2 * np.exp(-q * q * D_r * tau_all)
            + X**2 * np.exp(-q * q * D_s * tau_all)
            + 2 * X * (1 - X) * np.exp(-q * q * (D_r + D_s) * tau_all / 2) * cos
        )
        return np.array([o0, o1])[angle] + np.array([c0, c1])[angle] * g

    start = [p[n].value for n in TRUTH] + [0.35, 0.25, 1.0, 1.0]
    popt, _ = curve_fit(g2, None, y, p0=start, **tight, maxfev=100000)
    ours = [result.value(n) for n in TRUTH]
    ours += [result.value(name, phi=angle) for name in ("contrast", "offset") for angle in phi]
    np.testing.assert_allclose(ours, popt, rtol=1e-6)


def test_normal_equations_equal_the_explicit_jacobian(dataset):
    problem = hd.Objective.build(dataset, off_by_30_percent(), fix=(), scaling="per_angle")
    x = problem.x0 * 1.01
    jtj, jtr, rtr = problem.normal_equations(x)
    jac = np.asarray(
        jax.jacfwd(objective.free_residuals)(
            x, problem.template, problem.free, problem.pairs, problem.n_scale
        )
    )
    r = problem.residuals(x)
    np.testing.assert_allclose(jtj, jac.T @ jac, rtol=1e-10, atol=1e-12 * np.abs(jtj).max())
    np.testing.assert_allclose(jtr, jac.T @ r, rtol=1e-10, atol=1e-12 * np.abs(jtr).max())
    assert rtr == pytest.approx(r @ r, rel=1e-12)
    # the compressed problem has the same geometry as the full one
    compressed = nlsq.Compressed(problem.normal_equations)
    f_c, j_c = compressed.residual(x), compressed.jacobian(x)
    np.testing.assert_allclose(j_c.T @ j_c, jtj, rtol=1e-9, atol=1e-12 * np.abs(jtj).max())
    np.testing.assert_allclose(j_c.T @ f_c, jtr, rtol=1e-8, atol=1e-10 * np.abs(jtr).max())
    assert f_c @ f_c == pytest.approx(rtr, rel=1e-12)


def test_fixed_parameters_stay_put_and_shared_scaling(dataset):
    p = off_by_30_percent()
    p["phi0"].value = 20.0
    result = hd.fit_nlsq(dataset, p, fix=["phi0", "beta"], scaling="shared", progress=False)
    assert float(result.params["phi0"]) == 20.0 and float(result.params["beta"]) == 0.0
    assert np.isnan(float(result.stderr["phi0"]))
    contrast = result.params["contrast"].values
    assert np.all(contrast == contrast[0]) and contrast[0] == pytest.approx(0.5, abs=0.01)
    assert "phi0" not in result.covariance["name"].values
    assert "contrast" in result.covariance["name"].values


def test_multistart_is_deterministic_keeps_all_starts_and_does_not_recompile(dataset):
    with Compiles() as compiles:
        a = hd.fit_nlsq(dataset, off_by_30_percent(), multistart=3, seed=5, progress=False)
        b = hd.fit_nlsq(dataset, off_by_30_percent(), multistart=3, seed=5, progress=False)
    assert compiles.of(*NORMAL_EQUATIONS) <= 1
    assert a.starts.sizes["start"] == 4
    assert float(a.starts["cost"].min()) == pytest.approx(a.chi2 / 2, rel=1e-12)
    for name in a.params.data_vars:
        np.testing.assert_array_equal(a.params[name].values, b.params[name].values)
    np.testing.assert_array_equal(a.starts["x"].values, b.starts["x"].values)


def test_multistart_design_is_inside_bounds_and_log_uniform_for_scales(dataset):
    problem = hd.Objective.build(dataset, None, fix=(), scaling="per_angle")
    starts = problem.design(256, seed=0)
    assert np.all(starts >= problem.lower) and np.all(starts <= problem.upper)
    k = problem.names.index("D0_sample")
    decades = np.log10(starts[:, k])
    # log-uniform over LOG_DECADES decades below the upper bound: uniform in log10
    assert decades.min() >= 7 - LOG_DECADES and decades.max() <= 7
    assert abs(np.mean(decades) - (7 - LOG_DECADES / 2)) < 0.2


def test_dropped_frames_are_masked_counted_and_reported(dataset):
    c2 = dataset["c2"].values.copy()
    c2[:, [7, 8, 30], :] = np.nan
    c2[:, :, [7, 8, 30]] = np.nan
    ds = hd.from_arrays(c2, dataset["t1"].values, dataset["phi"].values, float(dataset["q"]))
    assert (ds.attrs["dropped_frames"], ds.attrs["nan_pairs"]) == (3, 3 * (60 * 59 - 57 * 56) // 2)
    result = hd.fit_nlsq(ds, off_by_30_percent(), progress=False)
    complete = hd.fit_nlsq(dataset, off_by_30_percent(), progress=False)
    assert result.success
    assert all(np.isfinite(v.values).all() for v in result.params.data_vars.values())
    assert result.info["dropped_frames"] == 3 and "dropped frames: 3" in result.report()
    assert result.info["n_pairs"] == 3 * 57 * 56 // 2
    for name in ("v0", "phi0", "D0_sample"):
        assert abs(result.value(name) - complete.value(name)) < 2 * result.error(name), name


def test_nan_pairs_are_masked_and_counted(dataset):
    ds = dataset.copy(deep=True)
    ds["c2"].values[:, 5:9, 20:30] = np.nan
    ds["c2"].values[:, 20:30, 5:9] = np.nan
    ds = hd.from_arrays(ds["c2"].values, ds["t1"].values, ds["phi"].values, float(ds["q"]))
    assert ds.attrs["nan_pairs"] == 3 * 4 * 10
    result = hd.fit_nlsq(ds, off_by_30_percent(), progress=False)
    assert result.info["nan_pairs"] == 120 and "masked non-finite pairs: 120" in result.report()
    assert result.info["n_pairs"] == 3 * 60 * 59 // 2 - 120
    assert abs(result.value("v0") - 800) < 3 * result.error("v0")


def test_model_and_residual_grids_are_made_when_read_and_agree_with_the_fit(dataset):
    ds = dataset.copy(deep=True)
    ds["c2"].values[:, 5:9, 20:30] = np.nan
    ds["c2"].values[:, 20:30, 5:9] = np.nan
    result = hd.fit_nlsq(ds, off_by_30_percent(), progress=False)
    # the fit holds no grid of the data's size: each is computed when first read
    assert "model" not in vars(result) and "residuals" not in vars(result)
    p = result.params
    physics = np.array([float(p[name]) for name in PHYSICS_NAMES])
    t, phi, q = ds["t1"].values, ds["phi"].values, float(ds["q"])
    direct = np.asarray(model.c2_grid(physics, p["contrast"].values, p["offset"].values, t, phi, q))
    np.testing.assert_allclose(result.model["c2"].values, direct, rtol=1e-6)
    assert result.model["c2"].dtype == np.float32
    r = result.residuals.values.astype(np.float64)
    upper = np.triu(np.ones(r.shape[1:], dtype=bool), 1)
    fitted = upper & np.isfinite(ds["c2"].values)
    np.testing.assert_allclose(r[fitted], (direct - ds["c2"].values)[fitted], atol=1e-6)
    assert np.all(np.isnan(r[~fitted & upper])) and np.all(np.isnan(r[:, np.eye(60, dtype=bool)]))
    np.testing.assert_array_equal(r, r.transpose(0, 2, 1))
    # the solver's chi2, from the normal equations, is the sum of the squares on the grid
    assert np.sum(r[fitted] ** 2) == pytest.approx(result.chi2, rel=1e-5)


def test_sigma_weighted_errors_are_absolute(dataset):
    ds = hd.simulate(TRUTH, n_frames=60, phi=PHI, noise=0.01, seed=1, store_sigma=True)
    weighted = hd.fit_nlsq(ds, off_by_30_percent(), progress=False)
    unweighted = hd.fit_nlsq(dataset, off_by_30_percent(), progress=False)
    assert weighted.reduced_chi2 == pytest.approx(1.0, rel=0.05)
    for name in TRUTH:
        assert weighted.value(name) == pytest.approx(unweighted.value(name), rel=1e-8)
        ratio = weighted.error(name) / unweighted.error(name)
        assert ratio == pytest.approx(1 / np.sqrt(unweighted.reduced_chi2) * 0.01, rel=1e-6)


def test_round_trip_through_netcdf(dataset, tmp_path):
    result = hd.fit_nlsq(dataset, off_by_30_percent(), progress=False)
    path = result.to_netcdf(tmp_path / "fit.nc")
    again = hd.open_result(path)
    assert isinstance(again, hd.NLSQResult)
    assert again.report() == result.report()
    for name in ("params", "stderr", "starts", "model", "data", "settings"):
        assert getattr(again, name).identical(getattr(result, name)), name
    assert again.covariance.identical(result.covariance)
    np.testing.assert_array_equal(again.residuals.values, result.residuals.values)
    with pytest.raises(FileExistsError):
        result.to_netcdf(path)


def test_report_flags_degenerate_pairs_and_bounds(dataset):
    p = off_by_30_percent()
    p["D_offset_sample"].vary = True
    p["alpha_sample"].vary = False
    with pytest.warns(UserWarning, match="one rate"):
        result = hd.fit_nlsq(dataset, p, progress=False)
    report = result.report()
    assert result.verdict.status == "check"
    # one line for the degenerate group, in the verdict at the top of the report
    assert report.startswith("[[Verdict]] CHECK")
    assert report.count("D0_sample, D_offset_sample are degenerate") == 1
    assert "C(D0_sample, D_offset_sample) = +1.0000" in report


def test_report_columns_stay_apart_at_every_width(dataset):
    """The widest figure of each column (a relative error of 35571.29 %, a value of
    -1.23457e+06) keeps a space before the next column: every row splits back into its
    value, stderr and relative error."""
    result = hd.fit_nlsq(dataset, off_by_30_percent(), progress=False)
    wide = dataclasses.replace(result, stderr=result.stderr.map(lambda e: 355.7129 * e))
    rows = wide.report().split("[[Parameters]]")[1].split("[[")[0].splitlines()[2:]
    entries = {}  # display label -> (name, phi) of every quantity, per angle where it is
    for name, values in wide.params.data_vars.items():
        for phi in values["phi"].values if "phi" in values.dims else [None]:
            entries[entry_label(name, np.nan if phi is None else phi)] = (name, phi)
    shown = 0
    for row in rows:
        label, value, error, rel, *_ = row.split()
        if error == "-":
            continue
        name, phi = entries[label]
        assert float(error) == pytest.approx(wide.error(name, phi), rel=1e-3), row
        relative = 100 * float(error) / abs(float(value))
        if rel == ">1e5%":
            assert relative > 0.999e5, row
        else:
            assert float(rel.rstrip("%")) == pytest.approx(relative, rel=1e-3), row
        shown += 1
    assert shown == len(result.parameters().varied) + 2 * len(PHI)  # physics + contrast, offset


def test_static_reference_at_the_bound_is_reported():
    truth = {**TRUTH, "D0_ref": 0.0}
    ds = hd.simulate(truth, n_frames=50, phi=PHI, noise=0.01, seed=2)
    p = off_by_30_percent(truth)
    p["D0_ref"].value = 500.0
    result = hd.fit_nlsq(ds, p, progress=False)
    assert result.value("D0_ref") < 5.0
    assert abs(result.value("v0") - 800) < 3 * result.error("v0")


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda ds, p: (ds.rename({"c2": "g2"}), p), hd.DataError, "no variable 'c2'"),
        (lambda ds, p: (ds.assign(c2=ds.c2 * np.nan), p), hd.DataError, "all NaN"),
        (lambda ds, p: (ds, p.__setitem__("v0", -1.0) or p), hd.ParameterError, "outside"),
        (lambda ds, p: (ds, setattr(p["v0"], "min", 2e6) or p), hd.ParameterError, "min"),
        (lambda ds, p: (ds, {"velocity": 3.0}), hd.ParameterError, "unknown parameter"),
        (lambda ds, p: (ds, "v0=3"), hd.ParameterError, "params must be"),
    ],
)
def test_bad_input_fails_before_any_compile(dataset, mutate, error, match):
    ds, p = mutate(dataset.copy(deep=True), hd.Parameters(TRUTH))
    with Compiles() as compiles, pytest.raises(error, match=match):
        hd.fit_nlsq(ds, p, progress=False)
    assert compiles.of(*NORMAL_EQUATIONS) == 0


def test_bad_options(dataset):
    with pytest.raises(hd.OptionError, match="scaling"):
        hd.fit_nlsq(dataset, scaling="global", progress=False)
    with pytest.raises(hd.OptionError, match="multistart"):
        hd.fit_nlsq(dataset, multistart=-1, progress=False)
    with pytest.raises(hd.ParameterError, match="unknown parameter 'vzero'"):
        hd.fit_nlsq(dataset, fix=["vzero"], progress=False)
    with pytest.raises(hd.OptionError, match="jac"):
        hd.fit_nlsq(dataset, jac="2-point", progress=False)


def test_pairs_exclude_diagonal_and_lower_triangle(dataset):
    pairs = fitted_pairs(dataset)
    assert np.all(np.asarray(pairs.i) < np.asarray(pairs.j))
    assert pairs.n_pairs == 3 * 60 * 59 // 2
