"""The package's error types: every problem with user input raises one of these.

=====================  =====================================================  ============
error                  raised when                                            subclass of
=====================  =====================================================  ============
``HeterodyneError``    base of all errors below                               ``Exception``
``DataError``          a Dataset or array fails validation (shape, times,     ``ValueError``
                       q, all-NaN angle, asymmetric c2, ...) or would not
                       fit in memory
``FileFormatError``    a file is missing, unreadable, of an unknown layout    ``DataError``
                       or inconsistent; the message names the file and the
                       path inside it
``ParameterError``     an unknown parameter name, a value, bound or vary of   ``ValueError``
                       the wrong type, bounds with min > max, a value
                       outside its bounds or of the wrong shape
``OptionError``        a keyword argument of a public function has the        ``ValueError``
                       wrong type or value (paths too, and output folders
                       that cannot be written); checked by
                       :mod:`heterodyne.checks` before any work
``OverwriteError``     a file to be written exists and ``overwrite=True``     ``FileExistsError``
                       was not given
``Cancelled``          work stopped on request (a CMC run's tracker           ``HeterodyneError``
                       cancelled: the dashboard's Cancel, a closed page)
=====================  =====================================================  ============
"""


class HeterodyneError(Exception):
    """Base class of the errors raised by heterodyne."""


class DataError(HeterodyneError, ValueError):
    """A Dataset or array does not have the canonical form."""


class FileFormatError(DataError):
    """A file cannot be read as heterodyne data."""


class ParameterError(HeterodyneError, ValueError):
    """A parameter name, value or bound is invalid."""


class OptionError(HeterodyneError, ValueError):
    """A keyword option has the wrong type or value."""


class OverwriteError(HeterodyneError, FileExistsError):
    """A file to be written exists; ``overwrite=True`` replaces it."""


class Cancelled(HeterodyneError):
    """Work was stopped on request (a :class:`heterodyne.tracker.Tracker` cancelled)."""
