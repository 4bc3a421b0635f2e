"""heterodyne.io: beamline HDF5 layouts and netCDF read back to the exact numbers."""

import logging

import _files
import numpy as np
import pytest
from _files import EXPOSURE_PERIOD, FRAME_TIME, write_h5

import heterodyne as hd
from heterodyne.errors import FileFormatError, OptionError

N = 20
DT = 0.05
Q_LIST = np.array([0.005, 0.01, 0.02, 0.04])
PHI_LIST = np.array([0.0, 45.0, 90.0, 135.0])
# (q_index, phi_index) of each processed bin: q 3 has none, q 2 only two angles.
PROCESSED = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 1), (2, 3)]


def _matrix(seed):
    """A symmetric two-time-like matrix with distinct values per seed."""
    rng = np.random.default_rng(seed)
    lag = np.abs(np.subtract.outer(np.arange(N), np.arange(N)))
    noise = np.triu(rng.normal(0.0, 0.01, (N, N)))
    return 1.0 + 0.3 * np.exp(-lag / 5.0) + noise + np.triu(noise, 1).T


TRUTH = {pair: _matrix(seed) for seed, pair in enumerate(PROCESSED)}


def _aps_u(half=True):
    matrices = [np.triu(TRUTH[pair]) if half else TRUTH[pair] for pair in PROCESSED]
    return _files.aps_u(Q_LIST, PHI_LIST, PROCESSED, matrices, DT)


def _legacy(frame_time_path=EXPOSURE_PERIOD):
    return _files.legacy(
        Q_LIST[[iq for iq, _ in PROCESSED]][None, :],
        PHI_LIST[[ip for _, ip in PROCESSED]][None, :],
        {k + 1: np.triu(TRUTH[pair]) for k, pair in enumerate(PROCESSED)},
        np.array([DT]),
        frame_time_path,
    )


def _expected(iq, phis=PHI_LIST):
    return np.stack([TRUTH[(iq, int(np.flatnonzero(PHI_LIST == p)[0]))] for p in phis])


@pytest.fixture
def aps_u(tmp_path):
    return write_h5(tmp_path / "aps_u.h5", _aps_u())


@pytest.mark.parametrize("half", [True, False], ids=["upper-triangle", "full"])
def test_aps_u_reads_the_written_numbers(tmp_path, half):
    path = write_h5(tmp_path / "a.h5", _aps_u(half=half))
    ds = hd.load(path, q=0.01)
    np.testing.assert_array_equal(ds["c2"].values, _expected(1))
    np.testing.assert_array_equal(ds["phi"].values, PHI_LIST)
    np.testing.assert_array_equal(ds["t1"].values, DT * np.arange(1, N + 1))
    np.testing.assert_array_equal(ds["t2"].values, ds["t1"].values)
    assert float(ds["q"]) == 0.01
    assert ds.attrs["dt"] == DT
    assert ds.attrs["nan_pairs"] == 0
    assert ds.attrs["source"] == f"aps_u:{path} q-bin 1"


def test_aps_u_reads_only_processed_angles(aps_u):
    ds = hd.load(aps_u, q=0.02)
    np.testing.assert_array_equal(ds["phi"].values, [45.0, 135.0])
    np.testing.assert_array_equal(ds["c2"].values, _expected(2, [45.0, 135.0]))


def test_q_values_lists_processed_q_bins(aps_u, tmp_path):
    np.testing.assert_array_equal(hd.q_values(aps_u), Q_LIST[:3])
    np.testing.assert_array_equal(hd.q_values(write_h5(tmp_path / "l.h5", _legacy())), Q_LIST[:3])


def test_several_q_bins_need_q(aps_u):
    with pytest.raises(FileFormatError, match="3 q-bins") as info:
        hd.load(aps_u)
    assert "0.005, 0.01, 0.02" in str(info.value)
    assert "q=" in str(info.value)


def test_one_q_bin_needs_no_q(tmp_path):
    data = _aps_u()
    data["xpcs/qmap/dynamic_v_list_dim0"] = Q_LIST[:1]
    data["xpcs/twotime/processed_bins"] = np.arange(1, 5)
    for k in range(5, 11):
        del data[f"xpcs/twotime/correlation_map/c2_{k:05d}"]
    ds = hd.load(write_h5(tmp_path / "one.h5", data))
    np.testing.assert_array_equal(ds["c2"].values, _expected(0))


def test_q_nearest_is_logged_and_far_q_warns(aps_u, caplog):
    with caplog.at_level(logging.INFO, logger="heterodyne.io"):
        ds = hd.load(aps_u, q=0.01004)
    assert float(ds["q"]) == 0.01
    assert "q-bin 1" in caplog.text
    with pytest.warns(UserWarning, match="q-bin 2 at q = 0.02"):
        ds = hd.load(aps_u, q=0.018)
    np.testing.assert_array_equal(ds["c2"].values, _expected(2, [45.0, 135.0]))


def test_phi_subset_is_nearest_in_given_order(aps_u):
    ds = hd.load(aps_u, q=0.005, phi=[91.0, 44.0])
    np.testing.assert_array_equal(ds["phi"].values, [90.0, 45.0])
    np.testing.assert_array_equal(ds["c2"].values, _expected(0, [90.0, 45.0]))
    with pytest.raises(OptionError, match="same angle twice"):
        hd.load(aps_u, q=0.005, phi=[90.0, 91.0])


def test_frames_window_keeps_absolute_times(aps_u):
    ds = hd.load(aps_u, q=0.005, phi=0.0, frames=slice(5, 15))
    np.testing.assert_array_equal(ds["t1"].values, DT * np.arange(6, 16))
    np.testing.assert_array_equal(ds["c2"].values[0], TRUTH[(0, 0)][5:15, 5:15])
    assert ds.attrs["source"].endswith("q-bin 0 frames 5:15")
    with pytest.raises(OptionError, match="need >= 3"):
        hd.load(aps_u, q=0.005, frames=slice(5, 7))
    with pytest.raises(OptionError, match="contiguous"):
        hd.load(aps_u, q=0.005, frames=slice(0, 20, 2))


def test_time_vector_sets_the_first_frame(tmp_path):
    data = _aps_u()
    data["xpcs/twotime/t"] = DT * np.arange(100, 100 + N)
    ds = hd.load(write_h5(tmp_path / "t.h5", data), q=0.01, frames=slice(2, 10))
    np.testing.assert_array_equal(ds["t1"].values, DT * np.arange(103, 111))


def test_dropped_frames_are_nan_rows_on_the_uniform_grid(tmp_path):
    # the detector dropped acquisition frames 105, 106 and 112: the file stores 20 frames
    # whose start times skip them
    index = np.delete(np.arange(100, 100 + N + 3), [5, 6, 12])
    data = _aps_u()
    data["xpcs/twotime/t"] = DT * index
    ds = hd.load(write_h5(tmp_path / "gaps.h5", data), q=0.01)
    np.testing.assert_allclose(ds["t1"].values, DT * np.arange(101, 101 + N + 3), rtol=1e-12)
    place = index - 100
    np.testing.assert_array_equal(ds["c2"].values[:, place][:, :, place], _expected(1))
    missing = ds["c2"].values[:, [5, 6, 12]]
    assert np.isnan(missing).all() and np.isnan(ds["c2"].values[:, :, [5, 6, 12]]).all()
    assert ds.attrs["dropped_frames"] == 3
    # pairs t1 < t2 of 4 angles touching a dropped frame: 23 x 22 / 2 - 20 x 19 / 2 each
    assert ds.attrs["nan_pairs"] == 4 * (23 * 22 // 2 - N * (N - 1) // 2)
    # a window indexes the stored frames: 3..9 spans acquisition frames 103..111
    window = hd.load(tmp_path / "gaps.h5", q=0.01, frames=slice(3, 10))
    np.testing.assert_allclose(window["t1"].values, DT * np.arange(104, 113), rtol=1e-12)
    assert window.attrs["dropped_frames"] == 2


def test_nan_blocks_are_data(tmp_path):
    data = _aps_u()
    block = np.array(data["xpcs/twotime/correlation_map/c2_00001"])
    block[2:4, 10:13] = np.nan
    data["xpcs/twotime/correlation_map/c2_00001"] = block
    ds = hd.load(write_h5(tmp_path / "nan.h5", data), q=0.005)
    assert ds.attrs["nan_pairs"] == 6
    assert np.isnan(ds["c2"].values[0, 11, 3])


@pytest.mark.parametrize("frame_time_path", [EXPOSURE_PERIOD, FRAME_TIME])
def test_legacy_reads_the_written_numbers(tmp_path, frame_time_path):
    path = write_h5(tmp_path / "legacy.h5", _legacy(frame_time_path))
    ds = hd.load(path, q=0.02)
    np.testing.assert_array_equal(ds["c2"].values, _expected(2, [45.0, 135.0]))
    np.testing.assert_array_equal(ds["phi"].values, [45.0, 135.0])
    np.testing.assert_array_equal(ds["t1"].values, DT * np.arange(1, N + 1))
    assert float(ds["q"]) == 0.02
    assert ds.attrs["source"] == f"aps_legacy:{path} q-bin 2"


def test_netcdf_round_trip_is_identical(tmp_path):
    ds = hd.simulate(n_frames=12, phi=[0.0, 60.0, 120.0], noise=0.01, store_sigma=True)
    path = hd.to_netcdf(ds, tmp_path / "sim.nc")
    back = hd.load(path)
    assert back.identical(ds)
    np.testing.assert_array_equal(hd.q_values(path), [0.01])
    cut = hd.load(path, phi=[60.0, 120.0], frames=slice(2, 9))
    assert cut.identical(hd.select(ds, phi=[60.0, 120.0], frames=slice(2, 9)))


def _bad_aps_u(change):
    data = _aps_u()
    change(data)
    return data


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


def _drop(*keys):
    return lambda data: [data.pop(key) for key in keys]


C2 = "xpcs/twotime/correlation_map/c2_00001"
BAD_APS_U = {
    "missing phi list": (
        _drop("xpcs/qmap/dynamic_v_list_dim1"),
        "xpcs/qmap/dynamic_v_list_dim1 is missing",
    ),
    "non-square matrix": (_set(C2, np.ones((N, N - 1))), "c2_00001 has shape (20, 19)"),
    "ragged matrices": (_set(C2, np.ones((N + 2, N + 2))), "differ in size"),
    "integer matrix": (_set(C2, np.ones((N, N), dtype=np.int32)), "expected floating-point"),
    "text q list": (_set("xpcs/qmap/dynamic_v_list_dim0", np.array([b"a", b"b"])), "numbers"),
    "bin past the lists": (
        _set("xpcs/twotime/processed_bins", np.array([1, 2, 3, 4, 5, 6, 7, 8, 10, 17])),
        "[17], past the 4 q x 4 phi = 16 bins",
    ),
    "more bins than matrices": (
        _set("xpcs/twotime/processed_bins", np.arange(1, 12)),
        "expected c2_00001..c2_00011",
    ),
    "empty correlation group": (
        lambda data: (
            [data.pop(key) for key in list(data) if "correlation_map/" in key]
            + [data.__setitem__("xpcs/twotime/correlation_map", {})]
        ),
        "xpcs/twotime/correlation_map holds no c2_NNNNN",
    ),
    "zero frame time": (
        _set("entry/instrument/detector_1/frame_time", 0.0),
        "expected one positive frame time",
    ),
    "negative frame time": (
        _set("entry/instrument/detector_1/frame_time", -DT),
        "expected one positive frame time",
    ),
    "nan frame time": (_set("entry/instrument/detector_1/frame_time", np.nan), "non-finite"),
    "no frame time": (
        _drop("entry/instrument/detector_1/frame_time"),
        "looked for entry/instrument/detector_1/frame_time",
    ),
    "short time vector": (
        _set("xpcs/twotime/t", DT * np.arange(N - 1)),
        "xpcs/twotime/t has 19 times",
    ),
    "strided time vector": (
        _set("xpcs/twotime/t", 2 * DT * np.arange(N)),
        "steps by 2 frames",
    ),
    "all-NaN angle": (_set(C2, np.full((N, N), np.nan)), "all NaN/inf for phi = [0.0]"),
}


@pytest.mark.parametrize("change, message", BAD_APS_U.values(), ids=BAD_APS_U.keys())
def test_bad_aps_u_files_raise_file_format_error(tmp_path, change, message):
    path = write_h5(tmp_path / "bad.h5", _bad_aps_u(change))
    with pytest.raises(FileFormatError) as info:
        hd.load(path, q=0.005)
    assert str(path) in str(info.value)
    assert message in str(info.value)


BAD_LEGACY = {
    "list length mismatch": (
        _set("xpcs/dphilist", PHI_LIST[None, :3]),
        "expected one (q, phi) per bin",
    ),
    "matrix past the lists": (
        _set("exchange/C2T_all/c2_00011", np.ones((N, N))),
        "bins 1..11, past the 10 bins of xpcs/dqlist",
    ),
    "no frame time": (
        _drop("measurement/instrument/detector/exposure_period"),
        "looked for measurement/instrument/detector/exposure_period, "
        "entry/instrument/detector_1/frame_time",
    ),
    "two-row q list": (_set("xpcs/dqlist", np.ones((2, 10))), "expected a vector"),
}


@pytest.mark.parametrize("change, message", BAD_LEGACY.values(), ids=BAD_LEGACY.keys())
def test_bad_legacy_files_raise_file_format_error(tmp_path, change, message):
    data = _legacy()
    change(data)
    path = write_h5(tmp_path / "bad_legacy.h5", data)
    with pytest.raises(FileFormatError) as info:
        hd.load(path, q=0.005)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_unreadable_paths_raise_file_format_error(tmp_path):
    cases = {
        tmp_path / "absent.h5": "no such file",
        tmp_path: "is a directory",
        tmp_path / "notes.txt": "is not an HDF5 file",
        tmp_path / "cut.h5": "truncated",
        tmp_path / "other.h5": "unknown layout",
        tmp_path / "fake.nc": "(netcdf): c2 has dims",
    }
    (tmp_path / "notes.txt").write_text("q = 0.01\n")
    write_h5(tmp_path / "cut.h5", _aps_u())
    raw = (tmp_path / "cut.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    write_h5(tmp_path / "other.h5", {"entry/data": np.ones(3)})
    write_h5(tmp_path / "fake.nc", {"c2": np.ones((4, 4))})
    for path, message in cases.items():
        with pytest.raises(FileFormatError) as info:
            hd.load(path)
        assert str(path) in str(info.value)
        assert message in str(info.value)


def test_unknown_layout_lists_what_was_looked_for(tmp_path):
    path = write_h5(tmp_path / "multitau.h5", {"xpcs/multitau/normalized_g2": np.ones((5, 3))})
    with pytest.raises(FileFormatError) as info:
        hd.q_values(path)
    for looked_for in ("xpcs/twotime/correlation_map", "exchange/C2T_all", "c2 (netcdf)"):
        assert looked_for in str(info.value)
    assert "['xpcs']" in str(info.value)
