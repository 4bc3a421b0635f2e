"""Speckle-level two-time data against the model, and the structure of its noise."""

import numpy as np
import pytest

import heterodyne as hd
from heterodyne import model, speckle

N = 50
PHI = np.array([0.0, 70.0])
Q = 0.01
T = 0.1 + 0.1 * np.arange(N)
UPPER = np.triu_indices(N, 1)

# Heterodyne oscillation of period ~8 frames, decaying over ~10 frames.
FLOW = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
# Time-dependent rates and velocity, and a sample fraction falling from 0.7 to 0.3.
AGEING = {
    "D0_ref": 1e4,
    "alpha_ref": -0.5,
    "D0_sample": 2e4,
    "alpha_sample": 0.7,
    "v0": 500.0,
    "beta": 0.5,
    "f0": 0.6,
    "f1": -0.4,
    "f3": 0.1,
    "phi0": -30.0,
}


def pixel_stderr(intensity):
    """Standard error of each ``c2(i, j)`` from the scatter over pixels (delta method).

    ``c2 = <u_i u_j>`` with ``u = I / <I>`` per frame; linearising the ratio gives the
    per-pixel influence ``u_i u_j - c2 (u_i + u_j - 1)``, whose mean is 0.
    """
    errors = []
    for sector in intensity:
        u = sector / sector.mean(axis=0)
        c2 = u.T @ u / u.shape[0]
        influence = u[:, :, None] * u[:, None, :] - c2 * (u[:, :, None] + u[:, None, :] - 1.0)
        errors.append(influence.std(axis=0) / np.sqrt(u.shape[0]))
    return np.array(errors)


def model_c2(truth, contrast):
    physics = hd.Parameters(truth).physics_values()
    return np.asarray(model.c2_grid(physics, np.asarray(contrast), 1.0, T, PHI, Q))


def z_scores(truth, contrast, *, counts=None, seeds=range(6), n_pixels=1000):
    """``(c2 - model) / stderr`` of every pair of every seed, shape (seeds, phi, N, N)."""
    physics = hd.Parameters(truth).physics_values()
    expected = model_c2(truth, contrast) + (np.eye(N) / counts if counts else 0.0)
    z = []
    for seed in seeds:
        intensity = speckle.intensities(
            physics, np.asarray(contrast), T, PHI, Q, n_pixels=n_pixels, counts=counts, seed=seed
        )
        z.append((speckle.two_time(intensity) - expected) / pixel_stderr(intensity))
    return np.array(z)


@pytest.mark.parametrize(
    ("truth", "contrast", "counts"),
    [(FLOW, [0.5, 0.5], None), (AGEING, [0.3, 0.8], 3.0)],
    ids=["flow", "ageing-counted"],
)
def test_mean_is_the_model_within_the_pixel_sampling_error(truth, contrast, counts):
    z = z_scores(truth, contrast, counts=counts)
    off = z[:, :, UPPER[0], UPPER[1]]
    # Pairs sharing frames are correlated, so the rms over pairs scatters more than for
    # independent pairs: 24 blocks of 6 seeds of both cases gave 0.91 to 1.13.
    assert 0.85 < np.sqrt(np.mean(off**2)) < 1.3
    assert abs(np.mean(off)) < 0.5
    assert np.mean(np.abs(off) > 5) < 2e-3
    # With counting the diagonal carries the shot-noise spike 1 / counts on top of 1 + beta.
    diagonal = z[:, :, np.arange(N), np.arange(N)]
    assert 0.7 < np.sqrt(np.mean(diagonal**2)) < 1.4


def test_the_flow_case_resolves_the_heterodyne_term():
    # The comparison above can see the cross term: without the flow, the model is off by
    # more than 5 standard errors at a quarter of the pairs.
    physics = hd.Parameters(FLOW).physics_values()
    intensity = speckle.intensities(physics, np.array([0.5, 0.5]), T, PHI, Q, n_pixels=1000)
    still = model_c2({**FLOW, "v0": 0.0}, [0.5, 0.5])
    gap = np.abs(model_c2(FLOW, [0.5, 0.5]) - still) / pixel_stderr(intensity)
    assert np.mean(gap[:, UPPER[0], UPPER[1]] > 5) > 0.2


@pytest.mark.parametrize("contrast", [1.0, 0.8, 0.5, 0.37, 1 / 3, 0.07])
def test_mode_weights_give_the_contrast(contrast):
    weights = speckle.mode_weights([contrast])[0]
    assert np.all(weights >= 0)
    assert np.count_nonzero(weights) == int(np.ceil(1 / contrast - 1e-9))
    assert weights.sum() == pytest.approx(1.0, abs=1e-14)
    assert np.sum(weights**2) == pytest.approx(contrast, abs=1e-14)


def test_same_seed_same_dataset():
    kwargs = dict(n_frames=N, phi=PHI, noise="speckle", n_pixels=200, counts=5.0)
    first = hd.simulate(AGEING, seed=4, **kwargs)
    assert first.identical(hd.simulate(AGEING, seed=4, **kwargs))
    assert not np.allclose(first["c2"], hd.simulate(AGEING, seed=5, **kwargs)["c2"])
    assert "sigma" not in first.data_vars
    assert (first.attrs["noise"], first.attrs["n_pixels"], first.attrs["counts"]) == (
        "speckle",
        200,
        5.0,
    )
    np.testing.assert_array_equal(first.attrs["true_offset"], [1.0, 1.0])


def row_correlation(residual):
    """Correlation coefficient of the residuals of pairs ``(i, j)`` and ``(i, k)``, over all
    frames ``i`` and all ``j < k`` different from ``i``, pooled over the leading axes."""
    i, j, k = np.meshgrid(np.arange(N), np.arange(N), np.arange(N), indexing="ij")
    keep = (j < k) & (j != i) & (k != i)
    i, j, k = i[keep], j[keep], k[keep]
    flat = residual.reshape(-1, N, N)
    return np.corrcoef(flat[:, i, j].ravel(), flat[:, i, k].ravel())[0, 1]


def test_speckle_errors_are_correlated_along_rows_and_gaussian_ones_are_not():
    expected = model_c2(FLOW, [0.5, 0.5])

    def residuals(noise, **options):
        return np.array(
            [
                hd.simulate(FLOW, n_frames=N, phi=PHI, q=Q, noise=noise, seed=seed, **options)[
                    "c2"
                ].values
                - expected
                for seed in range(3)
            ]
        )

    # Six speckle datasets (3 seeds x 2 angles) gave 0.16 to 0.34.
    assert row_correlation(residuals("speckle", n_pixels=300)) > 0.1
    assert abs(row_correlation(residuals(0.02))) < 0.03


@pytest.mark.parametrize(
    "options",
    [
        {"noise": "speckel"},
        {"noise": "speckle", "offset": 1.1},
        {"noise": "speckle", "contrast": 0.0},
        {"noise": "speckle", "n_pixels": 1},
        {"noise": "speckle", "counts": 0.0},
        {"noise": "speckle", "store_sigma": True},
        {"noise": 0.01, "n_pixels": 100},
    ],
)
def test_speckle_options_are_checked(options):
    with pytest.raises(hd.OptionError):
        hd.simulate(FLOW, n_frames=10, **options)


def test_pixels_accumulated_block_by_block_are_the_correlation_of_all_pixels():
    """simulated_two_time over more pixels than a block equals two_time of the blocks'
    intensities drawn in turn from the same generator; up to a block, two_time of one draw."""
    physics = hd.Parameters(FLOW).physics_values()
    t, phi, n_pixels = T[:12], PHI[:1], speckle.PIXEL_BLOCK + 37
    blocked = speckle.simulated_two_time(
        physics, [0.5], t, phi, Q, n_pixels=n_pixels, counts=2.0, seed=5
    )
    rng = np.random.default_rng(5)
    parts = [
        speckle.intensities(physics, [0.5], t, phi, Q, n_pixels=size, counts=2.0, seed=rng)
        for size in (speckle.PIXEL_BLOCK, 37)
    ]
    np.testing.assert_allclose(blocked, speckle.two_time(np.concatenate(parts, axis=1)), rtol=1e-12)
    one = speckle.simulated_two_time(physics, [0.5], t, phi, Q, n_pixels=50, seed=3)
    direct = speckle.two_time(speckle.intensities(physics, [0.5], t, phi, Q, n_pixels=50, seed=3))
    np.testing.assert_array_equal(one, direct)


def test_a_frame_without_photons_has_no_correlation_and_the_fit_masks_it():
    """At 0.01 photons per pixel and frame on 100 pixels a frame counts no photon with
    probability exp(-1): its pairs are NaN, exactly those, and a fit leaves them out."""
    physics = hd.Parameters(FLOW).physics_values()
    t = T[:20]
    counts = speckle.intensities(physics, [0.5], t, PHI[:1], Q, n_pixels=100, counts=0.01, seed=4)
    empty = counts[0].sum(axis=0) == 0
    assert 2 <= empty.sum() <= 15
    ds = hd.simulate(
        FLOW, n_frames=20, phi=PHI[:1], noise="speckle", n_pixels=100, counts=0.01, seed=4
    )
    nan = ~np.isfinite(ds["c2"].values[0])
    np.testing.assert_array_equal(nan, empty[:, None] | empty[None, :])
    problem = hd.Objective.build(ds, hd.Parameters(FLOW), fix=())
    assert problem.pairs.n_pairs == np.sum(~empty) * (np.sum(~empty) - 1) // 2
