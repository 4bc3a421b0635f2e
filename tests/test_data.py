"""heterodyne.data: the canonical Dataset is built, validated, cut and saved as documented."""

import numpy as np
import pytest
import xarray as xr

import heterodyne as hd
from heterodyne.data import count_nan_pairs, symmetrize
from heterodyne.errors import (
    DataError,
    FileFormatError,
    HeterodyneError,
    OptionError,
    OverwriteError,
)

N = 8
DT = 0.1
T = DT * np.arange(1, N + 1)
PHI = np.array([0.0, 45.0, 90.0])


def _c2(n_phi=PHI.size, seed=0):
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.uniform(1.0, 1.5, (n_phi, N, N)))
    return upper + np.swapaxes(np.triu(upper, 1), 1, 2)


def _ds(**kwargs):
    return hd.from_arrays(_c2(), T, PHI, 0.01, **kwargs)


def test_from_arrays_builds_the_canonical_dataset():
    c2 = _c2()
    ds = hd.from_arrays(c2, T, PHI, 0.01, source="test")
    assert ds["c2"].dims == ("phi", "t1", "t2")
    np.testing.assert_array_equal(ds["c2"].values, c2)
    np.testing.assert_array_equal(ds["t1"].values, T)
    np.testing.assert_array_equal(ds["t2"].values, T)
    np.testing.assert_array_equal(ds["phi"].values, PHI)
    assert float(ds["q"]) == 0.01
    expected = {"source": "test", "dt": pytest.approx(DT, rel=1e-12), "nan_pairs": 0}
    assert ds.attrs == {**expected, "dropped_frames": 0}
    assert ds["t1"].attrs["units"] == "s"
    assert ds["q"].attrs["units"] == "1/Å"


def test_from_arrays_takes_one_matrix_as_one_angle():
    ds = hd.from_arrays(_c2()[1], T, 30.0, 0.01)
    assert ds["c2"].shape == (1, N, N)
    np.testing.assert_array_equal(ds["phi"].values, [30.0])


def _all_nan_angle():
    c2 = _c2()
    c2[1] = np.nan
    return dict(c2=c2)


def _bad_sigma():
    sigma = np.full((PHI.size, N, N), 0.01)
    sigma[2, 1, 5] = 0.0
    return dict(sigma=sigma)


BAD_ARRAYS = {
    "non-square": (dict(c2=np.ones((3, N, N - 1))), "not square in time"),
    "c2 one-dimensional": (dict(c2=np.ones(N)), "c2 must have shape"),
    "t too short": (dict(t=T[:-1]), f"t has shape ({N - 1},); expected ({N},)"),
    "phi too long": (dict(phi=[0.0, 45.0, 90.0, 135.0]), "phi has 4 angles but c2 has 3"),
    "non-uniform t": (dict(t=T * np.linspace(1.0, 1.2, N)), "not uniformly spaced"),
    "non-increasing t": (dict(t=T[::-1]), "not increasing"),
    "zero q": (dict(q=0.0), "q must be positive"),
    "negative q": (dict(q=-0.01), "q must be positive"),
    "q array": (dict(q=[0.01, 0.02]), "q must be one number"),
    "too few frames": (dict(c2=np.ones((1, 2, 2)), t=T[:2], phi=0.0), "at least 3"),
    "all-NaN angle": (_all_nan_angle(), "all NaN/inf for phi = [45.0]"),
    "sigma shape": (dict(sigma=np.ones((2, N, N))), "sigma has shape (2, 8, 8)"),
    "sigma zero": (_bad_sigma(), "sigma must be > 0"),
    "phi NaN": (dict(phi=[0.0, np.nan, 90.0]), "non-finite angles"),
}


@pytest.mark.parametrize("override, message", BAD_ARRAYS.values(), ids=BAD_ARRAYS.keys())
def test_from_arrays_rejects_bad_input(override, message):
    args = dict(c2=_c2(), t=T, phi=PHI, q=0.01) | override
    with pytest.raises(DataError) as info:
        hd.from_arrays(**args)
    assert message in str(info.value)


@pytest.mark.parametrize("triangle", [np.triu, np.tril])
def test_symmetrize_fills_the_missing_triangle(triangle):
    full = _c2()
    half = triangle(full)
    np.testing.assert_array_equal(symmetrize(half), full)
    np.testing.assert_array_equal(hd.from_arrays(half, T, PHI, 0.01)["c2"].values, full)


def test_symmetrize_keeps_a_full_matrix_and_nan_blocks():
    full = _c2()
    np.testing.assert_array_equal(symmetrize(full), full)
    half = np.triu(full)
    half[0, 1:3, 5:7] = np.nan
    out = symmetrize(half)
    assert np.isnan(out[0, 6, 2]) and np.isnan(out[0, 2, 6])
    np.testing.assert_array_equal(out[1], full[1])


def test_nan_pairs_counts_upper_pairs_of_c2_and_sigma():
    c2 = _c2()
    c2[0, 1, 4] = c2[0, 4, 1] = np.nan
    c2[2, 3, 3] = np.nan  # the diagonal is not a pair
    sigma = np.full_like(c2, 0.01)
    sigma[1, 0, 7] = sigma[1, 7, 0] = np.nan
    sigma[0, 1, 4] = np.nan  # same pair as a NaN of c2: counted once
    ds = hd.from_arrays(c2, T, PHI, 0.01, sigma=sigma)
    assert ds.attrs["nan_pairs"] == 2
    assert count_nan_pairs(ds) == 2
    assert hd.select(ds, phi=[90.0, 45.0]).attrs["nan_pairs"] == 1


def test_a_frame_is_dropped_when_none_of_its_pairs_is_finite_at_any_angle():
    c2 = _c2()
    c2[:, 3, :] = c2[:, :, 3] = np.nan  # every angle: dropped
    c2[:, 5, :] = c2[:, :, 5] = np.nan
    c2[:, 5, 5] = 1.0  # a finite diagonal alone is no pair: dropped
    c2[1:, 6, :] = c2[1:, :, 6] = np.nan  # finite at the first angle: kept
    ds = hd.from_arrays(c2, T, PHI, 0.01)
    assert ds.attrs["dropped_frames"] == 2
    assert hd.select(ds, frames=slice(4, 10)).attrs["dropped_frames"] == 1
    assert hd.select(ds, phi=[45.0, 90.0]).attrs["dropped_frames"] == 3


def test_validate_names_the_first_asymmetric_pair():
    c2 = _c2()
    c2[1, 5, 2] += 0.01  # lower triangle: the pair is (2, 5)
    c2[2, 6, 7] += 0.01
    with pytest.raises(DataError) as info:
        hd.from_arrays(c2, T, PHI, 0.01)
    message = str(info.value)
    pair = f"c2[2, 5] = {float(c2[1, 2, 5])!r} but c2[5, 2] = {float(c2[1, 5, 2])!r}"
    assert f"at phi = 45 deg, {pair}" in message
    assert "one triangle" in message


def test_validate_over_several_tiles_finds_the_first_pair_in_row_order():
    """600 frames: the symmetry is compared in tiles of 256 and the search for a pair
    stops at the first; an independent reading of the matrix gives the same answers."""
    n = 600
    rng = np.random.default_rng(3)
    upper = np.triu(rng.uniform(1.0, 1.5, (1, n, n)))
    c2 = upper + np.swapaxes(np.triu(upper, 1), 1, 2)
    t = DT * np.arange(1, n + 1)
    for i, j in [(270, 260), (300, 550), (590, 10)]:  # lower-triangle entries changed
        c2[0, i, j] += 0.01
    for first in [(10, 590), (260, 270), (300, 550)]:
        mismatch = np.argwhere(np.triu(c2[0] != c2[0].T, 1))[0]
        assert tuple(mismatch) == first  # row order, read independently
        with pytest.raises(DataError, match=f"c2\\[{first[0]}, {first[1]}\\]"):
            hd.from_arrays(c2, t, [0.0], 0.01)
        c2[0, first[1], first[0]] = c2[0, first[0], first[1]]
    hd.from_arrays(c2, t, [0.0], 0.01)
    sparse = np.full((1, n, n), np.nan)
    sparse[0, 550, 560] = sparse[0, 560, 550] = 1.2  # one pair, in the last block of rows
    np.fill_diagonal(sparse[0], 1.5)
    assert hd.from_arrays(sparse, t, [0.0], 0.01).sizes["t1"] == n
    sparse[0, 550, 560] = sparse[0, 560, 550] = np.nan
    with pytest.raises(DataError, match="all NaN/inf"):
        hd.from_arrays(sparse, t, [0.0], 0.01)


def test_validate_symmetry_treats_nan_as_data_and_allows_float32_rounding():
    c2 = _c2()
    c2[0, 1, 4] = c2[0, 4, 1] = np.nan  # a masked pair, both triangles
    c2[0, 3, 3] = np.nan
    c2[2, 0, 7] = c2[2, 7, 0] = np.inf
    c2[1] = np.triu(c2[1]) + np.triu(c2[1], 1).T.astype(np.float32)  # rounded to 6e-8
    assert not np.array_equal(c2[1], c2[1].T)
    hd.from_arrays(c2, T, PHI, 0.01)
    c2[2, 2, 6] = np.nan  # one triangle only
    with pytest.raises(DataError, match="phi = 90 deg, c2\\[2, 6\\] = nan but c2\\[6, 2\\]"):
        hd.from_arrays(c2, T, PHI, 0.01)


def test_select_by_phi_and_frames_keeps_absolute_times():
    ds = _ds()
    out = hd.select(ds, phi=[92.0, 1.0], frames=slice(2, 6))
    np.testing.assert_array_equal(out["phi"].values, [90.0, 0.0])
    np.testing.assert_array_equal(out["t1"].values, T[2:6])
    np.testing.assert_array_equal(out["c2"].values, ds["c2"].values[[2, 0], 2:6, 2:6])
    assert out.attrs["dt"] == ds.attrs["dt"]


def test_select_by_phi_works_on_unsorted_angles():
    ds = hd.from_arrays(_c2(), T, [90.0, 0.0, 45.0], 0.01)
    out = hd.select(ds, phi=[44.0, 89.0])
    np.testing.assert_array_equal(out["phi"].values, [45.0, 90.0])
    np.testing.assert_array_equal(out["c2"].values, ds["c2"].values[[2, 0]])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(phi=[44.0, 46.0]), "same angle twice"),
        (dict(frames=[1, 2, 3]), "frames must be a slice"),
        (dict(frames=slice(0, 8, 2)), "contiguous"),
        (dict(frames=slice(3, 5)), "leaves 2 frames"),
    ],
)
def test_select_rejects_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        hd.select(_ds(), **options)


def test_validate_rejects_a_transposed_dataset_and_a_wrong_dt():
    ds = _ds()
    with pytest.raises(DataError, match="expected \\('phi', 't1', 't2'\\)"):
        hd.validate(ds.transpose("t1", "t2", "phi"))
    with pytest.raises(DataError, match="does not match the spacing of t1"):
        hd.validate(ds.assign_attrs(dt=2 * DT))
    with pytest.raises(DataError, match="expected an xarray.Dataset"):
        hd.validate(ds["c2"])


def test_to_netcdf_round_trips_and_refuses_to_overwrite(tmp_path):
    ds = _ds(sigma=np.full((PHI.size, N, N), 0.02))
    path = hd.to_netcdf(ds, tmp_path / "out" / "data.nc")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        assert back.load().identical(ds)
    assert hd.load(path).identical(ds)
    other = hd.select(ds, phi=0.0)
    with pytest.raises(OverwriteError, match="overwrite=True") as info:
        hd.to_netcdf(other, path)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, HeterodyneError)
    assert hd.load(path).identical(ds)
    hd.to_netcdf(other, path, overwrite=True)
    assert hd.load(path).identical(other)
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.nc"]
    with pytest.raises(FileFormatError, match="is a directory"):
        hd.to_netcdf(ds, tmp_path)
