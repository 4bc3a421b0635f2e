"""heterodyne: fit XPCS two-time correlation matrices with the heterodyne model."""

import importlib

import jax

# The model's rates span many decades (q² D t ~ 1e-4 .. 1e3): float64 everywhere.
jax.config.update("jax_enable_x64", True)

from heterodyne import model  # noqa: E402
from heterodyne.cmc import fit_cmc  # noqa: E402
from heterodyne.cmc_result import CMCResult  # noqa: E402
from heterodyne.data import from_arrays, select, to_netcdf, validate  # noqa: E402
from heterodyne.errors import (  # noqa: E402
    DataError,
    FileFormatError,
    HeterodyneError,
    OptionError,
    OverwriteError,
    ParameterError,
)
from heterodyne.io import load, q_values  # noqa: E402
from heterodyne.nlsq import fit_nlsq  # noqa: E402
from heterodyne.nlsq_result import NLSQResult  # noqa: E402
from heterodyne.objective import Objective  # noqa: E402
from heterodyne.parameters import Parameters  # noqa: E402
from heterodyne.results import open_result  # noqa: E402
from heterodyne.simulate import simulate  # noqa: E402
from heterodyne.survey import survey  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CMCResult",
    "DataError",
    "FileFormatError",
    "HeterodyneError",
    "NLSQResult",
    "Objective",
    "OptionError",
    "OverwriteError",
    "ParameterError",
    "Parameters",
    "dashboard",
    "explore",
    "fit_cmc",
    "fit_nlsq",
    "from_arrays",
    "load",
    "model",
    "open_result",
    "plot",
    "q_values",
    "select",
    "simulate",
    "survey",
    "to_netcdf",
    "validate",
]

# The plotting layer imports holoviews' bokeh backend (~1.2 s): load it on first use.
_LAZY = {
    "dashboard": ("heterodyne.app", "dashboard"),
    "explore": ("heterodyne.explorer", "explore"),
    "plot": ("heterodyne.plot", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'heterodyne' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
