"""heterodyne: fit XPCS two-time correlation matrices with the heterodyne model."""

import gc
import importlib
import os
import sys
import types
from contextlib import contextmanager

# Float64 everywhere (MODEL.md): for the user's own JAX arrays too, as when the package
# enabled it on import; heterodyne.compilation enables it again if JAX is already loaded.
os.environ.setdefault("JAX_ENABLE_X64", "1")

__version__ = "0.1.0"

# Each public name is loaded on first use, with only what it needs (JAX, NumPyro, ArviZ,
# HoloViews and Panel take seconds to import): ``import heterodyne`` itself is instant.
_PUBLIC = {
    "CMCResult": "heterodyne.cmc_result",
    "Cancelled": "heterodyne.errors",
    "DataError": "heterodyne.errors",
    "FileFormatError": "heterodyne.errors",
    "HeterodyneError": "heterodyne.errors",
    "JointCMCResult": "heterodyne.joint_cmc",
    "JointResult": "heterodyne.joint_result",
    "NLSQResult": "heterodyne.nlsq_result",
    "Objective": "heterodyne.objective",
    "OptionError": "heterodyne.errors",
    "OverwriteError": "heterodyne.errors",
    "ParameterError": "heterodyne.errors",
    "Parameters": "heterodyne.parameters",
    "age_scan": "heterodyne.ageing",
    "ageing": None,
    "dashboard": "heterodyne.app",
    "explore": "heterodyne.explorer",
    "fit_cmc": "heterodyne.cmc",
    "fit_nlsq": "heterodyne.nlsq",
    "from_arrays": "heterodyne.data",
    "load": "heterodyne.io",
    "model": None,
    "open_result": "heterodyne.results",
    "plot": None,
    "q_values": "heterodyne.io",
    "select": "heterodyne.data",
    "set_compilation_cache": "heterodyne.compilation",
    "simulate": "heterodyne.simulate",
    "survey": "heterodyne.survey",
    "to_netcdf": "heterodyne.data",
    "validate": "heterodyne.data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'heterodyne' has no attribute {name!r}")
    module = _PUBLIC[name]
    with _loading():
        if module is None:  # a module of the package: heterodyne.model, heterodyne.plot
            value = importlib.import_module(f"heterodyne.{name}")
        else:
            value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


@contextmanager
def _loading():
    """Libraries loaded with the cyclic garbage collector paused, then frozen
    (``gc.freeze``). JAX, SciPy and xarray bring ~280 000 objects that live as long as
    the process, with about a thousand bytes of garbage; each full collection would
    traverse them all, during the load and again during the first fit (~0.3 s of the
    two on a 2-core machine)."""
    modules, enabled = len(sys.modules), gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()
        if enabled:
            gc.enable()


def __dir__():
    return sorted([*globals(), *_PUBLIC])


class _Package(types.ModuleType):
    """The package's module: ``hd.simulate`` and ``hd.survey`` stay the functions when
    the import system binds their modules of the same name onto the package."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
