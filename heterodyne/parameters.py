"""The parameter table of MODEL.md and a mutable ``Parameters`` mapping built from it.

The table below is the single source of truth for names, units, defaults, bounds and
which parameters vary by default. Everything else (the model's argument order, the
simulator, the fitters, reports, plots) reads it from here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heterodyne import checks
from heterodyne.errors import ParameterError


@dataclass(frozen=True)
class ParameterSpec:
    """One row of the MODEL.md parameter table."""

    name: str
    unit: str
    default: float
    min: float
    max: float
    vary: bool
    meaning: str


# Canonical order: the model takes the 14 physics parameters as one vector in this order.
# Defaults vary only identifiable parameters (MODEL.md, "Fitting conventions"): with
# alpha = beta = 0 the offsets D_offset_*, v_offset are the same rate as D0_*, v0; f2 enters
# only through f0 * exp(-f1 f2); with f1 = 0 only f0 + f3 is identifiable.
# fmt: off
PHYSICS = (
    #             name               unit          default  min    max   vary   meaning
    ParameterSpec("D0_ref",          "Å²/s^(1+α)", 1e4,  0.0,   1e7,  True,
                  "reference (the slower component) transport prefactor, "
                  "J_r = D0_ref t^alpha_ref + D_offset_ref"),
    ParameterSpec("alpha_ref",       "",           0.0,  -2.0,  2.0,  True,
                  "reference transport exponent"),
    ParameterSpec("D_offset_ref",    "Å²/s",       0.0,  -1e5,  1e5,  False,
                  "reference transport offset"),
    ParameterSpec("D0_sample",       "Å²/s^(1+α)", 1e4,  0.0,   1e7,  True,
                  "sample (the faster component) transport prefactor, "
                  "J_s = D0_sample t^alpha_sample + D_offset_sample"),
    ParameterSpec("alpha_sample",    "",           0.0,  -2.0,  2.0,  True,
                  "sample transport exponent"),
    ParameterSpec("D_offset_sample", "Å²/s",       0.0,  -1e5,  1e5,  False,
                  "sample transport offset"),
    ParameterSpec("v0",              "Å/s^(1+β)",  1e3,  0.0,   1e6,  True,
                  "flow velocity prefactor, v = v0 t^beta + v_offset"),
    ParameterSpec("beta",            "",           0.0,  -2.0,  2.0,  True,
                  "flow velocity exponent"),
    ParameterSpec("v_offset",        "Å/s",        0.0,  -1e5,  1e5,  False,
                  "flow velocity offset (fixes the sign of v)"),
    ParameterSpec("f0",              "",           0.5,  0.0,   1.0,  True,
                  "sample fraction amplitude, x_s = clip(f0 exp(f1 (t - f2)) + f3, 0, 1)"),
    ParameterSpec("f1",              "1/s",        0.0,  -10.0, 10.0, True,
                  "sample fraction growth rate"),
    ParameterSpec("f2",              "s",          0.0,  -1e4,  1e4,  False,
                  "sample fraction time shift (enters only through f0 exp(-f1 f2))"),
    ParameterSpec("f3",              "",           0.0,  0.0,   1.0,  False,
                  "sample fraction baseline"),
    ParameterSpec("phi0",            "deg",        0.0,  -90.0, 90.0, True,
                  "flow direction in the detector frame (period 180°)"),
)
SCALING = (
    ParameterSpec("contrast",        "",           0.5,  0.0,   1.0,  True,
                  "speckle contrast of each angle, c2 = offset + contrast g"),
    ParameterSpec("offset",          "",           1.0,  0.5,   1.5,  True,
                  "baseline of each angle"),
)
# fmt: on
# Varied physics parameters whose start the fitters read off the data unless a value is
# given (heterodyne.starts); the tables show them as "data".
ESTIMATED = ("D0_ref", "D0_sample", "f0", "v0", "phi0")
PHYSICS_NAMES = tuple(s.name for s in PHYSICS)
SCALING_NAMES = tuple(s.name for s in SCALING)
SPECS = {s.name: s for s in PHYSICS + SCALING}
UNITS = {s.name: s.unit for s in PHYSICS + SCALING}
#: Position of each physics parameter in the model's vector (:mod:`heterodyne.model`).
PHYSICS_INDEX = {name: k for k, name in enumerate(PHYSICS_NAMES)}
#: The arguments of :func:`heterodyne.model.sample_fraction`, in its order.
FRACTION_NAMES = ("f0", "f1", "f2", "f3")


def physics_by_name(physics) -> dict[str, float]:
    """The model's physics vector (14,) as ``{name: value}``."""
    return {name: float(physics[k]) for name, k in PHYSICS_INDEX.items()}


# Positive scales spanning decades: drawn log-uniformly by multistart, sampled in log10 by
# CMC, shown on log sliders by the explorer.
LOG_SCALE = ("D0_ref", "D0_sample", "v0")
# The log range of a log-scale parameter whose lower bound is 0 starts this many decades
# below its upper bound.
LOG_DECADES = 6


def _bound(field: str, given: str | None = None) -> property:
    """The ``min`` or ``max`` of a :class:`Parameter`: a number, ``±inf`` allowed; setting
    it sets the flag ``given`` names."""

    def get(self) -> float:
        return getattr(self, f"_{field}")

    def set(self, bound):
        checked = checks.number(bound, f"{self.name} {field}", finite=False, error=ParameterError)
        setattr(self, f"_{field}", checked)
        if given is not None:
            setattr(self, given, True)

    return property(get, set)


class Parameter:
    """A parameter's current setting: ``value``, ``vary``, ``min``, ``max``.

    For ``contrast`` and ``offset`` the value may be ``None`` (estimate it from the data
    per angle), a number (all angles) or one number per angle. Each setting is checked
    when it is set: a value that is not a real number, a ``vary`` that is not a bool or a
    NaN bound raises ``ParameterError``; :meth:`Parameters.validate` checks them
    together (bounds in order, value inside). ``given`` is True once a value has been
    set: the fitters estimate the start of a varied physics parameter from the data
    unless its value was given (:mod:`heterodyne.starts`). ``max_given`` is True once
    ``max`` has been set: only then may ``v0`` exceed the velocity the data resolve
    (:func:`heterodyne.starts.resolvable_velocity`).
    """

    __slots__ = ("name", "_value", "_vary", "_min", "_max", "given", "max_given")

    def __init__(self, name, value, vary, min, max):  # noqa: A002 (lmfit's names)
        self.name = name
        self.value = value
        self.vary = vary
        self.min = min
        self.max = max
        self.given = self.max_given = False  # the table's own settings

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        if value is None and self.name in SCALING_NAMES:
            self._value = None
        elif self.name in SCALING_NAMES and np.ndim(value) != 0:
            self._value = checks.numbers(value, f"{self.name} value", error=ParameterError)
        else:
            self._value = checks.number(value, f"{self.name} value", error=ParameterError)
        self.given = True

    @property
    def vary(self) -> bool:
        return self._vary

    @vary.setter
    def vary(self, vary):
        self._vary = checks.flag(vary, f"{self.name} vary", error=ParameterError)

    min = _bound("min")
    max = _bound("max", given="max_given")

    @property
    def spec(self) -> ParameterSpec:
        return SPECS[self.name]

    @property
    def unit(self) -> str:
        return self.spec.unit

    def __repr__(self):
        return (
            f"<Parameter {self.name}={self.value!r} vary={self.vary} "
            f"bounds=[{self.min:g}, {self.max:g}]>"
        )


class Parameters(MutableMapping):
    """The 14 physics parameters and the per-angle ``contrast``/``offset`` by name.

    >>> p = Parameters()
    >>> p["v0"].value = 250
    >>> p["f2"].vary = False
    >>> p["D0_sample"].min = 10
    >>> print(p)  # doctest: +SKIP

    ``Parameters(v0=250, D0_sample=3e3)`` sets values at construction. ``contrast`` and
    ``offset`` start as ``None``: the fitters estimate them from the data.
    """

    def __init__(self, values: Mapping[str, float] | None = None, /, **kwargs):
        self._params = {s.name: Parameter(s.name, s.default, s.vary, s.min, s.max) for s in PHYSICS}
        for s in SCALING:
            self._params[s.name] = Parameter(s.name, None, s.vary, s.min, s.max)
        if values is not None and not isinstance(values, Mapping):
            raise ParameterError(
                f"Parameters takes a dict of name -> value (or keywords); got "
                f"{type(values).__name__} {values!r:.60}"
            )
        for name, value in {**dict(values or {}), **kwargs}.items():
            self[name].value = value

    @classmethod
    def coerce(cls, params) -> Parameters:
        """A ``Parameters`` from ``None`` (defaults), a dict of values or a ``Parameters``
        (copied)."""
        if params is None:
            return cls()
        if isinstance(params, Parameters):
            return params.copy()
        if isinstance(params, Mapping):
            return cls(params)
        raise ParameterError(
            f"params must be a heterodyne.Parameters, a dict of name -> value or None; "
            f"got {type(params).__name__}"
        )

    def __getitem__(self, name: str) -> Parameter:
        if not isinstance(name, str):
            raise ParameterError(f"parameter names are strings; got {name!r:.60}")
        try:
            return self._params[name]
        except KeyError:
            raise ParameterError(
                f"unknown parameter {name!r}; the parameters are "
                f"{', '.join(PHYSICS_NAMES + SCALING_NAMES)}"
            ) from None

    def __setitem__(self, name, value):
        if isinstance(value, Parameter):
            if value.name != name:
                raise ParameterError(f"cannot store parameter {value.name!r} under {name!r}")
            self[name]  # raises for unknown names
            self._params[name] = value
        else:
            self[name].value = value

    def __delitem__(self, name):
        raise ParameterError("parameters cannot be removed; fix one with p[name].vary = False")

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def copy(self) -> Parameters:
        return copy.deepcopy(self)

    def fix(self, *names: str) -> Parameters:
        """Set ``vary = False`` on the named parameters; returns ``self``."""
        for name in names:
            self[name].vary = False
        return self

    def to_json(self, path, *, overwrite: bool = False):
        """Write the settings to a JSON file that :meth:`from_json` and ``heterodyne fit
        --params`` read: per name ``vary``, ``min`` and, where they were set, ``value``
        and ``max`` (an unset value is estimated from the data at fit time, an unset
        ``v0`` max is the velocity the data resolve)."""
        from heterodyne.files import atomic_write

        table = {}
        for name, par in self._params.items():
            entry = {"vary": bool(par.vary), "min": float(par.min)}
            if par.max_given:
                entry["max"] = float(par.max)
            if par.given and par.value is not None:
                value = np.asarray(par.value, dtype=np.float64)
                entry["value"] = float(value) if value.ndim == 0 else value.tolist()
            table[name] = entry
        text = json.dumps(table, indent=1) + "\n"
        return atomic_write(lambda tmp: tmp.write_text(text), path, overwrite=overwrite)

    @classmethod
    def from_json(cls, path) -> Parameters:
        """Read a file written by :meth:`to_json` (names may be a subset)."""
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ParameterError(f"{path}: cannot be read as a parameters file ({err})") from err
        if not isinstance(table, dict):
            raise ParameterError(f"{path}: expected an object of name -> settings")
        p = cls()
        for name, entry in table.items():
            par = p[name]
            if not isinstance(entry, dict) or set(entry) - {"value", "vary", "min", "max"}:
                raise ParameterError(
                    f"{path}: {name} must map to value, vary, min and max; got {entry!r}"
                )
            for key, setting in entry.items():
                setattr(par, key, setting)
        p.validate()
        return p

    def from_data(self, name: str) -> bool:
        """Whether a fit starts ``name`` from an estimate read off the data (varied, in
        :data:`ESTIMATED`, no value given)."""
        par = self[name]
        return name in ESTIMATED and par.vary and not par.given

    def clip_placeholders(self) -> Parameters:
        """Move physics values that were never set into their bounds (``given`` stays
        False); returns ``self``."""
        for name in PHYSICS_NAMES:
            par = self[name]
            if not par.given:
                par._value = float(np.clip(par.value, par.min, par.max))
        return self

    def physics_values(self) -> np.ndarray:
        """The 14 physics values as a float64 vector in canonical order."""
        return np.array([float(self[n].value) for n in PHYSICS_NAMES], dtype=np.float64)

    @property
    def varied(self) -> tuple[str, ...]:
        """Names of the varied physics parameters, in canonical order."""
        return tuple(n for n in PHYSICS_NAMES if self[n].vary)

    def validate(self, n_phi: int | None = None) -> None:
        """Raise ``ParameterError`` for non-finite values, min > max or given values
        outside the bounds. ``n_phi`` checks the length of per-angle contrast/offset."""
        for name, p in self._params.items():
            if p.min > p.max:
                raise ParameterError(f"{name}: min {p.min:g} > max {p.max:g}")
            if p.vary and p.min == p.max:
                raise ParameterError(
                    f"{name}: min = max = {p.min:g} leaves no room to vary; fix it instead "
                    f"(p[{name!r}].vary = False) or widen the bounds"
                )
            if p.value is None:  # contrast, offset: estimated from the data
                continue
            values = np.atleast_1d(np.asarray(p.value, dtype=np.float64))
            if name in PHYSICS_NAMES and values.size != 1:
                raise ParameterError(f"{name}: expected one number, got shape {values.shape}")
            if name in SCALING_NAMES and n_phi is not None and values.size not in (1, n_phi):
                raise ParameterError(
                    f"{name}: expected one value or one per angle ({n_phi}), got {values.size}"
                )
            if not np.all(np.isfinite(values)):
                raise ParameterError(f"{name}: value {p.value!r} is not finite")
            # a value never set is a placeholder: the fitters estimate it or clip it
            if p.given and (np.any(values < p.min) or np.any(values > p.max)):
                raise ParameterError(
                    f"{name}: value {p.value!r} outside its bounds [{p.min:g}, {p.max:g}]"
                )

    def table(self) -> str:
        """The parameters as a fixed-width text table."""
        rows = [f"{'name':<16}{'value':>12}{'vary':>6}{'min':>11}{'max':>11}  unit"]
        for name, p in self._params.items():
            if p.value is None:
                value = "auto"
            elif self.from_data(name):
                value = "data"
            elif np.ndim(p.value) == 0:
                value = f"{float(p.value):.6g}"
            else:
                value = "[" + ",".join(f"{v:.3g}" for v in np.ravel(p.value)) + "]"
            rows.append(
                f"{name:<16}{value:>12}{'yes' if p.vary else 'no':>6}"
                f"{p.min:>11.4g}{p.max:>11.4g}  {p.unit}"
            )
        return "\n".join(rows)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"Parameters(\n{self.table()}\n)"

    def _repr_html_(self):
        head = "".join(
            f"<th>{h}</th>" for h in ("name", "value", "vary", "min", "max", "unit", "meaning")
        )
        body = []
        for name, p in self._params.items():
            value = (
                "auto"
                if p.value is None
                else "data"
                if self.from_data(name)
                else np.array2string(np.asarray(p.value, dtype=float), precision=6)
            )
            body.append(
                f"<tr><td>{name}</td><td>{value}</td><td>{'yes' if p.vary else 'no'}</td>"
                f"<td>{p.min:g}</td><td>{p.max:g}</td><td>{p.unit}</td>"
                f"<td style='text-align:left'>{p.spec.meaning}</td></tr>"
            )
        return f"<table><tr>{head}</tr>{''.join(body)}</table>"
