"""Hostile arguments at every public entry point: each raises a ``HeterodyneError``
subclass with a clear message, before any JIT compilation or file write; and checkpoints
are reused only for the same work."""

import warnings

import numpy as np
import pytest
import xarray as xr
from _work import NoWork

import heterodyne as hd
from heterodyne.errors import DataError, FileFormatError, OptionError, ParameterError

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}


def refused(error, match, call):
    """``call()`` raises ``error`` matching ``match`` and compiles nothing."""
    with NoWork() as work, pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call()
    assert not work.events, work.events


def _with(p, name, **fields):
    for key, value in fields.items():
        setattr(p[name], key, value)
    return p


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hd.Parameters(v0="fast"), "v0 value must be a number; got 'fast'"),
        (lambda: _with(hd.Parameters(), "v0", min="a"), "v0 min must be a number"),
        (lambda: _with(hd.Parameters(), "v0", min=None), "v0 min must be a number; got None"),
        (lambda: hd.Parameters(v0=10**400), "too large for a float64"),
        (lambda: hd.Parameters(5), "takes a dict of name -> value"),
        (lambda: hd.Parameters(["v0"]), r"takes a dict of name -> value \(or keywords\); got list"),
        (lambda: _with(hd.Parameters(), "v0", vary="no"), "v0 vary must be True or False"),
        (lambda: _with(hd.Parameters(), "v0", vary=1), "v0 vary must be True or False"),
        (lambda: _with(hd.Parameters(), "v0", max=float("nan")), "v0 max is NaN"),
        (
            lambda: _with(hd.Parameters(), "v0", min=5.0, max=5.0, value=5.0).validate(),
            "min = max = 5 leaves no room to vary",
        ),
        (lambda: hd.Parameters()[3], "parameter names are strings"),
    ],
)
def test_parameters_refuse_wrong_types_and_values(call, match):
    refused(ParameterError, match, call)


def test_vary_no_is_refused_and_leaves_the_parameter_varying():
    p = hd.Parameters()
    with pytest.raises(ParameterError):
        p["v0"].vary = "no"
    assert p["v0"].vary is True
    p["v0"].vary = np.False_
    assert p["v0"].vary is False and "v0" not in p.varied


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1}, OptionError, "seed must be an integer >= 0"),
        ({"seed": 2**64}, OptionError, "seed must be an integer"),
        ({"fix": 123}, ParameterError, "fix must be a parameter name or a sequence"),
        ({"fix": ["v00"]}, ParameterError, "unknown parameter 'v00'"),
        ({"max_nfev": -1}, OptionError, "max_nfev must be an integer >= 1"),
        ({"method": "lm"}, OptionError, "method must be one of 'trf', 'dogbox'; got 'lm'"),
        ({"foo": 1}, OptionError, "unknown option foo=1"),
        ({"loss": "soft_l1"}, OptionError, "loss='soft_l1' is not supported, only 'linear'"),
        ({"ftol": "tight"}, OptionError, "ftol must be a number"),
        ({"x_scale": [1.0, -1.0]}, OptionError, "x_scale must hold numbers > 0"),
        ({"multistart": -1}, OptionError, "multistart must be an integer >= 0"),
        ({"multistart": 2.5}, OptionError, "multistart must be an integer"),
        ({"scaling": "global"}, OptionError, "scaling must be one of"),
        ({"errors": None}, OptionError, "errors must be one of"),
        ({"progress": "yes"}, OptionError, "progress must be True or False"),
        ({"jac": "2-point"}, OptionError, "jac is set by fit_nlsq"),
        ({"fix": list(hd.Parameters())}, ParameterError, "no parameter varies"),
    ],
)
def test_fit_nlsq_refuses_before_compiling(tiny_ds, kwargs, error, match):
    refused(error, match, lambda: hd.fit_nlsq(tiny_ds, **{"progress": False, **kwargs}))


def test_fit_nlsq_refuses_more_varied_quantities_than_pairs():
    tiny = hd.simulate(TRUTH, n_frames=3, phi=[0.0, 45.0], noise=0.01, seed=1)  # 6 pairs
    refused(
        ParameterError,
        "13 varied quantities but only 6 finite pairs",
        lambda: hd.fit_nlsq(tiny, progress=False),
    )


def test_fit_nlsq_refuses_a_dataset_that_is_not_one():
    refused(DataError, "expected an xarray.Dataset", lambda: hd.fit_nlsq("data.nc"))


def _unbounded():
    p = hd.Parameters()
    p["v0"].max = np.inf
    return p


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": 2**64}, OptionError, "seed must be an integer >= 0 and <= 4294967295"),
        ({"checkpoint": 123}, OptionError, "checkpoint must be a folder path"),
        ({"shards": 1000}, OptionError, r"at least two of the 20 rows.*<= 10; got 1000"),
        ({"shards": 0}, OptionError, "shards"),
        ({"samples": 3}, OptionError, "samples"),
        ({"chains": True}, OptionError, "chains must be an integer; got True"),
        ({"init": "nlsq.nc"}, OptionError, "init must be an NLSQResult"),
        ({"params": _unbounded()}, ParameterError, r"v0: CMC samples inside finite bounds"),
        ({"likelihood": "grid"}, OptionError, "likelihood must be one of"),
        ({"executor": "threads"}, OptionError, "executor must be None"),
    ],
)
def test_fit_cmc_refuses_before_compiling(tiny_ds, kwargs, error, match):
    refused(error, match, lambda: hd.fit_cmc(tiny_ds, **{"progress": False, **kwargs}))


def test_a_garbled_shard_checkpoint_is_a_file_format_error(tiny_ds, tmp_path):
    from heterodyne import cmc, sampler

    plan = cmc.prepare(tiny_ds, shards=2, chains=1, warmup=5, samples=4)
    job = plan.jobs(tmp_path)[0]
    with open(job.checkpoint, "wb") as f:
        f.write(b"PK\x03\x04 not a zip archive")
    with pytest.raises(FileFormatError, match="a damaged CMC checkpoint.*delete it"):
        sampler.run_shard(job)
    np.savez(job.checkpoint, w=np.zeros((1, 4, 3)))
    with pytest.raises(FileFormatError, match="a CMC checkpoint without acceptance_rate"):
        sampler.run_shard(job)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dt": "0.1"}, "dt \\[s\\] must be a number; got '0.1'"),
        ({"dt": None}, "dt \\[s\\] must be a number; got None"),
        ({"dt": -0.1}, "dt \\[s\\] must be > 0"),
        ({"q": [0.01, -0.02]}, r"q \[1/Å\] must be distinct numbers > 0"),
        ({"q": [0.01, 0.01]}, r"q \[1/Å\] must be distinct numbers > 0"),
        ({"q": [0.01, 0.02], "phi": [[0.0], [np.nan]]}, r"phi \[deg\] must hold finite"),
        ({"q": [0.01, 0.02], "phi": [[0.0], [0.0], [0.0]]}, "phi gives angles for 3 q-bins"),
        ({"q": -0.01}, "q .* must be > 0; got -0.01"),
        ({"seed": 1.5}, "seed must be an integer; got 1.5"),
        ({"phi": [0, np.nan]}, r"phi \[deg\] must hold finite numbers; got \[0.0, nan\]"),
        ({"phi": []}, r"phi \[deg\] is empty"),
        ({"phi": "abc"}, r"phi \[deg\] must be a number or a sequence"),
        ({"n_frames": 2}, "n_frames must be an integer >= 3"),
        ({"noise": "loud"}, "noise must be a number >= 0 or 'speckle'"),
        ({"noise": -1.0}, "noise"),
        ({"contrast": [0.5, 0.4]}, "contrast has 2 values; expected 1 or one per angle"),
        ({"store_sigma": "yes"}, "store_sigma must be True or False"),
        ({"t_start": float("inf")}, "t_start .* must be a finite number"),
        # found by test_properties: frame times that float64 cannot space by dt
        ({"t_start": 3.8e185, "dt": 0.49}, "cannot space evenly"),
    ],
)
def test_simulate_refuses_before_compiling(kwargs, match):
    refused(OptionError, match, lambda: hd.simulate(**kwargs))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"path": None}, OptionError, "path must be a file path .*got None"),
        ({"phi": "abc"}, OptionError, r"phi \[deg\] must be a number or a sequence"),
        ({"phi": np.nan}, OptionError, r"phi \[deg\] must hold finite numbers; got \[nan\]"),
        ({"phi": np.inf}, OptionError, r"must hold finite numbers; got \[inf\]"),
        ({"frames": slice(0.5, 10)}, OptionError, "frames .* must be an integer; got 0.5"),
        ({"frames": slice(150, 50)}, OptionError, r"frames=slice\(150, 50\) leaves 0 frames"),
        ({"frames": [0, 10]}, OptionError, r"frames must be a slice\(a, b\)"),
        ({"q": np.nan}, OptionError, "q .* is NaN"),
    ],
)
def test_load_refuses_bad_arguments(tiny_file, kwargs, error, match):
    refused(error, match, lambda: hd.load(**{"path": tiny_file, **kwargs}))


def test_a_messages_show_no_python_slice_repr(tiny_file):
    with pytest.raises(OptionError) as info:
        hd.load(tiny_file, frames=slice(150, 50))
    assert "None" not in str(info.value)


@pytest.mark.parametrize(
    "sources, kwargs, error, match",
    [
        (None, {}, OptionError, "sources .* must be a file path .*got None"),
        ("FILE", {"q": "abc"}, OptionError, r"q \[1/Å\] must be a number or a sequence"),
        ("FILE", {"q": np.nan}, OptionError, r"q \[1/Å\] must hold finite numbers"),
        ("FILE", {"q": -1}, OptionError, r"q \[1/Å\] must hold numbers > 0"),
        ("FILE", {"phi": np.nan}, OptionError, r"phi \[deg\] must hold finite numbers"),
        ("FILE", {"phi": np.inf}, OptionError, r"phi \[deg\] must hold finite numbers"),
        ("FILE", {"frames": slice(1.5, 9)}, OptionError, "must be an integer; got 1.5"),
        ("FILE", {"multistart": -2}, OptionError, "multistart must be an integer >= 0"),
        ("FILE", {"loss": "huber"}, OptionError, "loss='huber' is not supported"),
        ("FILE", {"progress": 1}, OptionError, "progress must be True or False"),
        ("FILE", {"checkpoint": 5}, OptionError, "checkpoint must be a folder path"),
    ],
)
def test_survey_refuses_before_reading(tiny_file, sources, kwargs, error, match):
    sources = tiny_file if sources == "FILE" else sources
    refused(error, match, lambda: hd.survey(sources, **kwargs))


def test_cli_phi_nan_does_not_select_the_first_angle(tiny_file, tmp_path, capsys):
    from heterodyne.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", str(tiny_file), "--phi", "nan", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "argument --phi: must be finite angles [deg]; got 'nan'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_from_arrays_refuses_complex_c2(tiny_ds):
    c2 = tiny_ds["c2"].values + 0.1j
    with pytest.raises(DataError, match="c2 has dtype complex128; expected real numbers"):
        hd.from_arrays(c2, tiny_ds["t1"].values, tiny_ds["phi"].values, 0.01)
    with pytest.raises(DataError, match="t has dtype <U"):
        hd.from_arrays(tiny_ds["c2"].values, ["a"] * 20, tiny_ds["phi"].values, 0.01)


def test_an_asymmetric_pair_is_found_beside_a_large_diagonal(tiny_ds):
    c2 = tiny_ds["c2"].values.copy()
    n = c2.shape[-1]
    c2[:, np.arange(n), np.arange(n)] = 1e4  # a shot-noise spike on the diagonal
    hd.from_arrays(c2, tiny_ds["t1"].values, tiny_ds["phi"].values, 0.01)  # symmetric: accepted
    c2[0, 2, 5] *= 1.5
    with pytest.raises(DataError, match=r"not symmetric: at phi = 0 deg, c2\[2, 5\]"):
        hd.from_arrays(c2, tiny_ds["t1"].values, tiny_ds["phi"].values, 0.01)


def test_a_nan_time_is_named_as_such(tiny_ds):
    bad = tiny_ds.assign_coords(t1=tiny_ds["t1"].values.copy())
    times = bad["t1"].values.copy()
    times[4] = np.nan
    bad = bad.assign_coords(t1=("t1", times), t2=("t2", times))
    with pytest.raises(DataError, match=r"t1 holds non-finite times: t1\[4\] = nan s"):
        hd.validate(bad)
    huge = tiny_ds.assign_coords(t1=tiny_ds["t1"] * 1e308, t2=tiny_ds["t2"] * 1e308)
    with pytest.raises(DataError, match="frame_time in a beamline file"):
        hd.validate(huge)


def test_open_result_of_a_file_missing_groups_is_a_file_format_error(tiny_ds, tmp_path):
    result = hd.fit_nlsq(tiny_ds, hd.Parameters(TRUTH), progress=False)
    path = result.to_netcdf(tmp_path / "fit.nc")
    tree = xr.open_datatree(path, engine="h5netcdf").load()
    kept = xr.DataTree(dataset=tree.to_dataset(), name=None)
    kept.to_netcdf(tmp_path / "partial.nc", engine="h5netcdf")
    with pytest.raises(FileFormatError, match="without all its parts"):
        hd.open_result(tmp_path / "partial.nc")


def test_survey_checkpoints_are_keyed_by_the_whole_work(tiny_ds, tmp_path):
    """Same c2 with halved frame times, a contrast 0.4501 vs 0.4504 and a bound 1e7 vs
    1.00004e7: each is new work, fitted afresh, never the old fit read back."""
    start = hd.Parameters(TRUTH)
    first = hd.survey(tiny_ds, params=start, checkpoint=tmp_path, progress=False)
    again = hd.survey(tiny_ds, params=start, checkpoint=tmp_path, progress=False)
    assert (again.attrs["fitted"], again.attrs["from_checkpoint"]) == (0, 1)
    halved = tiny_ds.assign_coords(t1=tiny_ds["t1"] / 2, t2=tiny_ds["t2"] / 2).assign_attrs(
        dt=tiny_ds.attrs["dt"] / 2
    )
    fresh = hd.survey(halved, params=start, checkpoint=tmp_path, progress=False)
    assert (fresh.attrs["fitted"], fresh.attrs["from_checkpoint"]) == (1, 0)
    assert fresh["v0"].item() == pytest.approx(2 * first["v0"].item(), rel=0.05)  # v ~ 1/t
    for change in ({"contrast": 0.4501}, {"contrast": 0.4504}):
        p = start.copy()
        p["contrast"].value = change["contrast"]
        out = hd.survey(tiny_ds, params=p, checkpoint=tmp_path, progress=False)
        assert out.attrs["fitted"] == 1
    p = start.copy()
    p["D0_ref"].max = 1.00004e7
    assert hd.survey(tiny_ds, params=p, checkpoint=tmp_path, progress=False).attrs["fitted"] == 1
    assert len(list(tmp_path.glob("*.nc"))) == 5


def test_a_survey_of_one_file_twice_in_threads_keeps_both_checkpoints(tiny_file, tmp_path):
    """Two fits of the same file write the same checkpoint at once: both succeed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        out = hd.survey(
            [tiny_file, tiny_file],
            params=hd.Parameters(TRUTH),
            executor=pool,
            checkpoint=tmp_path / "ck",
            progress=False,
        )
    assert out.sizes["fit"] == 2 and out.attrs["fitted"] == 2
    assert len(list((tmp_path / "ck").glob("*.nc"))) == 1
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
    back = hd.survey([tiny_file], params=hd.Parameters(TRUTH), checkpoint=tmp_path / "ck")
    assert back.attrs["from_checkpoint"] == 1


def test_select_and_to_netcdf_check_their_options(tiny_ds, tmp_path):
    refused(
        OptionError, r"phi \[deg\] must hold finite numbers", lambda: hd.select(tiny_ds, phi=np.nan)
    )
    refused(
        OptionError, "must be an integer; got 0.5", lambda: hd.select(tiny_ds, frames=slice(0.5, 9))
    )
    refused(
        OptionError,
        "overwrite must be True or False",
        lambda: hd.to_netcdf(tiny_ds, tmp_path / "a.nc", overwrite="yes"),
    )
    assert list(tmp_path.iterdir()) == []
