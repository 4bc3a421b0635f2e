"""Several q-bins in one Dataset: the multi-q layout, building it and taking it apart.

Layout::

    <xarray.Dataset>
    Dimensions:  (q, phi, t1, t2)
    Coordinates:
        q    (q)    float64  wavevector of each q-bin, increasing    [1/Å]
        phi  (phi)  float64  the union of the bins' angles, sorted   [deg]
        t1, t2               the frame times, shared by every bin    [s]
    Data variables:
        c2     (q, phi, t1, t2)  two-time correlation; all NaN where a bin lacks the angle
        sigma  (q, phi, t1, t2)  optional, NaN likewise

A real q-map has different angles in different q-bins, so the angles are the union and
a ``(q, phi)`` combination that a bin lacks is all NaN. A bin's angles are exactly those
with at least one finite pair (:func:`present`), so no separate mask can disagree with
the data; a regular grid is what xarray selects, saves to netCDF and plots. One bin,
with its own angles only, is :func:`select_bin` (or ``hd.select(ds, q=...)``): a
canonical single-q Dataset (scalar ``q``, dims ``(phi, t1, t2)``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from heterodyne import checks
from heterodyne.data import COORD_ATTRS, tally_missing, validate
from heterodyne.errors import DataError, OptionError

DIMS = ("q", "phi", "t1", "t2")


def is_multi_q(ds) -> bool:
    """Whether ``ds`` is a Dataset of several q-bins (``q`` is a dimension)."""
    return isinstance(ds, xr.Dataset) and "q" in ds.dims


def combine(datasets, *, source: str | None = None) -> xr.Dataset:
    """One multi-q Dataset from single-q Datasets of the same frames.

    Parameters
    ----------
    datasets : sequence of xarray.Dataset
        Canonical single-q Datasets (each validated) with identical ``t1``, distinct
        ``q``, all with ``sigma`` or all without.
    source : str, optional
        ``attrs["source"]`` of the result; default: the bins' sources joined.

    Returns
    -------
    xarray.Dataset
        Dims ``(q, phi, t1, t2)``, bins sorted by ``q``; ``attrs["nan_pairs"]`` and
        ``attrs["dropped_frames"]`` summed over the bins (absent combinations not
        counted); the first bin's other attributes but its per-angle ones.
    """
    datasets = list(datasets)
    if not datasets:
        raise OptionError("combine needs at least one q-bin Dataset")
    for ds in datasets:
        validate(ds)
    t = datasets[0]["t1"].values
    for ds in datasets[1:]:
        if not np.array_equal(ds["t1"].values, t):
            raise DataError(
                "the q-bins have different frame times; a multi-q Dataset needs the same "
                "frames in every bin (cut them alike with hd.select(ds, frames=...))"
            )
    if len({"sigma" in ds.data_vars for ds in datasets}) > 1:
        raise DataError("some q-bins have sigma and some do not; give it for all or none")
    q = np.array([float(ds["q"]) for ds in datasets])
    if np.unique(q).size != q.size:
        raise DataError(f"two q-bins have the same q: {q.tolist()} 1/Å")
    order = np.argsort(q)
    datasets = [datasets[k] for k in order]
    phi = np.unique(np.concatenate([ds["phi"].values for ds in datasets]))
    n = t.size
    variables = {}
    for name in ("c2", "sigma"):
        if name not in datasets[0].data_vars:
            continue
        grid = np.full((len(datasets), phi.size, n, n), np.nan)
        for k, ds in enumerate(datasets):
            grid[k, np.searchsorted(phi, ds["phi"].values)] = ds[name].values
        variables[name] = (DIMS, grid, dict(datasets[0][name].attrs))
    first = datasets[0]
    out = xr.Dataset(
        variables,
        coords={
            "q": ("q", q[order], dict(COORD_ATTRS["q"])),
            "phi": ("phi", phi, dict(COORD_ATTRS["phi"])),
            "t1": first["t1"],
            "t2": first["t2"],
        },
        attrs=dict(first.attrs),
    )
    for name in ("nan_pairs", "dropped_frames"):
        out.attrs[name] = int(sum(int(ds.attrs.get(name, 0)) for ds in datasets))
    out.attrs["source"] = (
        source if source is not None else "; ".join(str(ds.attrs["source"]) for ds in datasets)
    )
    # per-angle attributes of one bin describe none of the others
    for name in ("true_contrast", "true_offset"):
        out.attrs.pop(name, None)
    return out


def tally_bins(ds: xr.Dataset) -> xr.Dataset:
    """Set ``attrs["nan_pairs"]`` and ``attrs["dropped_frames"]`` of a multi-q Dataset, in
    place, as the sums over its bins (:func:`heterodyne.data.tally_missing` of each)."""
    parts = bins(ds)
    for name in ("nan_pairs", "dropped_frames"):
        ds.attrs[name] = int(sum(int(one.attrs[name]) for one in parts))
    return ds


def present(ds: xr.Dataset) -> xr.DataArray:
    """Which ``(q, phi)`` combinations hold data (any finite pair ``t1 < t2``)."""
    n = ds.sizes["t1"]
    upper = xr.DataArray(~np.tri(n, dtype=bool), dims=("t1", "t2"))
    return np.isfinite(ds["c2"]).where(upper, False).any(("t1", "t2"))


def select_bin(ds: xr.Dataset, q) -> xr.Dataset:
    """The q-bin nearest ``q`` [1/Å] of a multi-q Dataset, with its own angles only: a
    canonical single-q Dataset (scalar ``q``, dims ``(phi, t1, t2)``)."""
    wanted = checks.number(q, "q [1/Å]", positive=True)
    k = int(np.argmin(np.abs(ds["q"].values - wanted)))
    one = ds.isel(q=k)
    one = one.isel(phi=np.flatnonzero(present(one).values))
    one.attrs = {
        key: value for key, value in ds.attrs.items() if key not in ("nan_pairs", "dropped_frames")
    }
    one.attrs["source"] = f"{ds.attrs.get('source', '')} q-bin {k}".strip()
    return validate(tally_missing(one.copy()))


def bins(ds: xr.Dataset) -> list[xr.Dataset]:
    """Every q-bin of a multi-q Dataset as a single-q Dataset, in order of ``q``."""
    return [select_bin(ds, q) for q in ds["q"].values]


def validate_multi(ds: xr.Dataset) -> xr.Dataset:
    """Check the multi-q layout (:func:`checked_bins`); return ``ds`` unchanged or raise
    ``DataError``."""
    checked_bins(ds)
    return ds


def checked_bins(ds: xr.Dataset) -> list[xr.Dataset]:
    """The q-bins of ``ds`` (:func:`bins`) after checking the multi-q layout: dims ``(q,
    phi, t1, t2)``, ``q`` increasing, positive and distinct, and every bin a valid
    single-q Dataset with at least one angle; else ``DataError``."""
    if ds["c2"].dims != DIMS:
        raise DataError(
            f"c2 has dims {ds['c2'].dims}; a multi-q Dataset has {DIMS}. "
            "Use ds.transpose('q', 'phi', 't1', 't2') or heterodyne.qbins.combine."
        )
    q = np.asarray(ds["q"].values, dtype=float)
    if not (np.all(np.isfinite(q)) and np.all(q > 0) and np.all(np.diff(q) > 0)):
        raise DataError(f"q must be positive, finite and increasing [1/Å]; got {q.tolist()}")
    has = present(ds).values
    empty = q[~has.any(axis=1)]
    if empty.size:
        raise DataError(
            f"the q-bins q = {empty.tolist()} 1/Å hold no data; drop them (ds.drop_sel(q=...))"
        )
    parts = []
    for value in q:
        try:
            parts.append(select_bin(ds, value))
        except DataError as err:
            raise DataError(f"q-bin q = {value:g} 1/Å: {err}") from err
    return parts


def select(ds: xr.Dataset, *, q=None, phi=None, frames=None) -> xr.Dataset:
    """:func:`heterodyne.select` of a multi-q Dataset: ``q`` one number gives that bin
    (single-q, then ``phi`` and ``frames`` as for one bin); a list keeps those bins (the
    nearest to each), ``frames`` cuts every bin; ``phi`` needs one bin."""
    from heterodyne.data import select as select_single

    validate_multi(ds)
    if q is not None and np.ndim(q) == 0:
        return select_single(select_bin(ds, q), phi=phi, frames=frames)
    if phi is not None:
        raise OptionError(
            "phi selects angles of one q-bin; pick it first: hd.select(ds, q=..., phi=...)"
        )
    out = ds
    if q is not None:
        wanted = checks.numbers(q, "q [1/Å]")
        picks = np.argmin(np.abs(ds["q"].values[None, :] - wanted[:, None]), axis=1)
        if np.unique(picks).size != picks.size:
            raise OptionError(
                f"q={wanted.tolist()} selects the same q-bin twice; "
                f"the q-bins are {ds['q'].values.tolist()} 1/Å"
            )
        out = out.isel(q=np.sort(picks))
    parts = [select_single(one, frames=frames) for one in bins(out)]
    return combine(parts, source=ds.attrs.get("source"))
