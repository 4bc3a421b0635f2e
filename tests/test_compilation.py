"""The persistent compilation cache and the lazy import, each in fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heterodyne import compilation

ROOT = Path(__file__).resolve().parents[1]

# A fresh process that fits a small Dataset and prints how many programs JAX needed, and
# how many of them it read back from the persistent cache instead of compiling (the
# backend-compile event times both).
FIT = """
import json, jax
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
jax.monitoring.register_event_duration_secs_listener(lambda name, d, **kw: events.append(name))
import heterodyne as hd
ds = hd.simulate({"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0},
                 n_frames=24, phi=[0.0, 45.0], noise=0.01, seed=1)
result = hd.fit_nlsq(ds, progress=False)
print(json.dumps({
    "programs": events.count("/jax/core/compile/backend_compile_duration"),
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "v0": result.value("v0"),
    "folder": str(hd.compilation.cache_folder()),
}))
"""


def run(code: str, **environment) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **environment}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_second_process_compiles_nothing_that_the_first_compiled(tmp_path):
    first = json.loads(run(FIT, HETERODYNE_CACHE=str(tmp_path)))
    second = json.loads(run(FIT, HETERODYNE_CACHE=str(tmp_path)))
    assert first["folder"] == second["folder"] == str(tmp_path)
    # the one-time model of the starts, their polish, the model rows, the normal equations
    # (one program at this size), the frame integrals
    assert first["programs"] >= 5 and first["hits"] == 0
    # every program the second process needs it reads back: it compiles none
    assert second["programs"] == second["hits"] == first["programs"]
    assert second["v0"] == first["v0"]  # the same programs: the same fit, to the bit


# A fresh process that fits and prints how often the Python code of the programs kept as
# exports ran: it runs only while JAX traces them.
TRACED = """
import json
import heterodyne as hd
from heterodyne import starts, structured
calls = {"normal equations": 0, "polish": 0}
def counted(name, function):
    def call(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return call
structured._factor_stage = counted("normal equations", structured._factor_stage)
starts.projected_residual = counted("polish", starts.projected_residual)
ds = hd.simulate({"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0},
                 n_frames=24, phi=[0.0, 45.0], noise=0.01, seed=1)
result = hd.fit_nlsq(ds, progress=False)
print(json.dumps({**calls, "v0": result.value("v0")}))
"""


@pytest.mark.slow
def test_a_second_process_traces_none_of_the_programs_kept_as_exports(tmp_path):
    first = json.loads(run(TRACED, HETERODYNE_CACHE=str(tmp_path)))
    second = json.loads(run(TRACED, HETERODYNE_CACHE=str(tmp_path)))
    assert first["normal equations"] > 0 and first["polish"] > 0
    assert second["normal equations"] == second["polish"] == 0
    assert second["v0"] == first["v0"]
    # a damaged file is traced again and written anew
    for path in (tmp_path / "exported").iterdir():
        path.write_bytes(b"not a program")
    third = json.loads(run(TRACED, HETERODYNE_CACHE=str(tmp_path)))
    assert third["normal equations"] > 0 and third["v0"] == first["v0"]
    assert json.loads(run(TRACED, HETERODYNE_CACHE=str(tmp_path)))["normal equations"] == 0
    # with the cache off, each process traces
    off = json.loads(run(TRACED, HETERODYNE_CACHE="off"))
    assert off["normal equations"] > 0 and off["v0"] == first["v0"]


def test_an_exported_program_computes_what_the_jitted_function_does(tmp_path):
    import jax
    import numpy as np

    before = compilation.cache_folder()
    try:
        compilation.set_compilation_cache(tmp_path)

        def model(x, scale, n):
            return jax.numpy.cumsum(jax.numpy.sin(x * scale)) ** n, {"sum": x.sum()}

        kept = compilation.exported(model, static_argnums=(2,))
        x = np.linspace(0.0, 3.0, 7)
        for n in (1, 2):
            expected = jax.jit(model, static_argnums=(2,))(x, 1.5, n)
            got = kept(x, 1.5, n)
            np.testing.assert_array_equal(got[0], expected[0])
            assert float(got[1]["sum"]) == float(expected[1]["sum"])
        # one file for each static value; inside a traced function it is plain jit
        assert len(list((tmp_path / "exported").iterdir())) == 2
        assert float(jax.grad(lambda s: kept(x, s, 1)[0].sum())(1.5)) == float(
            jax.grad(lambda s: model(x, s, 1)[0].sum())(1.5)
        )
    finally:
        compilation.set_compilation_cache(before)


def test_import_loads_no_jax_and_the_command_line_help_no_numerical_library():
    loaded = """
import sys, heterodyne as hd
hd.Parameters, hd.DataError
print(sorted(m for m in ("jax", "numpyro", "arviz", "holoviews", "panel", "bokeh", "xarray",
                         "scipy") if m in sys.modules))
"""
    assert run(loaded) == "[]"
    # the command line reads its arguments before it needs any of them
    helped = "import sys; sys.argv = ['heterodyne', '--help']\n" + (
        "from heterodyne.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('jax', 'xarray', 'scipy') if m in sys.modules))"
    )
    assert run(helped) == "[]"


def test_a_fit_loads_neither_sampler_nor_plotting():
    code = """
import sys, heterodyne as hd
ds = hd.simulate({"v0": 800.0}, n_frames=16, phi=[0.0], noise=0.01, seed=1)
hd.fit_nlsq(ds, progress=False).report()
print(sorted(m for m in ("numpyro", "arviz", "holoviews", "panel", "bokeh") if m in sys.modules))
"""
    assert run(code) == "[]"


def test_the_libraries_load_with_the_collector_paused_then_frozen_and_it_comes_back_as_it_was():
    code = """
import gc, heterodyne as hd
{before}
hd.fit_nlsq  # loads JAX, SciPy and xarray
import jax, scipy.optimize, xarray
frozen = gc.get_freeze_count()
print(gc.isenabled(), frozen > 100_000, len(gc.get_objects()) < frozen / 10)
"""
    # the libraries' objects are frozen (never traversed again), only a few left tracked
    assert run(code.format(before="")) == "True True True"
    # a collector the user turned off stays off
    assert run(code.format(before="gc.disable()")) == "False True True"


def test_cache_folder_moves_turns_off_and_refuses_an_unwritable_folder(tmp_path):
    before = compilation.cache_folder()
    try:
        assert compilation.set_compilation_cache(tmp_path / "a") == tmp_path / "a"
        assert compilation.cache_folder() == tmp_path / "a"
        assert (tmp_path / "a").stat().st_mode & 0o077 == 0  # yours alone
        assert compilation.set_compilation_cache(None) is None
        assert compilation.cache_folder() is None
        blocked = tmp_path / "file"
        blocked.write_text("")
        with pytest.warns(UserWarning, match="cannot be created or written"):
            assert compilation.set_compilation_cache(blocked / "cache") is None
        assert compilation.cache_folder() is None
    finally:
        compilation.set_compilation_cache(before)


def test_the_environment_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation.CACHE_VARIABLE, str(tmp_path))
    assert compilation.folder_from_environment() == tmp_path
    monkeypatch.setenv(compilation.CACHE_VARIABLE, "OFF")
    assert compilation.folder_from_environment() is None
    monkeypatch.setenv(compilation.CACHE_VARIABLE, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert compilation.default_folder() == tmp_path / "xdg" / "heterodyne" / "jax"
