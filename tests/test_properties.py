"""Property tests over the public API's argument space (hypothesis): every call either
returns a valid object or raises a ``HeterodyneError`` subclass before any JIT
compilation (counted with ``jax.monitoring``), never anything else."""

import warnings

import numpy as np
import xarray as xr
from _work import NoWork
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import heterodyne as hd
from heterodyne import qbins
from heterodyne.cli import build_parser
from heterodyne.errors import HeterodyneError

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}

# Values of the wrong type or out of range for most arguments, and a few right ones.
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.complex_numbers(max_magnitude=10),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    st.sampled_from([slice(0.5, 10), slice(150, 50), slice(2, 20, 2), (), {}, {"v0": 1}, b"x"]),
    st.just(np.array([[1.0, 2.0]])),
    st.just(np.int64(3)),
    st.just(np.float32(np.nan)),
)


def outcome(call):
    """``(result, error, compiled)`` of ``call()``: the value or the HeterodyneError, and
    whether JAX compiled anything. Any other exception propagates and fails the test."""
    with NoWork() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call(), None, bool(work.events)
        except HeterodyneError as err:
            return None, err, bool(work.events)


def refused_before_compiling(error, compiled):
    assert isinstance(error, HeterodyneError), error
    assert not compiled, f"{type(error).__name__} after compiling: {error}"
    assert str(error), "an empty message"


def arguments(valid: dict, *, unknown: bool = False):
    """Keyword arguments: some of ``valid``'s, and half the time one of them (or, with
    ``unknown``, for a function taking ``**options``, an unknown one) given a value from
    ``HOSTILE`` instead."""
    names = st.sampled_from([*sorted(valid), *(["unknown_option"] if unknown else [])])
    return st.tuples(
        st.fixed_dictionaries({}, optional=valid),
        st.one_of(st.none(), st.tuples(names, HOSTILE)),
    ).map(lambda drawn: drawn[0] if drawn[1] is None else {**drawn[0], **dict([drawn[1]])})


def outcome_event(error):
    event("refused" if error is not None else "returned")


SIMULATE_ARGUMENTS = {
    "n_frames": st.integers(3, 10),
    "dt": st.floats(1e-3, 1.0),
    "phi": st.lists(st.floats(-180, 180), min_size=1, max_size=3),
    "q": st.floats(1e-3, 0.1),
    "noise": st.floats(0, 0.1),
    "seed": st.integers(0, 2**32 - 1),
    "contrast": st.floats(0.1, 1.0),
    "store_sigma": st.just(False),
    "t_start": st.one_of(st.none(), st.floats(0.0, 10.0)),
}


@SETTINGS
@given(arguments(SIMULATE_ARGUMENTS))
def test_simulate_returns_a_valid_dataset_or_refuses_before_compiling(kwargs):
    result, error, compiled = outcome(lambda: hd.simulate(TRUTH, **kwargs))
    outcome_event(error)
    if error is None:
        assert hd.validate(result) is result
        assert result.sizes["t1"] == kwargs.get("n_frames", 200)
    else:
        refused_before_compiling(error, compiled)


PARAMETER_FIELDS = st.sampled_from(["value", "vary", "min", "max"])
PARAMETER_NAMES = st.sampled_from(["v0", "phi0", "contrast", "offset", "f1"])


@SETTINGS
@given(PARAMETER_NAMES, PARAMETER_FIELDS, HOSTILE)
def test_a_parameter_setting_is_kept_checked_or_refused(name, field, value):
    p = hd.Parameters()
    before = getattr(p[name], field)
    try:
        setattr(p[name], field, value)
    except HeterodyneError:
        assert getattr(p[name], field) is before  # a refused setting leaves the old one
        return
    kept = getattr(p[name], field)
    if field == "vary":
        assert kept is bool(value)
    elif kept is not None:
        assert np.all(np.asarray(kept, dtype=np.float64) == np.asarray(value, dtype=np.float64))
    try:
        p.validate(2)
    except HeterodyneError as err:
        assert isinstance(err, hd.ParameterError)


@SETTINGS
@given(st.one_of(HOSTILE, st.dictionaries(st.text(max_size=3), HOSTILE, max_size=2)))
def test_parameters_built_from_anything_or_refused(values):
    try:
        p = hd.Parameters(values)
    except HeterodyneError as err:
        assert isinstance(err, hd.ParameterError)
        return
    assert len(p) == 16


NLSQ_OPTIONS = {
    "fix": st.sampled_from([(), "v0", ["f0", "f1"]]),
    "multistart": st.integers(0, 1),
    "seed": st.integers(0, 10),
    "scaling": st.sampled_from(["per_angle", "shared"]),
    "max_nfev": st.integers(1, 5),
    "method": st.sampled_from(["trf", "dogbox"]),
    "loss": st.just("linear"),
    "ftol": st.floats(1e-10, 1e-3),
    "x_scale": st.just("jac"),
}


@SETTINGS
@given(arguments(NLSQ_OPTIONS, unknown=True))
def test_fit_nlsq_returns_a_result_or_refuses_before_compiling(tiny_ds, kwargs):
    kwargs = {"max_nfev": 3, **kwargs}  # a valid call fits; a few evaluations suffice
    result, error, compiled = outcome(lambda: hd.fit_nlsq(tiny_ds, progress=False, **kwargs))
    outcome_event(error)
    if error is None:
        assert isinstance(result, hd.NLSQResult)
        assert np.isfinite(float(result.params["v0"])) and result.nfev >= 1
    else:
        refused_before_compiling(error, compiled)


# Each draw makes one argument hostile (a value fit_cmc cannot take), so every call must
# be refused: valid runs would sample, too slow here.
CMC_HOSTILE = {
    "shards": st.one_of(
        st.integers(11, 10**6), st.integers(-5, 0), st.floats(), st.text(max_size=3)
    ),
    "chains": st.one_of(st.integers(-3, 0), st.floats(), st.booleans(), st.none()),
    "warmup": st.one_of(st.integers(-9, -1), st.floats(), st.text(max_size=2)),
    "samples": st.one_of(st.integers(-9, 3), st.floats(), st.none()),
    "seed": st.one_of(st.integers(-(2**70), -1), st.integers(2**32, 2**70), st.floats()),
    "checkpoint": st.one_of(st.integers(), st.floats(), st.lists(st.text(), max_size=2)),
    "likelihood": st.one_of(st.text(max_size=5), st.none()),
    "scaling": st.one_of(st.text(max_size=5), st.integers()),
    "errors": st.one_of(st.text(max_size=5), st.integers()),
    "executor": st.one_of(st.text(max_size=5), st.integers()),
    "init": st.one_of(st.text(max_size=3), st.integers(), st.just(xr.Dataset())),
}


@SETTINGS
@given(
    st.sampled_from(sorted(CMC_HOSTILE)).flatmap(lambda k: st.tuples(st.just(k), CMC_HOSTILE[k]))
)
def test_fit_cmc_refuses_hostile_options_before_compiling(tiny_ds, option):
    name, value = option
    if name in ("likelihood", "scaling", "errors") and value in (
        "rows",
        "pairs",
        "per_angle",
        "shared",
        "nominal",
        "speckle",
    ):
        return  # a valid draw
    valid = {"shards": 2, "chains": 1, "warmup": 5, "samples": 4, "progress": False}
    _, error, compiled = outcome(lambda: hd.fit_cmc(tiny_ds, **{**valid, name: value}))
    refused_before_compiling(error, compiled)


LOAD_ARGUMENTS = {
    "q": st.floats(1e-3, 0.1),
    "phi": st.one_of(st.floats(-90, 90), st.lists(st.floats(-90, 90), min_size=1, max_size=2)),
    "frames": st.one_of(st.builds(slice, st.integers(-10, 10), st.integers(-10, 10)), st.none()),
}


@SETTINGS
@given(arguments(LOAD_ARGUMENTS))
def test_load_returns_a_valid_dataset_or_refuses(tiny_file, kwargs):
    result, error, compiled = outcome(lambda: hd.load(tiny_file, **kwargs))
    outcome_event(error)
    if error is None:
        # a list of q-values (even of one) asks for the multi-q form, one number for one bin
        check = qbins.validate_multi if qbins.is_multi_q(result) else hd.validate
        assert check(result) is result
    else:
        refused_before_compiling(error, compiled)


@SETTINGS
@given(HOSTILE)
def test_load_of_any_path_argument_is_read_or_refused(path):
    _, error, compiled = outcome(lambda: hd.load(path))
    refused_before_compiling(error, compiled)


@SETTINGS
@given(
    st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=40),
        st.lists(st.complex_numbers(max_magnitude=2), min_size=16, max_size=16),
        st.lists(st.text(max_size=2), min_size=16, max_size=16),
    ),
    st.sampled_from([(4, 4), (1, 4, 4), (2, 2, 4), (16,), (2, 8)]),
    st.one_of(st.floats(1e-3, 0.1), HOSTILE),
)
def test_from_arrays_builds_a_valid_dataset_or_raises_data_error(values, shape, q):
    if len(values) != int(np.prod(shape)):
        values = (values * 16)[: int(np.prod(shape))] or [1.0] * int(np.prod(shape))
    c2 = np.array(values, dtype=object).reshape(shape).tolist()
    t = 0.1 * np.arange(1, shape[-1] + 1)
    try:
        tiny_ds = hd.from_arrays(c2, t, 0.0 if len(shape) < 3 else [0.0] * shape[0], q)
    except HeterodyneError as err:
        assert isinstance(err, hd.DataError)
        return
    assert hd.validate(tiny_ds) is tiny_ds


SURVEY_ARGUMENTS = {
    "q": st.one_of(st.floats(1e-3, 0.1), HOSTILE),
    "phi": st.one_of(st.floats(-90, 90), HOSTILE),
    "frames": HOSTILE,
    "checkpoint": HOSTILE,
    "executor": HOSTILE,
    "method": HOSTILE,
    "multistart": HOSTILE,
}


@SETTINGS
@given(HOSTILE, st.fixed_dictionaries({}, optional=SURVEY_ARGUMENTS))
def test_survey_of_hostile_sources_and_options_is_refused_before_compiling(sources, kwargs):
    _, error, compiled = outcome(lambda: hd.survey(sources, progress=False, **kwargs))
    refused_before_compiling(error, compiled)


@SETTINGS
@given(
    st.sampled_from(["--port", "--address", "--q", "--phi", "--frames", "--multistart"]),
    st.text(max_size=12),
)
def test_the_command_line_parses_or_exits_2(flag, text):
    command = ["dashboard", "f.h5"] if flag in ("--port", "--address") else ["fit", "f.h5"]
    command += [] if command[0] == "dashboard" else ["--out", "o"]
    try:
        build_parser().parse_args([*command, f"{flag}={text}"])
    except SystemExit as stop:
        assert stop.code == 2
