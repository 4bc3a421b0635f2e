"""HoloViews views of two-time data and fits (bokeh backend).

Every function returns a HoloViews object that is interactive in JupyterLab (after
``hv.extension("bokeh", inline=True)`` or ``pn.extension(inline=True)`` in the notebook)
and that :func:`save` writes to a standalone HTML file.

- :func:`c2`: one heatmap per angle on a shared colour scale;
- :func:`cuts`: ``c2(t1, t1 + tau)`` against the lag at a few ages ``t1``;
- :func:`fit`: data | model | residual per angle and the one-time projection ``g2(tau)``;
- :func:`params`: fitted parameters with error bars across a survey;
- :func:`age`: the effective rates of an age scan against age, with the law drawn over;
- :func:`posterior`: CMC marginals, pairs, traces by shard and the diagnostics verdict.

The diagonal ``t1 = t2`` is masked (NaN) in every heatmap: it is excluded from the fits
(MODEL.md, "Fitting conventions") and in real data carries the shot-noise spike.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 (registers the bokeh backend and its options)
import numpy as np
import xarray as xr
from bokeh.resources import INLINE

from heterodyne import diagnostics
from heterodyne.data import validate
from heterodyne.errors import OptionError
from heterodyne.files import atomic_write
from heterodyne.parameters import PHYSICS_NAMES, SCALING_NAMES, SPECS, UNITS

ROBUST_PERCENTILES = (1.0, 99.0)  # colour range of c2 heatmaps, off-diagonal values
RESIDUAL_PERCENTILE = 99.0  # the residual scale is +-this percentile of |residual|
N_AGES = 4  # default number of ages t1 in the one-time cuts
LOG_PARAMETERS = ("D0_ref", "D0_sample", "v0")  # shown on a log axis when all positive
# Categorical colours of the ages (bokeh's Category10): data and model of an age share one.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")

HEATMAP_SIZE = 260  # frame width and height of a heatmap [px]
PANEL_SIZE = (300, 260)  # frame width and height of a line panel [px]
# At most this many panels side by side: two panels (~700 px) fit a notebook's output
# area and the dashboard at a 1280 px window; more are clipped or scroll sideways.
COLUMNS = 2
TICKS = 4  # ticks on a parameter's value axis: long labels (0.000123) do not overlap
N_PAIRS = 3  # the posterior view shows the pair plots of this many most correlated pairs
HISTOGRAM_BINS = 40


def offdiagonal(c2) -> np.ndarray:
    """A float copy of ``c2 (..., N, N)`` with the diagonal set to NaN."""
    out = np.array(c2, dtype=np.float64)
    n = out.shape[-1]
    out[..., np.arange(n), np.arange(n)] = np.nan
    return out


def robust_range(values, percentiles=ROBUST_PERCENTILES) -> tuple[float, float]:
    """``(low, high)`` percentiles of the finite ``values``; widened if they coincide."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(finite, percentiles))
    if high <= low:
        pad = max(abs(low), 1.0) * 1e-6
        low, high = low - pad, high + pad
    return low, high


def symmetric_range(values, percentile=RESIDUAL_PERCENTILE) -> tuple[float, float]:
    """``(-m, m)`` with ``m`` the ``percentile`` of ``|values|``: a diverging scale
    centred on 0."""
    finite = np.abs(np.asarray(values, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    m = float(np.percentile(finite, percentile)) if finite.size else 1.0
    m = m if m > 0 else 1.0
    return -m, m


def diagonal_mean(c2) -> np.ndarray:
    """Mean of ``c2 (..., N, N)`` over the pairs of each lag: the one-time projection.

    Returns shape ``(..., N - 1)``: element ``k - 1`` is ``mean_i c2[..., i, i + k]`` over
    the pairs ``t_i < t_j`` with lag ``k`` frames (``k = 1 .. N - 1``) whose value is
    finite; NaN where a lag has no finite pair. With constant rates this is the
    one-time ``g2(tau = k dt)`` (MODEL.md, "The one-time limit").
    """
    c2 = np.asarray(c2, dtype=np.float64)
    n = c2.shape[-1]
    i, j = np.triu_indices(n, 1)
    values = c2[..., i, j].reshape(-1, i.size)
    # One bin per (leading index, lag): bincount sums all of them in one pass.
    bins = np.arange(values.shape[0])[:, None] * (n - 1) + (j - i - 1)[None, :]
    finite = np.isfinite(values)
    size = values.shape[0] * (n - 1)
    sums = np.bincount(bins[finite], weights=values[finite], minlength=size)
    counts = np.bincount(bins[finite], minlength=size)
    with np.errstate(invalid="ignore"):
        mean = sums / counts
    return mean.reshape(c2.shape[:-2] + (n - 1,))


def age_frames(t, ages=None, *, n_ages: int = N_AGES) -> np.ndarray:
    """Frame indices of the ages ``t1`` of the one-time cuts.

    ``ages`` are times [s], each matched to the nearest frame that has at least one
    later frame; ``None`` spreads ``n_ages`` over the first three quarters of the run
    (a cut at age ``t1`` has only the lags up to the end of the run).
    """
    t = np.asarray(t, dtype=np.float64)
    n = t.size
    if ages is None:
        return np.unique(np.round(np.linspace(0, 0.75 * (n - 1), n_ages)).astype(int))
    ages = np.atleast_1d(np.asarray(ages, dtype=np.float64))
    outside = ages[(ages < t[0]) | (ages > t[-2])]
    if outside.size:
        raise OptionError(
            f"ages {outside.tolist()} s are outside the run: an age t1 must lie in "
            f"[{t[0]:g}, {t[-2]:g}] s so that the cut has a lag"
        )
    return np.unique(np.argmin(np.abs(t[None, :] - ages[:, None]), axis=1))


def c2(ds: xr.Dataset, *, cmap: str = "viridis") -> hv.Layout:
    """One ``c2(t1, t2)`` heatmap per angle on one shared colour scale.

    Parameters
    ----------
    ds : xarray.Dataset
        Canonical two-time Dataset.
    cmap : str
        Colour map of ``c2``.

    Returns
    -------
    holoviews.Layout
        One ``hv.Image`` per angle (kdims ``t1``, ``t2``; vdim ``c2``), titled with ``phi``
        and ``q``; the diagonal is NaN and the colour range is the 1st-99th percentile of
        the off-diagonal values of all angles.

    Examples
    --------
    >>> hd.plot.c2(hd.simulate({"v0": 500.0}, phi=[0, 90]))  # doctest: +SKIP
    """
    validate(ds)
    matrices = offdiagonal(ds["c2"].values)
    clim = robust_range(matrices)
    t = ds["t1"].values
    panels = [
        _heatmap(m, t, _time_dims(ds), _value_dim(ds["c2"], "c2"), clim, cmap, _title(ds, k))
        for k, m in enumerate(matrices)
    ]
    return _layout(panels, min(len(panels), COLUMNS))


def cuts(ds: xr.Dataset, result=None, ages=None, *, n_ages: int = N_AGES) -> hv.Layout:
    """One-time view: ``c2(t1, t1 + tau)`` against the lag ``tau`` at a few ages ``t1``.

    Parameters
    ----------
    ds : xarray.Dataset
        Canonical two-time Dataset; drawn as points.
    result : NLSQResult, optional
        A fit of ``ds``; its model ``result.model["c2"]`` is drawn as lines.
    ages : sequence of float, optional
        Ages ``t1`` [s]; each is matched to the nearest frame. Default: ``n_ages`` spread
        over the first three quarters of the run.
    n_ages : int
        Number of default ages.

    Returns
    -------
    holoviews.Layout
        One ``hv.Overlay`` per angle of ``hv.Scatter`` (data) and ``hv.Curve`` (model),
        kdim ``tau`` [s], vdim ``c2``, one colour per age, log lag axis.
    """
    validate(ds)
    t = ds["t1"].values
    frames = age_frames(t, ages, n_ages=n_ages)
    data = offdiagonal(ds["c2"].values)
    fitted = None if result is None else _model_on(result, ds)
    tau_dim = hv.Dimension("tau", label="τ", unit=ds["t1"].attrs.get("units", "s"))
    c2_dim = _value_dim(ds["c2"], "c2")
    panels = []
    for k in range(ds.sizes["phi"]):
        layers = []
        for n, i in enumerate(frames):
            tau = t[i + 1 :] - t[i]
            label = f"t1 = {t[i]:.3g} s"
            color = PALETTE[n % len(PALETTE)]
            layers.append(
                hv.Scatter((tau, data[k, i, i + 1 :]), tau_dim, c2_dim, label=label).opts(
                    color=color, size=4, alpha=0.7, tools=["hover"], backend="bokeh"
                )
            )
            if fitted is not None:
                layers.append(
                    hv.Curve((tau, fitted[k, i, i + 1 :]), tau_dim, c2_dim, label=label).opts(
                        color=color, line_width=2, backend="bokeh"
                    )
                )
        panels.append(_line_panel(layers, _title(ds, k), logx=True))
    return _layout(panels, min(len(panels), COLUMNS))


def fit(result) -> hv.Layout:
    """Data | model | residual heatmaps and the one-time projection, one row per angle.

    Parameters
    ----------
    result : NLSQResult
        A fit: ``result.data``, ``result.model["c2"]`` and ``result.residuals``.

    Returns
    -------
    holoviews.Layout
        Four panels per angle, two to a row: data and model ``hv.Image`` on one colour scale (vdim
        ``c2``), the weighted residual on a diverging scale symmetric about 0 (vdim
        ``residual``), and an ``hv.Overlay`` of the diagonal means (:func:`diagonal_mean`)
        of data (``hv.Scatter``) and model (``hv.Curve``) against ``tau``.

    Notes
    -----
    The model is averaged over the same pairs as the data (pairs where the data are NaN
    are left out of both), so the two projections compare like with like.
    """
    ds = result.data
    t = ds["t1"].values
    data = offdiagonal(ds["c2"].values)
    fitted = np.where(np.isfinite(data), _model_on(result, ds), np.nan)
    residual = offdiagonal(result.residuals.transpose("phi", "t1", "t2").values)
    clim, rlim = robust_range(data), symmetric_range(residual)
    dims = _time_dims(ds)
    c2_dim = _value_dim(ds["c2"], "c2")
    residual_dim = hv.Dimension("residual", label="weighted residual")
    tau_dim = hv.Dimension("tau", label="τ", unit=ds["t1"].attrs.get("units", "s"))
    tau = t[1:] - t[0]
    g2_data, g2_model = diagonal_mean(data), diagonal_mean(fitted)
    panels = []
    for k in range(ds.sizes["phi"]):
        title = _title(ds, k)
        panels += [
            _heatmap(data[k], t, dims, c2_dim, clim, "viridis", f"data, {title}"),
            _heatmap(fitted[k], t, dims, c2_dim, clim, "viridis", f"model, {title}"),
            _heatmap(residual[k], t, dims, residual_dim, rlim, "RdBu_r", f"residual, {title}"),
            _line_panel(
                [
                    hv.Scatter((tau, g2_data[k]), tau_dim, c2_dim, label="data").opts(
                        color=PALETTE[0], size=4, tools=["hover"], backend="bokeh"
                    ),
                    hv.Curve((tau, g2_model[k]), tau_dim, c2_dim, label="model").opts(
                        color=PALETTE[1], line_width=2, backend="bokeh"
                    ),
                ],
                f"diagonal mean, {title}",
                logx=True,
            ),
        ]
    return _layout(panels, COLUMNS)


def params(results, x: str = "q") -> hv.Layout:
    """Fitted parameters with error bars across a survey (one panel per parameter).

    Parameters
    ----------
    results : xarray.Dataset, (Dataset, Dataset) or list of NLSQResult
        A Dataset with one variable per parameter and a ``<name>_stderr`` variable for
        each; or a pair ``(params, stderr)`` of Datasets with the same variables; or fit
        results, whose ``.params`` and ``.stderr`` are stacked along a new dimension
        ``x`` at each result's coordinate ``x`` (e.g. its ``q``).
    x : str
        The survey coordinate on the horizontal axis (``q``, ``phi``, ``file`` or any
        coordinate of the Dataset); a coordinate that is not a dimension is drawn over
        the one dimension it lies along.

    Returns
    -------
    holoviews.Layout
        For each parameter that varies in the survey (a finite stderr somewhere, or
        values that change along ``x``): an ``hv.Overlay`` of ``hv.Scatter`` and
        ``hv.ErrorBars`` (kdim ``x``, with its units; one bin is centred in +-10 %), vdim
        the parameter), one pair per value of any other
        dimension (e.g. ``contrast`` per ``phi``). ``D0_*`` and ``v0`` use a log axis
        when all their values are positive. Bars span ``value -+ stderr`` clipped to
        the parameter's bounds in the MODEL.md table (an undetermined parameter's bar
        would otherwise flatten the panel).
    """
    values, errors = _survey(results, x)
    if x not in values.coords:
        raise OptionError(
            f"x={x!r} is not a coordinate of the survey; its coordinates are "
            f"{sorted(map(str, values.coords))}"
        )
    if values[x].ndim != 1:
        raise OptionError(f"coordinate {x!r} has dims {values[x].dims}; expected one dimension")
    along = values[x].dims[0]
    xs = values[x].values
    x_dim = hv.Dimension(x, unit=values[x].attrs.get("units") or None)
    if np.issubdtype(xs.dtype, np.number) and np.unique(xs).size == 1:
        # one bin: centre it in +-10 % (bokeh would draw it at 0 of an axis -1..1)
        x_dim = x_dim.clone(range=tuple(sorted((0.9 * xs[0], 1.1 * xs[0]))) if xs[0] else (-1, 1))
    names = [n for n in PHYSICS_NAMES + SCALING_NAMES if n in values.data_vars]
    names += [n for n in values.data_vars if n not in names]
    panels = []
    for name in names:
        value = values[name]
        error = errors[name] if name in errors.data_vars else xr.full_like(value, np.nan)
        if along not in value.dims:
            continue
        varies = np.isfinite(error.values).any() or np.ptp(value.values) > 0
        if not varies:
            continue
        unit = value.attrs.get("units") or UNITS.get(name) or None
        y_dim = hv.Dimension(name, unit=unit)
        positive = bool(np.all(value.values[np.isfinite(value.values)] > 0))
        log = name in LOG_PARAMETERS and positive
        others = [d for d in value.dims if d != along]
        stacked = value.transpose(along, *others).values.reshape(value.sizes[along], -1)
        spread = error.transpose(along, *others).values.reshape(value.sizes[along], -1)
        labels = _series_labels(value, others)
        spec = SPECS.get(name)
        layers = []
        for s in range(stacked.shape[1]):
            ys, es = stacked[:, s], np.nan_to_num(spread[:, s])
            # A value cannot leave its bounds: a bar beyond them (an undetermined
            # parameter) would only stretch the axis. On a log axis stop short of 0.
            low, high = ys - es, ys + es
            if spec is not None:
                low, high = np.maximum(low, spec.min), np.minimum(high, spec.max)
            if log:
                low = np.maximum(low, 1e-3 * ys)
            color = PALETTE[s % len(PALETTE)]
            layers += [
                hv.ErrorBars((xs, ys, ys - low, high - ys), x_dim, [y_dim, "low", "high"]).opts(
                    color=color, backend="bokeh"
                ),
                hv.Scatter((xs, ys), x_dim, y_dim, label=labels[s]).opts(
                    color=color, size=6, tools=["hover"], backend="bokeh"
                ),
            ]
        panels.append(_line_panel(layers, name, logy=log))
    if not panels:
        raise OptionError(f"no parameter varies along {along!r}: nothing to plot")
    return _layout(panels, min(len(panels), COLUMNS))


def age(scan: xr.Dataset, *, n_curve: int = 200) -> hv.Layout:
    """An age scan (:func:`heterodyne.age_scan`): each effective quantity against age.

    Panels: the transport rates ``J_r`` and ``J_s`` (log axis when positive), the velocity
    ``v`` and the fraction ``x_s``. In each, the windows' values with their error bars
    (points; a window whose fit failed is a cross), the law as the window fit reads it
    (open circles, what :func:`heterodyne.ageing.law_check` compares with) and the law
    itself (``D0 t^alpha + D_offset``, ``v0 t^beta + v_offset``, the fraction law), a
    line over ``n_curve`` times. The title of each panel gives its verdict.

    Returns
    -------
    holoviews.Layout
        Three ``hv.Overlay`` panels, kdim ``age`` [s].
    """
    from heterodyne.ageing import QUANTITIES, law_check, law_curves

    if not isinstance(scan, xr.Dataset) or "age" not in scan.dims:
        raise OptionError(f"expected the Dataset of hd.age_scan; got {type(scan).__name__}")
    ages = scan["age"].values
    times = np.linspace(scan["t_first"].values.min(), scan["t_last"].values.max(), n_curve)
    curves = law_curves(scan, times)
    status = dict(zip(*law_check(scan)[["quantity", "status"]].values.T, strict=True))
    failed = scan["verdict"].values == "fail"
    age_dim = hv.Dimension("age", label="age t_a", unit="s")
    groups = (  # title, the vertical axis (name, label, unit), the quantities drawn
        ("transport rates", ("rate", "J", "Å²/s"), ("rate_ref", "rate_sample")),
        ("velocity", ("velocity", "v", "Å/s"), ("velocity",)),
        ("fraction", ("fraction", "x_s", None), ("fraction",)),
    )
    panels = []
    for title, (dim, label, unit), names in groups:
        y_dim = hv.Dimension(dim, label=label, unit=unit)
        layers, verdicts = [], []
        log = all(bool(np.all(scan[n].values > 0)) for n in names) and len(names) > 1
        for k, name in enumerate(names):
            color = PALETTE[k % len(PALETTE)]
            symbol = QUANTITIES[name][3]
            ys = scan[name].values
            es = np.nan_to_num(scan[f"{name}_stderr"].values)
            low = np.maximum(ys - es, 1e-3 * ys) if log else ys - es
            layers += [
                hv.Curve((times, curves[name]), age_dim, y_dim, label=f"{symbol} law").opts(
                    color=color, line_width=1.5, alpha=0.6, backend="bokeh"
                ),
                hv.Scatter(
                    (ages, scan[f"{name}_law"].values),
                    age_dim,
                    y_dim,
                    label=f"{symbol} law, read by a window",
                ).opts(color=color, marker="circle", fill_alpha=0, size=9, backend="bokeh"),
                hv.ErrorBars((ages, ys, ys - low, es), age_dim, [y_dim, "low", "high"]).opts(
                    color=color, backend="bokeh"
                ),
                hv.Scatter((ages[~failed], ys[~failed]), age_dim, y_dim, label=symbol).opts(
                    color=color, size=6, tools=["hover"], backend="bokeh"
                ),
            ]
            if failed.any():
                layers.append(
                    hv.Scatter(
                        (ages[failed], ys[failed]), age_dim, y_dim, label=f"{symbol}, fit failed"
                    ).opts(color=color, marker="x", size=9, backend="bokeh")
                )
            if name in status:
                verdicts.append(f"{symbol} {status[name]}")
        full = f"{title}: {'; '.join(verdicts)}" if verdicts else title
        panels.append(_line_panel(layers, full, logy=log, legend_position="top_left"))
    return _layout(panels, COLUMNS)


def posterior(result) -> hv.Layout:
    """A consensus Monte Carlo posterior at a glance.

    Parameters
    ----------
    result : CMCResult

    Returns
    -------
    holoviews.Layout
        For each varied physics parameter, the marginal of the combined draws
        (``hv.Histogram``, density) over which each shard's marginal is drawn as a line;
        scatter plots of the ``N_PAIRS`` most correlated parameter pairs; the traces per
        parameter, one colour per chain (chains that disagree are what R-hat measures),
        shards one after the other; and the diagnostics as a table coloured pass (green)
        / fail (red) by shard and figure. Two panels to a row.
    """
    combined = result.posterior.posterior
    shards = result.posterior.shard_posterior
    names = [n for n in PHYSICS_NAMES if n in combined.data_vars]
    panels = []
    for name in names:
        dim = hv.Dimension(name, unit=UNITS[name] or None)
        draws = combined[name].values.ravel()
        edges = np.histogram_bin_edges(draws, bins=HISTOGRAM_BINS)
        layers = [
            hv.Histogram(
                np.histogram(draws, edges, density=True),
                kdims=[dim],
                vdims=["density"],
                label="combined",
            ).opts(alpha=0.4, color="gray", backend="bokeh")
        ]
        for k, s in enumerate(shards["shard"].values):
            shard_draws = shards[name].sel(shard=s).values.ravel()
            density, shard_edges = np.histogram(shard_draws, bins=HISTOGRAM_BINS, density=True)
            centres = 0.5 * (shard_edges[1:] + shard_edges[:-1])
            layers.append(
                hv.Curve((centres, density), dim, "density", label=f"shard {s}").opts(
                    color=PALETTE[k % len(PALETTE)], backend="bokeh"
                )
            )
        panels.append(
            _line_panel(layers, f"{name}: marginal", legend_position="top_right", xticks=TICKS)
        )
    flat = np.array([combined[n].values.ravel() for n in names])
    if len(names) > 1:
        corr = np.corrcoef(flat)
        pairs = sorted(
            ((abs(corr[a, b]), a, b) for a in range(len(names)) for b in range(a + 1, len(names))),
            reverse=True,
        )[:N_PAIRS]
        for _, a, b in pairs:
            panels.append(
                _line_panel(
                    [
                        hv.Scatter((flat[a], flat[b]), names[a], names[b]).opts(
                            size=2, alpha=0.3, backend="bokeh"
                        )
                    ],
                    f"{names[a]} vs {names[b]} (ρ = {corr[a, b]:+.2f})",
                    xticks=TICKS,
                )
            )
    draw = hv.Dimension("draw", label="draw (shards in turn)")
    for name in names:
        by_chain = shards[name].transpose("shard", "chain", "draw")
        n_draws = by_chain.sizes["draw"]
        traces = [
            hv.Curve(
                (k * n_draws + np.arange(n_draws), by_chain.values[k, c]),
                draw,
                name,
                label=f"chain {c}",
            ).opts(color=PALETTE[c % len(PALETTE)], line_width=0.7, backend="bokeh")
            for k in range(by_chain.sizes["shard"])
            for c in range(by_chain.sizes["chain"])
        ]
        panels.append(_line_panel(traces, f"{name}: trace by chain", legend_position="top_right"))
    panels.append(_diagnostics_table(result))
    return _layout(panels, cols=COLUMNS)


def _diagnostics_table(result) -> hv.Overlay:
    """The CMC verdict table (:func:`heterodyne.diagnostics.verdict`) as a heat map:
    pass/fail of each shard's worst R-hat, ESS bulk/tail, BFMI and divergences."""
    table = diagnostics.verdict(result.diagnostics)
    cells = [
        (column, f"shard {row['shard']}", int(row[f"{column} ok"]), f"{row[column]:.4g}")
        for _, row in table.iterrows()
        for column, _, _ in diagnostics.VERDICT_FIGURES
    ]
    kdims, vdims = ["figure", "shard"], ["pass", "value"]
    table = hv.HeatMap(cells, kdims, vdims).opts(
        cmap=["#d62728", "#2ca02c"],
        clim=(0, 1),
        colorbar=False,
        xrotation=30,
        tools=["hover"],
        frame_width=PANEL_SIZE[0] + 100,
        frame_height=PANEL_SIZE[1],
        title=f"diagnostics: {'converged' if result.converged else 'NOT converged'}",
        backend="bokeh",
    )
    labels = hv.Labels([(c[0], c[1], c[3]) for c in cells], kdims, "value").opts(
        text_color="white", text_font_size="9pt", backend="bokeh"
    )
    return table * labels


def save(obj, path, *, overwrite: bool = False, title: str | None = None):
    """Write a HoloViews object to a standalone HTML file, atomically.

    BokehJS is embedded in the file (no CDN), so it opens without internet.

    Parameters
    ----------
    obj : HoloViews object
        E.g. the return value of :func:`c2` or :func:`fit`.
    path : str or Path
        The HTML file.
    overwrite : bool
        Replace an existing file.
    title : str, optional
        Title of the HTML page; default: the file name.

    Returns
    -------
    pathlib.Path
    """
    page_title = title if title is not None else Path(path).name

    def write(tmp):
        buffer = io.StringIO()
        hv.save(obj, buffer, fmt="html", backend="bokeh", resources=INLINE, title=page_title)
        tmp.write_text(buffer.getvalue(), encoding="utf-8")

    return atomic_write(write, path, overwrite=overwrite)


def _heatmap(matrix, t, dims, vdim, clim, cmap, title) -> hv.Image:
    # hv.Image wants z[y, x]; x is t1 (first index of the matrix), y is t2.
    return hv.Image((t, t, np.asarray(matrix).T), kdims=dims, vdims=[vdim]).opts(
        cmap=cmap,
        clim=clim,
        colorbar=True,
        tools=["hover"],
        title=title,
        frame_width=HEATMAP_SIZE,
        frame_height=HEATMAP_SIZE,
        backend="bokeh",
    )


def _line_panel(layers, title, **opts) -> hv.Overlay:
    width, height = PANEL_SIZE
    return hv.Overlay(layers).opts(
        title=title, frame_width=width, frame_height=height, backend="bokeh", **opts
    )


def _layout(panels, cols: int) -> hv.Layout:
    # Panels of one figure have different axes (lag, time, parameters): link none of them.
    return hv.Layout(panels).opts(shared_axes=False, backend="bokeh").cols(cols)


def _time_dims(ds) -> list[hv.Dimension]:
    # Axis labels state the convention: a frame's time is the end of its exposure.
    units = {name: ds[name].attrs.get("units", "s") for name in ("t1", "t2")}
    return [hv.Dimension(n, label=f"{n} (frame end)", unit=u) for n, u in units.items()]


def _value_dim(da: xr.DataArray, name: str) -> hv.Dimension:
    return hv.Dimension(name, unit=da.attrs.get("units") or None)


def _title(ds, k: int) -> str:
    phi_unit = ds["phi"].attrs.get("units", "deg")
    q_unit = ds["q"].attrs.get("units", "1/Å")
    return f"φ = {float(ds['phi'].values[k]):g} {phi_unit}, q = {float(ds['q']):.4g} {q_unit}"


def _model_on(result, ds) -> np.ndarray:
    """The model ``c2`` of ``result`` on the grid of ``ds``, diagonal NaN."""
    model = result.model["c2"].transpose("phi", "t1", "t2")
    if model.shape != ds["c2"].shape:
        raise OptionError(
            f"the result's model has shape {model.shape} but the data {ds['c2'].shape}; "
            "pass the Dataset that was fitted"
        )
    return offdiagonal(model.values)


def _series_labels(value: xr.DataArray, others: Sequence[str]) -> list[str]:
    if not others:
        return [""]  # one series: the panel title names it, no legend
    grid = np.stack(
        np.meshgrid(*(value[d].values for d in others), indexing="ij"), axis=-1
    ).reshape(-1, len(others))
    return [", ".join(f"{d} = {v:g}" for d, v in zip(others, row, strict=True)) for row in grid]


def _survey(results, x: str) -> tuple[xr.Dataset, xr.Dataset]:
    """``(values, errors)`` Datasets with the same variables, from any accepted input."""
    if isinstance(results, xr.Dataset):
        names = [n for n in results.data_vars if f"{n}_stderr" in results.data_vars]
        errors = xr.Dataset({n: results[f"{n}_stderr"] for n in names})
        return results[names], errors
    if isinstance(results, tuple) and len(results) == 2:
        values, errors = results
        if isinstance(values, xr.Dataset) and isinstance(errors, xr.Dataset):
            return values, errors
    if isinstance(results, Sequence) and results and all(hasattr(r, "params") for r in results):
        missing = [k for k, r in enumerate(results) if x not in r.params.coords]
        if missing:
            raise OptionError(
                f"results {missing} have no coordinate {x!r} to place them along; their "
                f"coordinates are {sorted(map(str, results[missing[0]].params.coords))}"
            )
        if any(np.size(r.params[x].values) != 1 for r in results):
            raise OptionError(f"each result must have one value of {x!r} to stack along it")
        coord = xr.DataArray(
            [float(r.params[x].values) for r in results],
            dims=x,
            attrs=results[0].params[x].attrs,
        )

        def stack(datasets):
            dropped = [d.drop_vars(x) if x not in d.dims else d for d in datasets]
            return xr.concat(dropped, dim=x, data_vars="all").assign_coords({x: coord})

        return stack([r.params for r in results]), stack([r.stderr for r in results])
    raise OptionError(
        "results must be an xarray.Dataset with <name>_stderr variables, a pair "
        f"(params, stderr) of Datasets or a list of fit results; got {type(results).__name__}"
    )


def joint(result) -> hv.Layout:
    """The per-q consistency check of a joint fit (:class:`~heterodyne.joint_result.JointResult`).

    One panel per varied physics parameter: each q-bin's own fit (points, ``-+ stderr``)
    against ``q``, over the joint value (line) and its ``-+ stderr`` band; then the decay
    rates ``q² J(t_mid)`` against ``q²`` and the phase rate ``q v(t_mid)`` against ``q``
    (:attr:`~heterodyne.joint_result.JointResult.rates`): each bin's own (points) and the
    joint law (line), straight lines through the origin where the model holds.
    """
    check = result.consistency
    rates = result.rates
    q = check["q"].values
    q_dim = hv.Dimension("q", unit="1/Å")
    panels = []
    for name in check["name"].values:
        row = check.sel(name=name)
        y_dim = hv.Dimension(str(name), unit=UNITS.get(str(name)) or None)
        value, error = row["value"].values, np.nan_to_num(row["stderr"].values)
        joint, spread = float(row["joint"]), float(np.nan_to_num(row["joint_stderr"]))
        panels.append(
            _line_panel(
                [
                    hv.HSpan(joint - spread, joint + spread).opts(color="#999999", alpha=0.3),
                    hv.HLine(joint, label="joint").opts(color="black"),
                    hv.ErrorBars((q, value, error), q_dim, [y_dim, "error"]),
                    hv.Scatter((q, value), q_dim, y_dim, label="bin alone").opts(
                        color=PALETTE[0], size=6, tools=["hover"]
                    ),
                ],
                str(name),
            )
        )
    for name, x, x_dim in (
        ("decay_ref", q**2, hv.Dimension("q²", unit="1/Å²")),
        ("decay_sample", q**2, hv.Dimension("q²", unit="1/Å²")),
        ("phase", q, q_dim),
    ):
        y_dim = hv.Dimension(name, unit=rates[name].attrs["units"])
        own, error = rates[name].values, np.nan_to_num(rates[f"{name}_stderr"].values)
        law = rates[f"{name}_joint"].values
        order = np.argsort(x)
        panels.append(
            _line_panel(
                [
                    hv.Curve(
                        (np.r_[0.0, x[order]], np.r_[0.0, law[order]]),
                        x_dim,
                        y_dim,
                        label="joint law",
                    ).opts(color="black"),
                    hv.ErrorBars((x, own, error), x_dim, [y_dim, "error"]),
                    hv.Scatter((x, own), x_dim, y_dim, label="bin alone").opts(
                        color=PALETTE[0], size=6, tools=["hover"]
                    ),
                ],
                f"{name} at t = {rates.attrs['t_mid']:.3g} s",
            )
        )
    return _layout(panels, COLUMNS)
