import dataclasses

import holoviews as hv
import numpy as np
import pytest
import xarray as xr

import heterodyne as hd
from heterodyne import model, plot
from heterodyne.parameters import Parameters

N_FRAMES = 40
PHI = [0.0, 45.0, 90.0]


@pytest.fixture(scope="module")
def ds():
    return hd.simulate({"v0": 500.0}, n_frames=N_FRAMES, phi=PHI, noise=0.01)


@pytest.fixture(scope="module")
def result(ds):
    return hd.fit_nlsq(ds, {"v0": 500.0}, progress=False)


def masked(c2):
    """Independent of plot.offdiagonal: NaN on the diagonal of each matrix."""
    eye = np.eye(c2.shape[-1], dtype=bool)
    return np.where(eye, np.nan, c2)


def drawn(image: hv.Image) -> np.ndarray:
    """The matrix ``c2[t1, t2]`` an Image holds (it stores z[t2, t1])."""
    return image.dimension_values(2, flat=False).T


def elements(overlay, kind) -> list:
    return [element for element in overlay if isinstance(element, kind)]


def plot_options(element) -> dict:
    return hv.Store.lookup_options("bokeh", element, "plot").kwargs


def lag_means(c2, n_lags=None):
    """Mean over pairs (i, i + k) for k = 1 .. n_lags (default N - 1), by np.diagonal: the
    reference for plot.diagonal_mean."""
    n_lags = c2.shape[-1] - 1 if n_lags is None else n_lags
    return np.array(
        [np.nanmean(np.diagonal(c2, k), dtype=np.float64) for k in range(1, n_lags + 1)]
    )


def test_c2_heatmaps_hold_the_data_with_a_masked_diagonal_and_a_shared_scale(ds):
    layout = plot.c2(ds)
    images = list(layout)
    assert len(images) == len(PHI)
    off = masked(ds["c2"].values)
    expected_clim = tuple(np.percentile(off[np.isfinite(off)], [1, 99]))
    t = ds["t1"].values
    for k, image in enumerate(images):
        assert isinstance(image, hv.Image)
        assert [d.name for d in image.kdims] == ["t1", "t2"]
        assert [d.name for d in image.vdims] == ["c2"]
        assert image.kdims[0].unit == "s"
        np.testing.assert_array_equal(drawn(image), off[k])
        np.testing.assert_allclose(image.dimension_values("t1", expanded=False), t)
        np.testing.assert_allclose(plot_options(image)["clim"], expected_clim)
        assert "hover" in plot_options(image)["tools"]
        assert f"φ = {PHI[k]:g} deg" in image.opts.get().kwargs["title"]
        assert "q = 0.01 1/Å" in image.opts.get().kwargs["title"]
    assert len(hv.render(layout, backend="bokeh").children) == len(PHI)


def test_diagonal_mean_equals_the_mean_along_each_diagonal():
    rng = np.random.default_rng(1)
    c2 = 1.0 + 0.1 * rng.normal(size=(2, 12, 12))
    c2[0, 3, 7] = np.nan  # a masked pair is left out of its lag's mean
    c2[1, 0, 11] = np.nan  # the only pair of the longest lag: NaN
    means = plot.diagonal_mean(c2)
    assert means.shape == (2, 11)
    np.testing.assert_allclose(means[0], lag_means(c2[0]), rtol=1e-14)
    np.testing.assert_allclose(means[1, :-1], lag_means(c2[1], 10), rtol=1e-14)
    assert np.isnan(means[1, -1])


def test_diagonal_mean_of_a_constant_rate_model_is_the_one_time_g2():
    # MODEL.md, "The one-time limit": with constant rates c2 depends on the lag only,
    # so its mean along each diagonal is g2(tau).
    p = Parameters(D0_ref=3e3, D0_sample=2e4, v0=400.0, phi0=10.0, f0=0.3)
    physics = p.physics_values()
    t = 0.1 + 0.1 * np.arange(30)
    phi = np.array([0.0, 60.0])
    grid = np.asarray(model.c2_grid(physics, 0.4, 1.0, t, phi, 0.01))
    g2 = np.asarray(model.g2(physics, 0.4, 1.0, t[1:] - t[0], phi, 0.01))
    np.testing.assert_allclose(plot.diagonal_mean(grid), g2, rtol=1e-10)


def test_cuts_hold_the_data_and_the_model_along_the_lag(ds, result):
    t = ds["t1"].values
    frames = [0, 10, 20, 29]  # four ages over the first three quarters of 40 frames
    np.testing.assert_array_equal(plot.age_frames(t), frames)
    layout = plot.cuts(ds, result)
    assert len(layout) == len(PHI)
    for k, overlay in enumerate(layout):
        scatters, curves = elements(overlay, hv.Scatter), elements(overlay, hv.Curve)
        assert len(scatters) == len(curves) == len(frames)
        for i, points, line in zip(frames, scatters, curves, strict=True):
            assert [d.name for d in points.kdims] == ["tau"]
            assert [d.name for d in points.vdims] == ["c2"]
            np.testing.assert_allclose(points.dimension_values("tau"), t[i + 1 :] - t[i])
            np.testing.assert_array_equal(
                points.dimension_values("c2"), ds["c2"].values[k, i, i + 1 :]
            )
            np.testing.assert_array_equal(
                line.dimension_values("c2"), result.model["c2"].values[k, i, i + 1 :]
            )
            assert points.label == line.label == f"t1 = {t[i]:.3g} s"
    hv.render(layout, backend="bokeh")


def test_cuts_take_ages_in_seconds_and_reject_ages_outside_the_run(ds):
    t = ds["t1"].values
    layout = plot.cuts(ds, ages=[t[5] + 0.01, t[30]])
    assert [s.label for s in elements(layout[0], hv.Scatter)] == [
        f"t1 = {t[5]:.3g} s",
        f"t1 = {t[30]:.3g} s",
    ]
    assert elements(layout[0], hv.Curve) == []
    with pytest.raises(hd.OptionError, match="outside the run"):
        plot.cuts(ds, ages=[t[-1]])


def test_fit_shows_data_model_residual_and_the_one_time_projection(result):
    layout = plot.fit(result)
    panels = list(layout)
    assert len(panels) == 4 * len(PHI)
    data = masked(result.data["c2"].values)
    fitted = masked(result.model["c2"].values)
    residual = result.residuals.values
    abs_residual = np.abs(residual[np.isfinite(residual)])
    bound = np.percentile(abs_residual, 99)
    clim = tuple(np.percentile(data[np.isfinite(data)], [1, 99]))
    for k in range(len(PHI)):
        data_image, model_image, residual_image, projection = panels[4 * k : 4 * k + 4]
        assert [d.name for d in data_image.vdims] == ["c2"]
        assert [d.name for d in model_image.vdims] == ["c2"]
        assert [d.name for d in residual_image.vdims] == ["residual"]
        np.testing.assert_array_equal(drawn(data_image), data[k])
        np.testing.assert_array_equal(drawn(model_image), fitted[k])
        np.testing.assert_array_equal(drawn(residual_image), residual[k])
        np.testing.assert_allclose(plot_options(data_image)["clim"], clim)
        np.testing.assert_allclose(plot_options(model_image)["clim"], clim)
        np.testing.assert_allclose(plot_options(residual_image)["clim"], (-bound, bound))
        assert hv.Store.lookup_options("bokeh", residual_image, "style").kwargs["cmap"] == "RdBu_r"
        (points,), (line,) = elements(projection, hv.Scatter), elements(projection, hv.Curve)
        np.testing.assert_allclose(points.dimension_values("c2"), lag_means(data[k]), rtol=1e-13)
        np.testing.assert_allclose(line.dimension_values("c2"), lag_means(fitted[k]), rtol=1e-13)
        np.testing.assert_allclose(
            points.dimension_values("tau"), np.arange(1, N_FRAMES) * result.data.attrs["dt"]
        )
    assert len(result.plot()) == len(panels)
    assert len(hv.render(layout, backend="bokeh").children) == len(panels)
    assert columns(layout) == 2  # data | model, residual | projection: a notebook's width


def survey_dataset():
    q = [0.01, 0.02, 0.04]
    return xr.Dataset(
        {
            "D0_ref": ("q", [1e3, 2e3, 4e3], {"units": "Å²/s^(1+α)"}),
            "D0_ref_stderr": ("q", [50.0, 80.0, 300.0]),
            "alpha_ref": ("q", [0.0, 0.0, 0.0]),
            "alpha_ref_stderr": ("q", [np.nan, np.nan, np.nan]),  # fixed: no panel
            "phi0": ("q", [-5.0, 2.0, 4.0], {"units": "deg"}),
            "phi0_stderr": ("q", [1.0, 1.0, 500.0]),  # undetermined at the last q
            "contrast": (("q", "phi"), [[0.5, 0.4], [0.45, 0.35], [0.4, 0.3]]),
            "contrast_stderr": (("q", "phi"), np.full((3, 2), 0.01)),
        },
        coords={"q": ("q", q, {"units": "1/Å"}), "phi": [0.0, 90.0]},
    )


def test_params_draws_values_with_error_bars_along_the_survey():
    survey = survey_dataset()
    layout = plot.params(survey)
    assert [overlay.opts.get().kwargs["title"] for overlay in layout] == [
        "D0_ref",
        "phi0",
        "contrast",
    ]
    d0, phi0, contrast = layout
    (points,), (bars,) = elements(d0, hv.Scatter), elements(d0, hv.ErrorBars)
    assert [d.name for d in points.kdims] == ["q"]
    assert points.kdims[0].unit == "1/Å"
    assert [d.name for d in points.vdims] == ["D0_ref"]
    np.testing.assert_array_equal(points.dimension_values("q"), survey["q"].values)
    np.testing.assert_array_equal(points.dimension_values("D0_ref"), survey["D0_ref"].values)
    np.testing.assert_allclose(
        bars.dimension_values("high"), survey["D0_ref_stderr"].values, rtol=1e-12
    )
    assert plot_options(d0)["logy"] is True
    assert plot_options(phi0)["logy"] is False  # not a log-scale parameter
    # bars are clipped to the bounds [-90, 90] deg of phi0
    (bars,) = elements(phi0, hv.ErrorBars)
    np.testing.assert_allclose(bars.dimension_values("low"), [1.0, 1.0, 94.0], rtol=1e-12)
    np.testing.assert_allclose(bars.dimension_values("high"), [1.0, 1.0, 86.0], rtol=1e-12)
    assert len(elements(contrast, hv.Scatter)) == 2  # one series per angle
    np.testing.assert_array_equal(
        elements(contrast, hv.Scatter)[1].dimension_values("contrast"),
        survey["contrast"].values[:, 1],
    )
    # the same survey as a (params, stderr) pair
    names = ["D0_ref", "alpha_ref", "phi0", "contrast"]
    errors = survey[[f"{n}_stderr" for n in names]].rename({f"{n}_stderr": n for n in names})
    pair = plot.params((survey[names], errors))
    assert len(pair) == 3
    hv.render(layout, backend="bokeh")


def test_params_stacks_fit_results_along_their_q(result):
    shifted = dataclasses.replace(
        result,
        params=result.params.assign_coords(q=0.02),
        stderr=result.stderr.assign_coords(q=0.02),
    )
    layout = plot.params([result, shifted], x="q")
    titles = [overlay.opts.get().kwargs["title"] for overlay in layout]
    varied = [n for n in result.params.data_vars if np.isfinite(result.stderr[n].values).any()]
    assert titles == varied
    v0 = layout[titles.index("v0")]
    np.testing.assert_array_equal(elements(v0, hv.Scatter)[0].dimension_values("q"), [0.01, 0.02])
    np.testing.assert_allclose(
        elements(v0, hv.ErrorBars)[0].dimension_values("high"),
        [float(result.stderr["v0"])] * 2,
        rtol=1e-12,
    )
    with pytest.raises(hd.OptionError, match="no coordinate 'file'"):
        plot.params([result, shifted], x="file")

    alone = plot.params([result], x="q")  # one bin: drawn at its q, not at 0 of -1..1
    x_axis = hv.render(alone[0], backend="bokeh").x_range
    assert (x_axis.start, x_axis.end) == pytest.approx((0.009, 0.011), rel=1e-12)


def test_save_writes_standalone_html_without_a_cdn(tmp_path, result):
    layout = plot.fit(result)
    path = plot.save(layout, tmp_path / "fit.html")
    text = path.read_text(encoding="utf-8")
    assert "cdn.bokeh.org" not in text
    assert "<script src=" not in text  # BokehJS is inline, nothing is fetched
    assert "<title>fit.html</title>" in text and text.count("weighted residual") >= len(PHI)
    with pytest.raises(FileExistsError):
        plot.save(layout, path)
    plot.save(plot.c2(result.data), path, overwrite=True)
    assert "weighted residual" not in path.read_text(encoding="utf-8")


def columns(layout) -> int:
    """Panels side by side in the rendered bokeh grid."""
    return 1 + max(col for _, _, col in hv.render(layout, backend="bokeh").children)


@pytest.fixture(scope="module")
def cmc_result():
    truth = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
    ds = hd.simulate(truth, n_frames=24, phi=[0, 60], noise=0.02, seed=1)
    start = hd.Parameters(truth).fix("alpha_ref", "alpha_sample", "beta", "f1")
    nlsq = hd.fit_nlsq(ds, start, progress=False)
    with pytest.warns(UserWarning, match="failed its diagnostics"):
        return hd.fit_cmc(ds, nlsq, shards=2, warmup=30, samples=30, progress=False)


def test_posterior_shows_marginals_pairs_traces_and_the_verdict(cmc_result):
    layout = hd.plot.posterior(cmc_result)
    varied = ["D0_ref", "D0_sample", "v0", "f0", "phi0"]
    titles = [panel.opts.get("plot").kwargs.get("title", "") for panel in layout]
    assert titles[:5] == [f"{name}: marginal" for name in varied]
    assert sum(" vs " in t for t in titles) == plot.N_PAIRS
    assert [t for t in titles if "trace" in t] == [f"{n}: trace by chain" for n in varied]
    assert columns(layout) == plot.COLUMNS == 2  # fits a notebook's width
    trace = layout[titles.index("v0: trace by chain")]
    shard_draws = cmc_result.posterior.shard_posterior["v0"].transpose("shard", "chain", "draw")
    curves = list(trace)  # shard 0 chain 0, shard 0 chain 1, shard 1 chain 0, ...
    assert [c.label for c in curves] == ["chain 0", "chain 1"] * 2
    np.testing.assert_array_equal(curves[3].dimension_values("v0"), shard_draws.values[1, 1])
    assert (
        curves[1].opts.get("style").kwargs["color"] != curves[0].opts.get("style").kwargs["color"]
    )
    marginal = layout[0]
    draws = cmc_result.posterior.posterior["D0_ref"].values.ravel()
    histogram = marginal.get(0)
    np.testing.assert_allclose(
        np.sum(histogram.dimension_values("density") * np.diff(histogram.edges)), 1.0, rtol=1e-12
    )
    assert histogram.edges[0] == draws.min() and histogram.edges[-1] == draws.max()
    table = layout[-1].get(0)
    failed = cmc_result.failures()
    for shard in (0, 1):
        cells = table.select(shard=f"shard {shard}")
        rhat_ok = cells.select(figure="max R-hat").dimension_values("pass")[0]
        assert bool(rhat_ok) == (not any(f.startswith("R-hat") for f in failed.get(shard, [])))
    verdict = table.opts.get("plot").kwargs["title"]
    assert verdict == "diagnostics: NOT converged" and not cmc_result.converged
