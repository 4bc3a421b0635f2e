"""The verdict: ok on right answers, check or fail on every wrong one."""

import numpy as np
import pytest

import heterodyne as hd
from heterodyne import verdict
from heterodyne.parameters import PHYSICS_NAMES
from heterodyne.results import entry_label, index_of

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
PHI = [-45.0, 0.0, 45.0]


def data(seed=0, truth=TRUTH, **options):
    return hd.simulate(
        truth, **{"n_frames": 80, "phi": PHI, "noise": 0.01, "seed": seed, **options}
    )


def worst_z(result, ds) -> float:
    """The largest |fit - truth| / stderr over the varied physics parameters."""
    worst = 0.0
    for name in PHYSICS_NAMES:
        if not bool(result.settings["vary"].sel(name=name)):
            continue
        diff = result.value(name) - float(ds.attrs[f"true_{name}"])
        if name == "phi0":
            diff = (diff + 90.0) % 180.0 - 90.0
        worst = max(worst, abs(diff) / result.error(name))
    return worst


def test_a_right_default_fit_is_ok():
    ds = data()
    result = hd.fit_nlsq(ds, progress=False)
    assert worst_z(result, ds) < 4
    assert result.verdict.status == "ok", result.verdict.reasons
    assert result.report().startswith("[[Verdict]] OK")
    assert "Verdict: OK" in result._repr_html_()


# Starts that trap a single least-squares run: the exchange symmetry plane (the old
# default start), a flow at the wrong frequency, the flow direction 70 degrees off.
TRAPS = [
    {"D0_ref": 1e4, "D0_sample": 1e4, "f0": 0.5, "v0": 1e3, "phi0": 0.0},
    {**TRUTH, "v0": 2300.0},
    {**TRUTH, "v0": 200.0, "phi0": -50.0},
    {**TRUTH, "phi0": -70.0},
    {**TRUTH, "D0_ref": 1e5, "D0_sample": 50.0, "f0": 0.9},
]


def test_no_wrong_answer_is_called_ok():
    """Single runs from bad starts on several seeds: every fit more than 5 stderr from the
    truth is judged check or fail (and some are, so that the test can fail)."""
    wrong = 0
    for seed in range(3):
        ds = data(seed)
        for start in TRAPS:
            result = hd.fit_nlsq(ds, hd.Parameters(start), multistart=0, progress=False)
            if worst_z(result, ds) > 5:
                wrong += 1
                assert result.verdict.status in ("check", "fail"), (seed, start)
    assert wrong >= 3


def test_a_model_that_misses_the_flow_has_structured_residuals():
    ds = data()
    result = hd.fit_nlsq(ds, hd.Parameters(v0=0.0), fix=["v0", "phi0"], progress=False)
    assert verdict.residual_structure(result) > 0.5
    assert result.verdict.status in ("check", "fail")
    assert any("structure" in r for r in result.verdict.reasons)
    good = hd.fit_nlsq(ds, progress=False)
    assert verdict.residual_structure(good) < 0.05


def test_speckle_noise_alone_is_not_structure():
    """Correlated (speckle) noise shares frames along rows and columns, but its lag means
    stay a small part of the residuals."""
    ds = hd.simulate(TRUTH, n_frames=80, phi=PHI, noise="speckle", n_pixels=500, seed=5)
    result = hd.fit_nlsq(ds, progress=False)
    assert verdict.residual_structure(result) < verdict.STRUCTURE_MAX / 2


def test_the_symmetry_plane_fails():
    """A fit held on the plane: equal rates and x_s = 1/2, where the labels mean nothing
    and the gradient along every exchange direction is zero."""
    plane = {"D0_ref": 5e3, "D0_sample": 5e3, "f0": 0.5, "v0": 800.0, "phi0": 20.0}
    ds = data(truth=plane)
    p = hd.Parameters(plane)
    p.fix("D0_ref", "D0_sample", "f0", "f1", "alpha_ref", "alpha_sample")
    result = hd.fit_nlsq(ds, p, multistart=0, progress=False)
    assert result.verdict.status == "fail"
    assert any("symmetry plane" in r for r in result.verdict.reasons)


def test_degenerate_groups_are_connected_components():
    ds = data()
    p = hd.Parameters(TRUTH)
    p["D_offset_sample"].vary = True
    p["alpha_sample"].vary = False
    with pytest.warns(UserWarning, match="one rate"):
        result = hd.fit_nlsq(ds, p, progress=False)
    groups = verdict.degenerate_groups(result)
    assert ["D0_sample", "D_offset_sample"] in groups
    corr = np.abs(result.correlation.values)
    names = [entry_label(*entry) for entry in index_of(result.covariance)]
    for group in groups:  # every member linked to another one of its group
        for a in group:
            others = [names.index(b) for b in group if b != a]
            assert corr[names.index(a), others].max() > verdict.DEGENERATE


def test_sigma_too_small_is_a_check():
    ds = data(noise=0.01, store_sigma=True)
    ds["sigma"] = ds["sigma"] / 3  # the stated errors three times too small
    result = hd.fit_nlsq(ds, progress=False)
    assert result.reduced_chi2 == pytest.approx(9.0, rel=0.1)
    assert any("reduced chi2" in r for r in result.verdict.reasons)


def test_the_verdict_survives_the_file(tmp_path):
    ds = data()
    result = hd.fit_nlsq(ds, hd.Parameters(TRAPS[1]), multistart=0, progress=False)
    again = hd.open_result(result.to_netcdf(tmp_path / "fit.nc"))
    assert again.verdict == result.verdict


def test_two_angles_leave_a_mirror_flow_and_the_verdict_gives_it():
    """With two angles only ``v |cos(phi_k - phi0)|`` is seen: the mirror flow that the
    verdict names gives the same noiseless c2 (to rounding), and a fit started there stays
    there with the same cost. A third angle or a fixed phi0 removes the line."""
    angles = [-30.0, 45.0]
    ds = data(phi=angles)
    result = hd.fit_nlsq(ds, progress=False)
    physics = np.array([result.value(n) for n in PHYSICS_NAMES])
    mirror = verdict.flow_mirror(physics, angles, result.settings)
    v0, phi0 = (PHYSICS_NAMES.index(n) for n in ("v0", "phi0"))
    # independent of the solver: |v cos(phi_k - phi0)| equal at both angles
    seen = np.abs(physics[v0] * np.cos(np.deg2rad(np.subtract(angles, physics[phi0]))))
    seen_mirror = np.abs(mirror[v0] * np.cos(np.deg2rad(np.subtract(angles, mirror[phi0]))))
    np.testing.assert_allclose(seen_mirror, seen, rtol=1e-12)
    assert abs(mirror[phi0] - physics[phi0]) > 20.0
    same = [
        hd.simulate(dict(zip(PHYSICS_NAMES, p, strict=True)), n_frames=80, phi=angles)
        for p in (physics, mirror)
    ]
    np.testing.assert_allclose(same[1]["c2"].values, same[0]["c2"].values, atol=1e-12)
    assert result.verdict.status == "check"
    assert any(f"v0 = {mirror[v0]:.4g}" in r for r in result.verdict.reasons)
    start = hd.Parameters(dict(zip(PHYSICS_NAMES, mirror, strict=True)))
    there = hd.fit_nlsq(ds, start, multistart=0, progress=False)
    assert there.chi2 == pytest.approx(result.chi2, rel=1e-6)
    assert there.value("phi0") == pytest.approx(mirror[phi0], abs=0.5)
    assert not any("two angles" in r for r in hd.fit_nlsq(data(), progress=False).verdict.reasons)
    held = hd.fit_nlsq(ds, hd.Parameters(TRUTH), fix=["phi0"], progress=False)
    assert verdict.flow_mirror(physics, angles, held.settings) is None
