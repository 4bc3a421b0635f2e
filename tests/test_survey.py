"""Surveys over the q-bins of a beamline file: physics across q, resuming, executors."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import xarray as xr
from _interrupt import ctrl_c_once

import heterodyne as hd
from heterodyne.examples import EXAMPLE_TRUTH, example_file
from heterodyne.survey import survey

Q_BINS = (0.004, 0.006, 0.008, 0.010, 0.012, 0.014)


@pytest.fixture(scope="module")
def beamline_file(tmp_path_factory):
    return example_file(tmp_path_factory.mktemp("survey") / "six_q.h5", q=Q_BINS, n_frames=60)


def start():
    return hd.Parameters({k: 1.3 * v for k, v in EXAMPLE_TRUTH.items()})


def test_survey_recovers_a_q_independent_diffusion_coefficient(beamline_file):
    out = survey(beamline_file, params=start(), progress=False)
    np.testing.assert_allclose(out["q"].values, Q_BINS)
    assert out.sizes == {"q": 6, "phi": 3}
    assert np.all(out["success"] == 1)
    for name in ("D0_sample", "D0_ref", "v0", "phi0"):
        value, error = out[name].values, out[f"{name}_stderr"].values
        # each bin agrees with the truth, and the bins agree with their weighted mean
        assert np.all(np.abs(value - EXAMPLE_TRUTH[name]) < 3.5 * error), name
        mean = np.sum(value / error**2) / np.sum(1 / error**2)
        chi2 = np.sum(((value - mean) / error) ** 2)
        assert chi2 < 20.5, (name, chi2)  # 99.9 % point of chi2 with 5 dof
        # errors="nominal" (the default): the fit's stderr is the nominal one
        np.testing.assert_array_equal(out[f"{name}_stderr_nominal"].values, error)


SCRIPT = """
import sys
from heterodyne.examples import EXAMPLE_TRUTH
from heterodyne.survey import survey
import heterodyne as hd
start = hd.Parameters({k: 1.3 * v for k, v in EXAMPLE_TRUTH.items()})
survey(sys.argv[1], params=start, checkpoint=sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_a_killed_survey_resumes_with_the_remaining_fits(beamline_file, tmp_path):
    checkpoint = tmp_path / "fits"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(beamline_file), str(checkpoint)])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and len(list(checkpoint.glob("*.nc"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done = len(list(checkpoint.glob("*.nc")))
    assert 3 <= done < 6, f"killed with {done} fits done"
    out = survey(beamline_file, params=start(), checkpoint=checkpoint, progress=False)
    assert (out.attrs["fitted"], out.attrs["from_checkpoint"]) == (6 - done, done)
    assert len(list(checkpoint.glob("*.nc"))) == 6
    again = survey(beamline_file, params=start(), checkpoint=checkpoint, progress=False)
    assert again.attrs["fitted"] == 0
    assert again.identical(out.assign_attrs(fitted=0, from_checkpoint=6))
    fresh = survey(beamline_file, params=start(), progress=False)
    for name in ("D0_sample", "v0", "D0_sample_stderr"):
        np.testing.assert_array_equal(out[name].values, fresh[name].values)


@pytest.fixture(scope="module")
def datasets():
    """Five small independent measurements of the same sample."""
    return [
        hd.simulate(EXAMPLE_TRUTH, n_frames=30, phi=[0, 45], q=0.01, noise=0.01, seed=seed)
        for seed in range(5)
    ]


@pytest.fixture(scope="module")
def uninterrupted(datasets):
    return survey(datasets, params=start(), progress=False)


def test_a_keyboard_interrupt_keeps_the_finished_fits_and_a_rerun_resumes(
    datasets, uninterrupted, tmp_path
):
    checkpoint = tmp_path / "fits"
    with pytest.raises(KeyboardInterrupt), ctrl_c_once(checkpoint, "*.nc", count=2):
        survey(datasets, params=start(), checkpoint=checkpoint, progress=False)
    saved = sorted(p.name for p in checkpoint.iterdir())
    assert 2 <= len(saved) < 5 and all(name.endswith(".nc") for name in saved), saved
    resumed = survey(datasets, params=start(), checkpoint=checkpoint, progress=False)
    assert (resumed.attrs["fitted"], resumed.attrs["from_checkpoint"]) == (
        5 - len(saved),
        len(saved),
    )
    xr.testing.assert_identical(
        resumed.drop_attrs(deep=False), uninterrupted.drop_attrs(deep=False)
    )


class _KillsTheWorker:
    """Unpickled in a worker process, it ends that process on the spot (``os._exit``), as
    a crash in a compiled file reader would."""

    def __reduce__(self):
        return os._exit, (70,)


@pytest.mark.slow
def test_a_crashed_worker_keeps_the_finished_fits_and_a_rerun_resumes(
    datasets, uninterrupted, tmp_path
):
    checkpoint = tmp_path / "fits"
    poisoned = list(datasets)
    poisoned[2] = datasets[2].assign_attrs(crash=_KillsTheWorker())
    with pytest.raises(BrokenProcessPool):
        survey(
            poisoned, params=start(), checkpoint=checkpoint, executor="processes", progress=False
        )
    # a worker takes its next task only once it has finished (and saved) one
    done = len(list(checkpoint.glob("*.nc")))
    assert 1 <= done < 5, done
    resumed = survey(datasets, params=start(), checkpoint=checkpoint, progress=False)
    assert (resumed.attrs["fitted"], resumed.attrs["from_checkpoint"]) == (5 - done, done)
    xr.testing.assert_identical(
        resumed.drop_attrs(deep=False), uninterrupted.drop_attrs(deep=False)
    )


@pytest.mark.slow
def test_worker_processes_give_the_same_survey(beamline_file):
    kwargs = {"q": [0.008, 0.012], "params": start(), "progress": False}
    here = survey(beamline_file, **kwargs)
    there = survey(beamline_file, executor="processes", **kwargs)
    assert there.identical(here)


def test_changed_arguments_do_not_reuse_a_checkpoint(beamline_file, tmp_path):
    first = survey(beamline_file, q=0.01, params=start(), checkpoint=tmp_path, progress=False)
    fixed = survey(
        beamline_file, q=0.01, params=start().fix("beta"), checkpoint=tmp_path, progress=False
    )
    assert first.attrs["fitted"] == 1 and fixed.attrs["fitted"] == 1
    assert np.isnan(float(fixed["beta_stderr"].squeeze()))


def test_datasets_and_bad_arguments(tmp_path):
    ds = hd.simulate(EXAMPLE_TRUTH, n_frames=40, phi=[0, 45], q=0.01, noise=0.01)
    out = survey([ds, ds], params=start(), progress=False)
    assert out.sizes["fit"] == 2 and list(out["source"].values) == ["dataset0", "dataset1"]
    with pytest.raises(hd.OptionError, match="method"):
        survey(ds, method="mcmc")
    with pytest.raises(hd.OptionError, match="executor"):
        survey(ds, executor="threads")
    with pytest.raises(hd.OptionError, match="empty"):
        survey([])
    (tmp_path / "fits").touch()
    with pytest.raises(hd.OptionError, match="checkpoint=.*is a file"):
        survey(ds, checkpoint=tmp_path / "fits")
    with pytest.raises(hd.OptionError, match="checkpoint must be a folder"):
        survey(ds, checkpoint=True)
    with pytest.raises(hd.FileFormatError, match="missing.h5"):
        survey("missing.h5")


@pytest.mark.parametrize("layout", ["aps_u", "aps_legacy"])
def test_example_files_load_back_the_simulated_data(tmp_path, layout):
    path = example_file(
        tmp_path / "f.h5", layout=layout, q=(0.005, 0.01), n_frames=30, phi=(0.0, 90.0), seed=7
    )
    loaded = hd.load(path, q=0.01)
    simulated = hd.simulate(EXAMPLE_TRUTH, n_frames=30, phi=[0.0, 90.0], q=0.01, noise=0.01, seed=8)
    np.testing.assert_array_equal(loaded["c2"].values, simulated["c2"].values)
    np.testing.assert_allclose(loaded["t1"].values, simulated["t1"].values, rtol=1e-14)
    with pytest.raises(FileExistsError):
        example_file(path, layout=layout)
