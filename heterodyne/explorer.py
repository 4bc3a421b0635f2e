"""The model explorer: one slider per parameter, the model ``c2`` redrawn as you drag.

``hd.explore()`` returns an ipywidgets box: sliders on top, HoloViews/bokeh views below
(the model heatmap and the one-time cuts, next to the data when a Dataset is given). The
views are drawn by HoloViews once; a redraw evaluates the jitted
:func:`heterodyne.model.c2_grid` at one angle and writes the new arrays straight into
the data sources of those bokeh figures, so only data travel to the browser and no plot
is rebuilt (HoloViews' update path of streams and DynamicMaps costs far more than the
model).
"""

from __future__ import annotations

from typing import NamedTuple

import holoviews as hv
import ipywidgets as widgets
import numpy as np
import panel as pn
import xarray as xr
from bokeh.models import ColorMapper, ColumnDataSource
from IPython.display import display

from heterodyne import model
from heterodyne.data import validate
from heterodyne.parameters import (
    LOG_DECADES,
    LOG_SCALE,
    PHYSICS,
    PHYSICS_NAMES,
    SCALING,
    Parameters,
)
from heterodyne.plot import (
    HEATMAP_SIZE,
    PALETTE,
    PANEL_SIZE,
    age_frames,
    offdiagonal,
    robust_range,
)
from heterodyne.starts import estimate_scaling

# The time grid and q without data: those of hd.simulate's defaults.
DEFAULT_FRAMES = 200
DEFAULT_DT = 0.1
DEFAULT_Q = 0.01
SLIDER_STEPS = 1000  # a linear slider moves in about (max - min) / SLIDER_STEPS
LABEL_WIDTH = "120px"  # the longest name, D_offset_sample, in full
LOG_STEP = 0.01  # a log slider moves in decades / 100


def model_frame(physics, contrast, offset, t, phi, q) -> np.ndarray:
    """The model ``c2 (N, N)`` at one angle, diagonal NaN: what the explorer draws.

    Parameters
    ----------
    physics : array, shape (14,)
        Physics parameters in canonical order.
    contrast, offset : float
        Scaling of this angle.
    t : array, shape (N,)
        Frame times [s].
    phi : float
        Detector azimuth [deg].
    q : float
        Wavevector [1/Å].
    """
    grid = model.c2_grid(
        np.asarray(physics, dtype=np.float64),
        float(contrast),
        float(offset),
        np.asarray(t, dtype=np.float64),
        np.array([float(phi)]),
        float(q),
    )
    return offdiagonal(grid[0])


class Explorer(widgets.VBox):
    """Parameter sliders and live views of the model; build it with :func:`explore`.

    Attributes
    ----------
    sliders : dict
        ``name -> slider`` for the 14 physics parameters and ``contrast``, ``offset``.
    zero : dict
        ``name -> Checkbox`` that sets a log-scale parameter (``D0_*``, ``v0``) to 0.
    angle, q : ipywidgets widgets
        The angle (a list of the data's angles, else a slider in degrees) and ``q`` [1/Å].
    view : holoviews.Layout
        The views as first drawn: data heatmap (with data), model heatmap, one-time cuts.
    figure : bokeh model
        Those views as shown, updated in place by :meth:`redraw`.
    model_c2 : numpy.ndarray
        The model ``c2 (N, N)`` drawn last.
    """

    def __init__(self, ds: xr.Dataset | None = None, params=None):
        p = Parameters.coerce(params)
        self.data = None if ds is None else validate(ds)
        if ds is None:
            self.t = DEFAULT_DT * np.arange(1, DEFAULT_FRAMES + 1)
            n_angles, q = 1, DEFAULT_Q
        else:
            self.t = ds["t1"].values.astype(np.float64)
            n_angles, q = ds.sizes["phi"], float(ds["q"])
        p.validate(n_angles)
        # contrast and offset are kept per angle; the two sliders show the current angle's.
        estimate = None if ds is None else estimate_scaling(ds, p.physics_values())
        self._scaling = {
            s.name: _per_angle(p[s.name].value, estimate, s.name, s.default, n_angles)
            for s in SCALING
        }
        self.sliders, self.zero = {}, {}
        rows = []
        for spec in PHYSICS + SCALING:
            value = p[spec.name].value if spec in PHYSICS else self._scaling[spec.name][0]
            rows.append(self._control(spec, float(value)))
        style = {"style": {"description_width": LABEL_WIDTH}}
        if ds is None:
            self.angle = widgets.FloatSlider(
                value=0.0, min=-180.0, max=180.0, step=1.0, description="phi [deg]", **style
            )
        else:
            self.angle = widgets.Dropdown(
                options=[(f"{v:g}", k) for k, v in enumerate(ds["phi"].values)],
                value=0,
                description="phi [deg]",
                **style,
            )
        self.q = widgets.FloatLogSlider(
            value=q,
            base=10,
            min=np.log10(q) - 1,
            max=np.log10(q) + 1,
            step=LOG_STEP,
            readout_format=".4g",
            description="q [1/Å]",
            **style,
        )
        self.frames = age_frames(self.t)
        self._holding = False
        self.model_c2 = self._compute()
        self._build_views()
        self.output = widgets.Output()
        with self.output:
            display(pn.pane.Bokeh(self.figure))
        for name, slider in self.sliders.items():
            slider.observe(self._on_scaling if name in self._scaling else self._on_change, "value")
        for box in self.zero.values():
            box.observe(self._on_change, "value")
        self.q.observe(self._on_change, "value")
        self.angle.observe(self._on_angle, "value")
        controls = widgets.GridBox(
            rows, layout=widgets.Layout(grid_template_columns="repeat(auto-fill, 350px)")
        )
        super().__init__([widgets.HBox([self.angle, self.q]), controls, self.output])

    @property
    def phi(self) -> float:
        """The angle shown [deg]."""
        if self.data is None:
            return float(self.angle.value)
        return float(self.data["phi"].values[self.angle.value])

    @property
    def _index(self) -> int:
        return 0 if self.data is None else int(self.angle.value)

    def physics(self) -> np.ndarray:
        """The 14 physics values of the sliders, in canonical order."""
        return np.array(
            [
                0.0 if name in self.zero and self.zero[name].value else self.sliders[name].value
                for name in PHYSICS_NAMES
            ],
            dtype=np.float64,
        )

    def redraw(self) -> np.ndarray:
        """Evaluate the model at the sliders' values and push it into the views."""
        self.model_c2 = self._compute()
        self._show(self._model_image, self._model_cuts, self.model_c2)
        if self.data is None:  # the colour scale follows the model
            self._model_image.colors.update(
                low=np.nanmin(self.model_c2), high=np.nanmax(self.model_c2)
            )
        self._fit_cuts_axis()
        return self.model_c2

    def _show(self, image, cuts, matrix):
        """Write ``matrix`` into an image's data source and its cuts' sources."""
        image.source.data = {**image.source.data, "image": [matrix.T]}
        for source, i in zip(cuts, self.frames, strict=True):
            source.data = {"tau": self.t[i + 1 :] - self.t[i], "c2": matrix[i, i + 1 :]}

    def _fit_cuts_axis(self):
        """The cuts' vertical axis spans what they show, 5 % either side."""
        shown = [self.model_c2] if self.data is None else [self.model_c2, self._data_c2]
        rows = np.concatenate([m[i, i + 1 :] for m in shown for i in self.frames])
        low, high = np.nanmin(rows), np.nanmax(rows)
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        self._cuts_range.update(start=low - pad, end=high + pad)

    def _compute(self) -> np.ndarray:
        k = self._index
        return model_frame(
            self.physics(),
            self._scaling["contrast"][k],
            self._scaling["offset"][k],
            self.t,
            self.phi,
            self.q.value,
        )

    def _control(self, spec, value) -> widgets.Widget:
        common = {
            "description": spec.name,
            "continuous_update": True,
            "readout_format": ".4g",
            "tooltip": f"{spec.meaning} [{spec.unit or '-'}]",
            "style": {"description_width": LABEL_WIDTH},
            "layout": widgets.Layout(width="340px" if spec.name not in LOG_SCALE else "290px"),
        }
        if spec.name in LOG_SCALE:
            top = np.log10(spec.max)
            bottom = np.log10(spec.min) if spec.min > 0 else top - LOG_DECADES
            slider = widgets.FloatLogSlider(
                value=max(value, 10**bottom), base=10, min=bottom, max=top, step=LOG_STEP, **common
            )
            self.sliders[spec.name] = slider
            if spec.min <= 0:
                # A log slider cannot reach 0, which is a common value (a static reference).
                self.zero[spec.name] = widgets.Checkbox(
                    value=value == 0.0,
                    description="0",
                    indent=False,
                    layout=widgets.Layout(width="50px"),
                )
                return widgets.HBox([slider, self.zero[spec.name]])
            return slider
        low, high = spec.min, spec.max
        if spec.name == "f2":
            # f2 enters only through f0 exp(-f1 f2) (MODEL.md), so a window around the run
            # explores it; the table's +-1e4 s would leave the slider no resolution.
            span = self.t[-1] - self.t[0]
            low, high = max(low, self.t[0] - span), min(high, self.t[-1] + span)
        step = nice_step((high - low) / SLIDER_STEPS)
        # bounds on the step's grid, so that 0 (and every round value) is a position
        low, high = np.floor(low / step) * step, np.ceil(high / step) * step
        slider = widgets.FloatSlider(
            value=min(max(value, low), high), min=low, max=high, step=step, **common
        )
        self.sliders[spec.name] = slider
        return slider

    def _build_views(self):
        # Drawn once by HoloViews; a redraw writes into the drawn figures' data sources.
        t = self.t
        dims = [hv.Dimension("t1", unit="s"), hv.Dimension("t2", unit="s")]
        tau_dim = hv.Dimension("tau", label="τ", unit="s")
        labels = [f"t1 = {t[i]:.3g} s" for i in self.frames]
        colors = hv.Cycle(list(PALETTE[: len(self.frames)]))
        image_opts = {
            "cmap": "viridis",
            "colorbar": True,
            "tools": ["hover"],
            "frame_width": HEATMAP_SIZE,
            "frame_height": HEATMAP_SIZE,
        }
        width, height = PANEL_SIZE
        cuts_opts = {
            "Curve": {"color": colors, "line_width": 2},
            "Scatter": {"color": colors, "size": 4, "alpha": 0.6},
            "Overlay": {
                "title": "cuts at ages t1",
                "logx": True,
                "frame_width": width,
                "frame_height": height,
            },
        }

        def image(data):
            return hv.Image((t, t, data.T), kdims=dims, vdims=["c2"])

        def cuts(element):
            def draw(data):
                return hv.Overlay(
                    [
                        element((t[i + 1 :] - t[i], data[i, i + 1 :]), tau_dim, "c2", label=label)
                        for i, label in zip(self.frames, labels, strict=True)
                    ]
                )

            return draw

        model_image = image(self.model_c2)
        model_cuts = cuts(hv.Curve)(self.model_c2)
        if self.data is None:
            panels = [
                model_image.opts(title="model", backend="bokeh", **image_opts),
                model_cuts.opts(cuts_opts, backend="bokeh"),
            ]
        else:
            data = offdiagonal(self.data["c2"].values)
            image_opts["clim"] = robust_range(data)
            self._data_c2 = data[self._index]
            panels = [
                image(self._data_c2).opts(title="data", backend="bokeh", **image_opts),
                model_image.opts(title="model", backend="bokeh", **image_opts),
                (cuts(hv.Scatter)(self._data_c2) * model_cuts).opts(cuts_opts, backend="bokeh"),
            ]
        self.view = hv.Layout(panels).opts(shared_axes=False, backend="bokeh").cols(3)
        drawn = hv.renderer("bokeh").get_plot(self.view)
        self.figure = drawn.state
        *images, lines = (drawn.subplots[0, k].subplots["main"] for k in range(len(panels)))
        heatmaps = [
            Heatmap(plot.handles["source"], plot.handles["color_mapper"]) for plot in images
        ]
        self._model_image = heatmaps[-1]
        by_kind = {"Curve": [], "Scatter": []}
        for (kind, _), plot in lines.subplots.items():
            by_kind[kind].append(plot.handles["source"])
        self._model_cuts = by_kind["Curve"]
        if self.data is not None:
            self._data_image, self._data_cuts = heatmaps[0], by_kind["Scatter"]
        self._cuts_range = lines.handles["y_range"]
        self._fit_cuts_axis()

    def _on_change(self, _change):
        if not self._holding:
            self.redraw()

    def _on_scaling(self, change):
        if not self._holding:
            self._scaling[change["owner"].description][self._index] = change["new"]
            self.redraw()

    def _on_angle(self, _change):
        self._holding = True
        try:
            for name, values in self._scaling.items():
                self.sliders[name].value = values[self._index]
        finally:
            self._holding = False
        if self.data is not None:
            self._data_c2 = offdiagonal(self.data["c2"].values[self._index])
            self._show(self._data_image, self._data_cuts, self._data_c2)
        self.redraw()


class Heatmap(NamedTuple):
    """The parts of a drawn heatmap that a redraw changes."""

    source: ColumnDataSource  #: its image
    colors: ColorMapper  #: its colour scale


def explore(ds: xr.Dataset | None = None, params=None) -> Explorer:
    """Explore the model interactively: sliders for every parameter, live ``c2`` views.

    Parameters
    ----------
    ds : xarray.Dataset, optional
        Data to compare with: its time grid, angles and ``q`` are used, and the data are
        drawn next to (heatmap) and under (cuts) the model. Without data: 200 frames of
        0.1 s from ``t = 0.1`` s, ``q = 0.01`` 1/Å.
    params : Parameters, dict or None
        Starting values (e.g. ``result.parameters()`` of a fit); table defaults
        otherwise. ``contrast``/``offset`` left at ``None`` are estimated from the data.

    Returns
    -------
    Explorer
        An ``ipywidgets.VBox``; display it in a notebook. ``.redraw()`` redraws,
        ``.physics()`` gives the slider values, ``.model_c2`` the drawn model.

    Notes
    -----
    Sliders span the parameter table bounds; ``D0_ref``, ``D0_sample`` and ``v0`` use log
    sliders over the 6 decades below their upper bound, with a box that sets them to 0
    (a static component, no flow). ``f2`` spans the run, widened by its length either
    side. The views are HoloViews objects: the notebook needs the bokeh extension
    loaded once, ``hv.extension("bokeh", inline=True)`` or ``pn.extension(inline=True)``.

    Examples
    --------
    >>> hd.explore(hd.simulate({"v0": 500.0}, phi=[0, 90]))  # doctest: +SKIP
    """
    return Explorer(ds, params)


def nice_step(step: float) -> float:
    """The round number (1, 2 or 5 x 10^k) nearest above ``step``."""
    decade = 10.0 ** np.floor(np.log10(step))
    return float(decade * next(m for m in (1, 2, 5, 10) if m * decade >= step * (1 - 1e-12)))


def _per_angle(value, estimate, name, default, n_angles) -> np.ndarray:
    if value is not None:
        return np.broadcast_to(np.asarray(value, dtype=np.float64), (n_angles,)).copy()
    if estimate is not None:
        return np.asarray(estimate[name], dtype=np.float64).copy()
    return np.full(n_angles, float(default))
