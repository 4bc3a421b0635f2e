"""Parameter surveys: fit every q-bin of one or many files and gather the results."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from heterodyne import checks, executors, identity, qbins
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, UNITS, Parameters

METHODS = ("nlsq",)


def survey(
    sources,
    method: str = "nlsq",
    *,
    q=None,
    phi=None,
    frames=None,
    t_start=None,
    params=None,
    checkpoint=None,
    executor=None,
    progress: bool = True,
    **fit_options,
) -> xr.Dataset:
    """Fit every q-bin of every source and gather parameters and stderr in one Dataset.

    Parameters
    ----------
    sources : path, Dataset, or a list of them
        Files readable by :func:`heterodyne.load` and multi-q Datasets
        (:mod:`heterodyne.qbins`): every q-bin is fitted alone, or those nearest to
        ``q``; or single-q Datasets (fitted as they are).
    method : {"nlsq"}
        The fitting method.
    q : float or sequence, optional
        q-bins to fit [1/Å] (nearest); default all bins of each file.
    phi, frames, t_start :
        Passed to :func:`heterodyne.load` (``t_start``: time [s] of each file's stored
        frame 0; needed for files that cannot place their first frame).
    params : Parameters or dict, optional
        Starting values and settings, the same for every fit.
    checkpoint : path, optional
        Folder where each finished fit is saved (``NLSQResult.to_netcdf``, atomically) as
        soon as it ends. A rerun with the same arguments reads those back and fits only
        the rest, so a survey stopped by a KeyboardInterrupt, a crashed worker process or
        a killed job resumes where it stopped. Files are named by source, q-bin and a
        hash of the data and every fit argument: changed arguments never reuse a fit.
    executor : None, "processes", "dask://HOST:PORT" or concurrent.futures.Executor
        Where the fits run (:mod:`heterodyne.executors`).
    progress : bool
        Show a progress bar over fits (the fits themselves run quietly).
    **fit_options
        Passed to :func:`heterodyne.fit_nlsq` (``multistart``, ``scaling``, ...).

    Returns
    -------
    xarray.Dataset
        Dimension ``q`` for one file, else ``fit``, with coordinates ``q`` and ``source``.
        One variable per physics parameter with ``<name>_stderr`` (the fit's ``stderr``,
        of the kind ``errors=`` chose) and ``<name>_stderr_nominal`` (the nominal
        least-squares errors, which treat the pairs as independent), ``contrast`` and
        ``offset`` (and their stderr) along ``phi``, ``reduced_chi2``, ``success``,
        ``verdict`` (ok, check, fail) and its ``reasons``, ``nfev``. :func:`table` shows it
        as one row per fit. ``attrs["fitted"]`` and ``attrs["from_checkpoint"]`` count the fits run
        now and read back from ``checkpoint``.
    """
    sources = checks.check_survey(
        sources, method=method, q=q, phi=phi, frames=frames, params=params,
        checkpoint=checkpoint, executor=executor, progress=progress, options=fit_options,
    )  # fmt: skip
    p = Parameters.coerce(params)
    tasks = [
        task(
            source,
            _name(source, k),
            params=p,
            options=fit_options,
            checkpoint=checkpoint,
            q=q_bin,
            phi=phi,
            frames=frames,
            t_start=t_start,
        )  # fmt: skip
        for k, source in enumerate(sources)
        for q_bin in _q_bins(source, q)
    ]
    summaries, fitted = run_tasks(tasks, executor, progress=progress, desc="survey")
    out = xr.concat(summaries, dim="fit", join="outer", combine_attrs="drop")
    if len(sources) == 1:
        out = out.swap_dims(fit="q").drop_vars("fit", errors="ignore")
    out["q"].attrs.update(units="1/Å", long_name="q")
    out.attrs.update(method=method, fitted=fitted, from_checkpoint=len(tasks) - fitted)
    return out


def task(source, name: str, *, params, options, checkpoint=None, q=None, phi=None, frames=None,
         t_start=None) -> dict:  # fmt: skip
    """One fit for :func:`run_tasks`: ``source`` (a file's q-bin ``q``, read with ``phi``,
    ``frames`` and ``t_start``, or a Dataset fitted as it is) fitted with ``params`` and
    the :func:`heterodyne.fit_nlsq` ``options``, saved in the folder ``checkpoint`` (or
    not saved when ``None``) under a name unique to that work (:func:`checkpoint_name`)."""
    out = {
        "source": source,
        "q": q,
        "phi": phi,
        "frames": frames,
        "t_start": t_start,
        "params": params,
        "options": options,
        "name": name,
    }
    out["checkpoint"] = None if checkpoint is None else Path(checkpoint) / checkpoint_name(out)
    return out


def run_tasks(tasks, executor=None, *, progress: bool = True, desc: str = "survey"):
    """``(summaries, fitted)``: the :func:`summarize` row of each task of :func:`task`, in
    order, and how many were fitted now. A task whose checkpoint file exists is read back
    from it; the others are fitted on ``executor`` (:mod:`heterodyne.executors`), each
    saved to its checkpoint as soon as it ends."""
    summaries = [None] * len(tasks)
    pending = []
    for index, one in enumerate(tasks):
        if one["checkpoint"] is not None and one["checkpoint"].exists():
            from heterodyne.results import open_result

            summaries[index] = summarize(open_result(one["checkpoint"]), one["name"])
        else:
            pending.append(index)
    for k, summary in executors.run(
        _fit_task, [tasks[i] for i in pending], executor, progress=progress, desc=desc
    ):
        summaries[pending[k]] = summary
    return summaries, len(pending)


def table(out: xr.Dataset) -> pd.DataFrame:
    """A survey as one row per fit, for a person: ``q [1/Å]``, the verdict and its reasons
    (degenerate parameters, bounds reached...), the reduced chi2, and ``value ± stderr``
    of each physics parameter that was fitted (units in the column names).

    Examples
    --------
    >>> from heterodyne.survey import table
    >>> print(table(hd.survey("sample.h5")).to_string())  # doctest: +SKIP
    """
    along = out["q"].dims[0]
    columns = {"q [1/Å]": [f"{v:.5g}" for v in out["q"].values]}
    if "source" in out.coords and out["source"].dims == (along,) and along != "q":
        columns["source"] = [Path(str(v)).name for v in out["source"].values]
    columns["verdict"] = [str(v) for v in out["verdict"].values]
    columns["reduced χ²"] = [f"{v:.4g}" for v in out["reduced_chi2"].values]
    for name in PHYSICS_NAMES:
        errors = out[f"{name}_stderr"].values
        if not np.isfinite(errors).any():
            continue  # fixed in every fit
        unit = UNITS.get(name)
        header = f"{name} [{unit}]" if unit else name
        columns[header] = [
            f"{v:.4g} ± {e:.2g}" if np.isfinite(e) else f"{v:.4g} (fixed)"
            for v, e in zip(out[name].values, errors, strict=True)
        ]
    if "reasons" in out.data_vars:
        columns["reasons"] = [str(v) for v in out["reasons"].values]
    return pd.DataFrame(columns)


def _q_bins(source, q):
    if qbins.is_multi_q(source):
        available = source["q"].values
    elif isinstance(source, xr.Dataset):
        return [None]
    else:
        from heterodyne.io import q_values

        available = q_values(source)
    if q is None:
        return [float(v) for v in available]
    return [float(available[np.argmin(np.abs(available - v))]) for v in np.atleast_1d(q)]


def _name(source, k):
    return f"dataset{k}" if isinstance(source, xr.Dataset) else os.fspath(source)


def checkpoint_name(task) -> str:
    """A file name unique to the work: the source (a Dataset's every variable, coordinate
    and attribute; a file's path, size and modification time), the q-bin, ``phi``,
    ``frames``, ``t_start``, every parameter field and fit option at full precision, and the package
    version (:func:`heterodyne.identity.digest`)."""
    source = task["source"]
    if isinstance(source, xr.Dataset):
        what, stem = source, task["name"]
    else:
        what, stem = identity.file_identity(source), Path(source).stem
    settings = (
        what,
        task["q"],
        task["phi"],
        task["frames"],
        task["t_start"],
        task["params"],
        task["options"],
    )
    q = "" if task["q"] is None else f"_q{task['q']:.6g}"
    return f"{stem}{q}_{identity.digest(*settings)[:16]}.nc"


def _fit_task(task) -> xr.Dataset:
    """Load one q-bin, fit it, save it to the checkpoint folder, return its summary (runs
    in workers)."""
    from heterodyne.data import select
    from heterodyne.io import load
    from heterodyne.nlsq import fit_nlsq

    source = task["source"]
    if qbins.is_multi_q(source):  # each q-bin fitted alone, cut as a file's would be
        ds = select(source, q=task["q"], phi=task["phi"], frames=task["frames"])
    elif isinstance(source, xr.Dataset):
        ds = source
    else:
        ds = load(
            source, q=task["q"], phi=task["phi"], frames=task["frames"], t_start=task["t_start"]
        )
    result = fit_nlsq(ds, task["params"], progress=False, **task["options"])
    if task["checkpoint"] is not None:
        result.to_netcdf(task["checkpoint"], overwrite=True)
    return summarize(result, task["name"])


def summarize(result, name: str) -> xr.Dataset:
    """One fit as a row of the survey: values, ``<name>_stderr``, the physics
    parameters' ``<name>_stderr_nominal``, fit statistics."""
    out = xr.Dataset()
    for key in PHYSICS_NAMES + SCALING_NAMES:
        out[key] = result.params[key]
        out[f"{key}_stderr"] = result.stderr[key]
        if key in PHYSICS_NAMES:
            out[f"{key}_stderr_nominal"] = result.stderr_nominal[key]
    out["reduced_chi2"] = result.reduced_chi2
    out["success"] = int(result.success)
    out["verdict"] = result.verdict.status
    out["reasons"] = "; ".join(result.verdict.reasons)
    out["nfev"] = result.nfev
    return out.expand_dims("fit").assign_coords(
        source=("fit", [name]), q=("fit", [float(result.params["q"])])
    )
