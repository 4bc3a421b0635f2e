"""Standalone HTML reports of a fit (the summary table, warnings and the plots) and of
a survey (its table, verdicts and the parameters against q)."""

from __future__ import annotations

import html

from heterodyne.files import atomic_write

# Outside Jupyter a table has no style of its own: its columns would run together.
_TABLE_STYLE = (
    "<style>table {border-collapse: collapse} th, td {padding: 2px 10px; text-align: right}"
    " th:first-child, td:first-child {text-align: left}</style>"
)


def write_html(result, path, *, overwrite: bool = False, title: str | None = None):
    """Write ``result`` (an ``NLSQResult`` or ``CMCResult``) as one HTML page.

    The page holds the result's HTML summary (values, errors, flags, warnings), its
    ``.plot()`` figure and, for results that carry a model, the one-time cuts of data
    and model. BokehJS is embedded, so the page opens without internet.
    """
    import holoviews as hv
    from bokeh.models import Div

    from heterodyne import plot

    page_title = title or f"heterodyne {type(result).__name__}"
    source = html.escape(str(result.data.attrs.get("source", "")))
    parts = [
        Div(
            text=f"{_TABLE_STYLE}<h1>{html.escape(page_title)}</h1><p>data: {source}</p>"
            f"{result._repr_html_()}",
            width=1100,
        ),
        hv.render(result.plot(), backend="bokeh"),
    ]
    if hasattr(result, "model"):
        parts += [
            Div(text="<h2>One-time cuts: data (points) and model (lines)</h2>"),
            hv.render(plot.cuts(result.data, result), backend="bokeh"),
        ]
    return _write_page(parts, page_title, path, overwrite)


def write_survey_html(out, path, *, overwrite: bool = False, title: str | None = None):
    """Write a survey (:func:`heterodyne.survey`) as one HTML page: a heading, the table
    of :func:`heterodyne.survey.table` (q with units, verdicts and their reasons, values
    and stderr), the count of fits that are not ``ok``, and the parameters against q.
    BokehJS is embedded, so the page opens without internet."""
    import holoviews as hv
    from bokeh.models import Div

    from heterodyne import plot
    from heterodyne.survey import table

    page_title = title or "heterodyne survey"
    rows = table(out)
    flagged = int((rows["verdict"] != "ok").sum())
    summary = (
        f"{len(rows)} fits; {flagged} not ok (see the verdict and its reasons)"
        if flagged
        else f"{len(rows)} fits, all ok"
    )
    parts = [
        Div(
            text=f"{_TABLE_STYLE}<h1>{html.escape(page_title)}</h1>"
            f"<p>{html.escape(str(out.attrs.get('file', '')))}</p><p><b>{summary}</b></p>"
            f"{rows.to_html(index=False, escape=True)}"
            "<h2>Parameters against q (bars: stderr)</h2>",
            sizing_mode="stretch_width",
        ),
        hv.render(plot.params(out, x="q"), backend="bokeh"),
    ]
    return _write_page(parts, page_title, path, overwrite)


def _write_page(parts, title: str, path, overwrite: bool):
    """Bokeh models ``parts``, one under the other, written atomically as a page."""
    from bokeh.core.validation import silenced
    from bokeh.core.validation.warnings import FIXED_SIZING_MODE
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.resources import INLINE

    # holoviews sizes figures by frame_width/frame_height and leaves width/height unset,
    # which bokeh's validator reports (W-1005) for every panel although the page lays out
    # as intended.
    with silenced(FIXED_SIZING_MODE):
        page = file_html(column(*parts), INLINE, title)
    return atomic_write(
        lambda tmp: tmp.write_text(page, encoding="utf-8"), path, overwrite=overwrite
    )
