"""heterodyne.io: beamline HDF5 layouts and netCDF read back to the exact numbers."""

import logging
from pathlib import Path

import _files
import h5py
import numpy as np
import pytest
import xarray as xr
from _files import CONFIG, EXPOSURE_PERIOD, FRAME_TIME, LEGACY_BINS, MAPPING, write_h5
from scipy.optimize import curve_fit

import heterodyne as hd
from heterodyne.cli import main
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
    matrices = [np.triu(TRUTH[pair]) for pair in PROCESSED[:4]]
    data = _files.aps_u(Q_LIST[:1], PHI_LIST, PROCESSED[:4], matrices, DT)
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
        "[17], past the 16 roi values of xpcs/qmap/dynamic_index_mapping",
    ),
    "bin past the grid, no mapping": (
        lambda data: (
            data.pop(MAPPING),
            data.__setitem__(_files.APS_U_BINS, np.array([1, 2, 3, 4, 5, 6, 7, 8, 10, 17])),
        ),
        "[17], past the 4 q x 4 phi = 16 bins",
    ),
    "mapping past the grid": (
        _set(MAPPING, np.arange(16) + 5),
        "places bins [12] at cells [16], outside",
    ),
    "no mapping, cells may be empty": (
        _drop(MAPPING),
        "xpcs/qmap/dynamic_index_mapping is missing",
    ),
    "grid size disagrees": (_set(_files.NUM_PTS, np.array([4, 5])), "expected the same grid"),
    "GIXPCS map": (_set(_files.MAP_NAMES, np.array([b"x", b"y"])), "not by (q, phi)"),
    "zero averaging": (_set(f"{CONFIG}/avg_frame", np.int64(0)), "expected an integer >= 1"),
    "matrix never written": (
        _set(C2, np.zeros((N, N), dtype=np.float32)),
        "c2_00001 (bin 1, q = 0.005 1/Å, phi = 0 deg) holds no correlation",
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
        _set("exchange/C2T_all/g2_00011", np.ones((N, N))),
        "bins 1..11, past the 10 bins of xpcs/dqlist",
    ),
    "no frame time": (
        _drop("measurement/instrument/detector/exposure_period"),
        "looked for measurement/instrument/detector/exposure_period, "
        "entry/instrument/detector_1/frame_time",
    ),
    "two-row q list": (_set("xpcs/dqlist", np.ones((2, 10))), "expected a vector"),
    "two writers' names": (_set("exchange/C2T_all/c2_00001", np.ones((N, N))), "holds both"),
    "bins list unsorted": (
        _set(LEGACY_BINS, np.array([2, 1, 3, 4, 5, 6, 7, 8, 9, 10])),
        "expected the list in increasing order",
    ),
    "numbers not in the list": (
        _set(LEGACY_BINS, np.array([1, 2, 3])),
        "expected 1..3 (one per entry of xpcs/qphi_bin_to_process) or bins it lists",
    ),
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


# Files as the writers write them (FILES.md). Each matrix encodes its own (q, phi): a decay
# time set by q and an oscillation period set by phi, so a bin read under another bin's
# labels cannot match the values computed from the labels the reader gives it.
GRID_Q = np.array([0.004, 0.008, 0.012])
GRID_PHI = np.array([-60.0, 0.0, 60.0, 120.0])
EMPTY = [(0, 0), (0, 1), (2, 3)]  # beam stop and a detector gap: no pixels, no roi value
FRAME_TIME = 0.01


def _labelled(q, phi, t):
    """A symmetric matrix whose values tell its (q, phi): decay time 1 / (800 q) s,
    oscillation period (1.5 + phi / 90) * 0.1 s."""
    lag = np.abs(np.subtract.outer(t, t))
    return 1.0 + 0.3 * np.exp(-lag * 800 * q) * np.cos(2 * np.pi * lag / (0.15 + phi / 900))


def _assert_labels_right(ds, t, rtol=1e-6):
    for k, phi in enumerate(ds["phi"].values):
        expected = _labelled(float(ds["q"]), phi, t)
        np.testing.assert_allclose(ds["c2"].values[k], expected, rtol=rtol)


def _cells_processed():
    return [(iq, ip) for iq in range(3) for ip in range(4) if (iq, ip) not in EMPTY]


def _boost_corr_file(path, t, *, config=None, **options):
    processed = _cells_processed()
    matrices = [_labelled(GRID_Q[iq], GRID_PHI[ip], t) for iq, ip in processed]
    files, lzf = _files.boost_corr(
        GRID_Q, GRID_PHI, processed, matrices, FRAME_TIME, empty=EMPTY, config=config, **options
    )
    return write_h5(path, files, lzf=lzf)


def test_boost_corr_file_with_empty_cells_labels_every_bin(tmp_path):
    n = 100  # 10^4 values per matrix: float32, lzf-compressed, upper triangle, as written
    t = FRAME_TIME * np.arange(1, n + 1)
    path = _boost_corr_file(tmp_path / "boost.h5", t)
    with h5py.File(path) as f:
        assert f[f"{_files.APS_U_C2}/c2_00001"].compression == "lzf"
        assert f[f"{_files.APS_U_C2}/c2_00001"].dtype == np.float32
        bins = f[_files.APS_U_BINS][()]
    np.testing.assert_array_equal(bins, np.arange(1, 10))  # 9 non-empty cells, numbered 1..9
    np.testing.assert_array_equal(hd.q_values(path), GRID_Q)
    seen = []
    for q in GRID_Q:
        ds = hd.load(path, q=q)
        _assert_labels_right(ds, t)
        # read as stored: the float32 values, exactly, in both triangles
        stored = _labelled(float(ds["q"]), ds["phi"].values[0], t).astype(np.float32)
        np.testing.assert_array_equal(ds["c2"].values[0], stored.astype(np.float64))
        np.testing.assert_allclose(ds["t1"].values, t, rtol=1e-15)
        seen += [(float(ds["q"]), phi) for phi in ds["phi"].values]
    assert seen == [(GRID_Q[iq], GRID_PHI[ip]) for iq, ip in _cells_processed()]
    # the plain formula bin - 1 = iq * n_phi + ip would label bin 1 as (q0, -60 deg); its
    # values are those of (q0, 60 deg), which this check tells apart
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(
            hd.load(path, q=GRID_Q[0]).c2.values[0], _labelled(GRID_Q[0], -60.0, t), rtol=1e-6
        )


def test_averaged_strided_frames_sit_at_the_mean_end_of_their_raw_frames(tmp_path):
    avg, stride, begin, n = 3, 2, 100, 12
    # stored frame k averages raw frames begin + stride (avg k + j), j < avg; raw frame m
    # ends at (m + 1) frame_time
    raw = begin + stride * (avg * np.arange(n)[:, None] + np.arange(avg)[None, :])
    t = FRAME_TIME * (raw + 1).mean(axis=1)
    config = {"begin_frame": begin, "end_frame": -1, "avg_frame": avg, "stride_frame": stride}
    path = _boost_corr_file(tmp_path / "strided.h5", t, config=config)
    ds = hd.load(path, q=0.008)
    np.testing.assert_allclose(ds["t1"].values, t, rtol=1e-14)
    assert ds.attrs["dt"] == pytest.approx(0.06, rel=1e-14)
    assert "begin_frame 100, avg_frame 3, stride_frame 2" in ds.attrs["time_origin"]
    assert "end of its exposure" in ds.attrs["time_origin"]
    _assert_labels_right(ds, t)
    window = hd.load(path, q=0.008, frames=slice(4, 9))
    np.testing.assert_allclose(window["t1"].values, t[4:9], rtol=1e-14)
    shifted = hd.load(path, q=0.008, t_start=2.5, frames=slice(4, 9))
    np.testing.assert_allclose(shifted["t1"].values, 2.5 + 0.06 * np.arange(4, 9), rtol=1e-14)
    assert shifted.attrs["time_origin"].startswith("user: t_start = 2.5 s")


def test_negative_begin_frame_needs_t_start(tmp_path):
    t = 0.02 * np.arange(10)
    path = _boost_corr_file(
        tmp_path / "tail.h5", 5.0 + t, config={"begin_frame": -500, "avg_frame": 2}
    )
    with pytest.raises(FileFormatError) as info:
        hd.load(path, q=0.004)
    for words in (str(path), "xpcs/twotime/config/begin_frame is negative", "t_start="):
        assert words in str(info.value)
    np.testing.assert_array_equal(hd.q_values(path), GRID_Q)  # metadata alone is fine
    ds = hd.load(path, q=0.004, t_start=5.0)
    np.testing.assert_allclose(ds["t1"].values, 5.0 + t, rtol=1e-14)
    _assert_labels_right(ds, 5.0 + t)
    with pytest.raises(OptionError, match="t_start must be finite"):
        hd.load(path, q=0.004, t_start=np.nan)


def test_gixpcs_map_is_refused(tmp_path):
    path = _boost_corr_file(tmp_path / "gi.h5", np.arange(1, 6.0), map_names=("x", "y"))
    for read in (hd.q_values, lambda p: hd.load(p, q=0.004)):
        with pytest.raises(FileFormatError, match=r"map_names = \['x', 'y'\].*not by \(q, phi\)"):
            read(path)


def test_zeros_where_pairs_should_be_are_masked_and_counted(tmp_path):
    data = _aps_u()
    block = np.array(data[C2])  # a chunk never written: zeros in the stored triangle
    block[2:5, 10:14] = 0.0
    data[C2] = block
    path = write_h5(tmp_path / "holes.h5", data)
    with pytest.warns(UserWarning, match=r"c2_00001 \(bin 1, q = 0.005 1/Å, phi = 0 deg\).*12 of"):
        ds = hd.load(path, q=0.005)
    assert ds.attrs["nan_pairs"] == 12
    assert np.isnan(ds["c2"].values[0, 12, 3]) and np.isnan(ds["c2"].values[0, 3, 12])
    np.testing.assert_array_equal(ds["c2"].values[1:], _expected(0)[1:])


@pytest.mark.parametrize("sequential", [False, True], ids=["xpcs-eigen", "boost_corr 2023"])
def test_legacy_g2_matrices_label_every_bin(tmp_path, sequential):
    t = 0.05 * np.arange(1, 31)
    cells = _cells_processed()
    # bins of the legacy lists: one column per (q, phi) cell; only some were correlated
    q_row, phi_row = GRID_Q[[c[0] for c in cells]], GRID_PHI[[c[1] for c in cells]]
    chosen = [2, 3, 5, 8, 9]
    matrices = {b: np.triu(_labelled(q_row[b - 1], phi_row[b - 1], t)) for b in chosen}
    files = _files.legacy(
        q_row[None, :], phi_row[None, :], matrices, np.array([[0.05]]), sequential=sequential
    )
    path = write_h5(tmp_path / "legacy.h5", files)
    names = sorted(key for key in files if key.startswith(_files.LEGACY_C2))
    assert names[0].endswith("g2_00001" if sequential else "g2_00002")
    np.testing.assert_array_equal(hd.q_values(path), GRID_Q)
    read = []
    for q in GRID_Q:
        ds = hd.load(path, q=q)
        _assert_labels_right(ds, t, rtol=1e-12)
        read += [(float(ds["q"]), phi) for phi in ds["phi"].values]
    assert read == [(q_row[b - 1], phi_row[b - 1]) for b in chosen]


def test_intensity_trace_and_excluded_frames(tmp_path):
    data = _aps_u()
    trace = np.ones(N)
    trace[[7, 8]] = 0.2  # a beam dump
    data[_files.INTENSITY] = np.stack([np.arange(N), trace])
    path = write_h5(tmp_path / "dump.h5", data)
    intensity = hd.io.intensity(path)
    np.testing.assert_array_equal(intensity["frame"].values, np.arange(N))
    out = np.flatnonzero(intensity.values < 0.5)
    ds = hd.load(path, q=0.01, exclude_frames=out)
    mask = np.zeros(N, dtype=bool)
    mask[out] = True
    same = hd.load(path, q=0.01, exclude_frames=mask)
    xr.testing.assert_identical(ds, same)
    c2 = ds["c2"].values
    assert np.isnan(c2[:, [7, 8], :]).all() and np.isnan(c2[:, :, [7, 8]]).all()
    keep = np.flatnonzero(~mask)
    np.testing.assert_array_equal(c2[:, keep][:, :, keep], _expected(1)[:, keep][:, :, keep])
    assert ds.attrs["dropped_frames"] == 2
    assert ds.attrs["excluded_frames"] == "7:9"
    # pairs t1 < t2 of 4 angles touching frame 7 or 8: 20 x 19 / 2 - 18 x 17 / 2 each
    assert ds.attrs["nan_pairs"] == 4 * (N * (N - 1) // 2 - 18 * 17 // 2)
    window = hd.load(path, q=0.01, frames=slice(5, 15), exclude_frames=hd.io.frame_list("7:9"))
    assert window.attrs["dropped_frames"] == 2 and np.isnan(window["c2"].values[:, 2]).all()
    nc = hd.to_netcdf(hd.load(path, q=0.01), tmp_path / "dump.nc")
    from_nc = hd.load(nc, exclude_frames=[7, 8])
    np.testing.assert_array_equal(from_nc["c2"].values, c2)
    assert from_nc.attrs["dropped_frames"] == 2
    with pytest.raises(OptionError, match=r"holds \[20\], outside the stored frames 0..19"):
        hd.load(path, q=0.01, exclude_frames=[3, 20])
    with pytest.raises(OptionError, match="expected an index or a range"):
        hd.io.frame_list("7-9")
    with pytest.raises(FileFormatError, match="spatial_mean/intensity_vs_time is missing"):
        hd.io.intensity(write_h5(tmp_path / "plain.h5", _aps_u()))


@pytest.mark.slow
def test_fit_on_an_averaged_strided_file_recovers_a_power_law_velocity(tmp_path):
    """Frames averaged by 3, strided by 2, from raw frame 100: dt = 0.06 s and the first
    frame at 1.03 s. With the file's times the fit finds the truth within its errors; with
    the times a reader that ignores the configuration gives (t_k = (k + 1) dt), it does not."""
    truth = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "beta": 0.5, "f0": 0.4, "phi0": 20.0}
    frame_time, avg, stride, begin, n, angles = 0.01, 3, 2, 100, 60, [-45.0, 0.0, 45.0]
    dt, first = frame_time * avg * stride, frame_time * (begin + 1 + stride * (avg - 1) / 2)
    sim = hd.simulate(truth, n_frames=n, dt=dt, t_start=first, phi=angles, noise=0.01, seed=7)
    shot_noise = 0.2 * np.eye(n)  # the raw diagonal boost_corr stores: never fitted
    files, lzf = _files.boost_corr(
        [0.01],
        angles,
        [(0, k) for k in range(3)],
        [m + shot_noise for m in sim["c2"].values],
        frame_time,
        config={"begin_frame": begin, "avg_frame": avg, "stride_frame": stride},
    )
    path = write_h5(tmp_path / "strided.h5", files, lzf=lzf)
    ds = hd.load(path)
    np.testing.assert_allclose(ds["t1"].values, sim["t1"].values, rtol=1e-14)
    start = hd.Parameters({name: 0.8 * value for name, value in truth.items()})
    for name in ("alpha_ref", "alpha_sample", "f1"):
        start[name].vary = False
    result = hd.fit_nlsq(ds, start, progress=False)
    assert result.success
    for name, value in truth.items():
        assert abs(result.value(name) - value) < 4 * result.error(name), name
    naive = hd.fit_nlsq(hd.load(path, t_start=dt), start, progress=False)
    assert abs(naive.value("v0") - truth["v0"]) > 50 * naive.error("v0")


@pytest.mark.slow
def test_a_real_chx_matrix_fits_to_the_rate_of_its_one_time_projection():
    """The NSLS-II CHX matrix of tests/data (SOURCE.md) with a stated q and dt. Its decay
    is one component on a plateau; a reference-only model (f0 = 0, constant rate) fitted
    to every pair (t1 < t2) is the least-squares fit of the lag means weighted by their
    number of pairs (the squares split by lag), which scipy computes independently."""
    matrix = np.load(Path(__file__).parent / "data" / "two_time_350.npy")
    n, dt, q = matrix.shape[0], 0.1, 0.01
    ds = hd.from_arrays(matrix, dt * np.arange(1, n + 1), 0.0, q, source="CHX two_time_350")
    assert ds.attrs["nan_pairs"] == 0 and ds.sizes["t1"] == 350
    start = hd.Parameters(f0=0.0)
    for name in ("f0", "f1", "alpha_ref", "alpha_sample", "D0_sample", "v0", "beta", "phi0"):
        start[name].vary = False
    result = hd.fit_nlsq(ds, start, progress=False)
    assert result.success
    report = result.report()
    assert "pairs fitted      61075" in report and "D0_ref" in report
    lag = np.arange(1, n)
    means = np.array([np.diagonal(matrix, k).mean() for k in lag])
    (offset, contrast, rate), _ = curve_fit(
        lambda tau, b, c, r: b + c * np.exp(-r * tau),
        lag * dt,
        means,
        p0=(1.02, 0.07, 1.0),
        sigma=1 / np.sqrt(n - lag),
    )
    assert result.value("D0_ref") == pytest.approx(rate / q**2, rel=2e-3)
    assert float(result.params["contrast"].values.ravel()[0]) == pytest.approx(contrast, rel=2e-3)
    assert float(result.params["offset"].values.ravel()[0]) == pytest.approx(offset, rel=1e-5)
    # a measured decay of 6 % contrast over 350 frames: the rate is determined to ~5 %
    assert 0.02 < result.error("D0_ref") / result.value("D0_ref") < 0.1


@pytest.mark.slow
def test_t_start_reaches_survey_and_the_command_line(tmp_path, capsys):
    """A file that cannot place its frames, fitted by `heterodyne fit --t-start` and by
    hd.survey(t_start=...): the fits use the times given, and the report says so."""
    sim = hd.simulate({"D0_sample": 2e4, "f0": 0.4}, n_frames=15, phi=0.0, noise=0.01)
    files, lzf = _files.boost_corr(
        [0.01], [0.0], [(0, 0)], sim["c2"].values, DT, config={"begin_frame": -30}
    )
    path = write_h5(tmp_path / "tail.h5", files, lzf=lzf)
    assert main(["fit", str(path), "--out", str(tmp_path / "fit")]) == 1
    assert "t_start=" in capsys.readouterr().err
    assert main(["fit", str(path), "--t-start", "5", "--out", str(tmp_path / "fit")]) == 0
    report = (tmp_path / "fit" / "nlsq_report.txt").read_text()
    assert "times             user: t_start = 5 s at stored frame 0" in report
    assert "end of its exposure" in report
    hd.survey(path, t_start=5.0, checkpoint=tmp_path / "fits", progress=False)
    (saved,) = (tmp_path / "fits").iterdir()
    t = hd.open_result(saved).data["t1"].values
    np.testing.assert_allclose(t, 5.0 + DT * np.arange(15), rtol=1e-14)


@pytest.mark.parametrize("writer", [_aps_u, _legacy], ids=["aps_u", "legacy"])
def test_load_reads_several_q_bins_as_one_multi_q_dataset(tmp_path, writer):
    path = write_h5(tmp_path / "bins.h5", writer())
    every = hd.load(path, q="all")
    assert every["c2"].dims == ("q", "phi", "t1", "t2")
    np.testing.assert_array_equal(every["q"].values, Q_LIST[:3])
    np.testing.assert_array_equal(every["phi"].values, PHI_LIST)
    for iq in range(3):
        one = hd.select(every, q=Q_LIST[iq])
        alone = hd.load(path, q=Q_LIST[iq])
        np.testing.assert_array_equal(one["phi"].values, alone["phi"].values)
        np.testing.assert_array_equal(one["c2"].values, alone["c2"].values)
        np.testing.assert_array_equal(one["c2"].values, _expected(iq, alone["phi"].values))
    # q-bin 2 has two of the four angles: the others are all NaN
    assert np.isnan(every["c2"].sel(q=Q_LIST[2], phi=0.0)).all()
    two = hd.load(path, q=[0.02, 0.005])
    np.testing.assert_array_equal(two["q"].values, [0.005, 0.02])
    with pytest.raises(hd.OptionError, match="same q-bin twice"):
        hd.load(path, q=[0.005, 0.00502])
