"""The Bokeh document of one browser tab: a panel per field, refreshed from the Follower's snapshot.

Every field: its per-step statistics over steps (a scalar: its value). A field of 2 or more axes
also: a rows x steps heatmap of row norms, its shown rows in one PCA plane at the step of a slider
(coloured by a boolean constant of the run over those rows, if there is one), and the path of one
row typed by its index. Then the experiment's panels, if it has any. New steps are streamed.
"""

from __future__ import annotations

import time
from html import escape

import numpy as np
import torch
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, LinearColorMapper, Range1d, Slider, TextInput
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

from ..reader import Run
from ..stats import STATS
from .follow import Follower, Snapshot

PERIOD_MS = 1000
MAX_COLUMNS = 1000  # heatmap: at most this many steps (every k-th) across
SIZE = dict(width=440, height=240)


def document(doc, follower: Follower) -> None:
    """Build one tab's page (a Bokeh FunctionHandler's function) and keep it live."""
    header = Div(text="", sizing_mode="stretch_width")
    page = column(header, sizing_mode="stretch_width")
    doc.add_root(page)
    panels: dict[str, FieldPanel] = {}
    extras = ExtraPanels(page)

    def tick() -> None:
        snap = follower.snapshot()
        doc.title = snap.title
        header.text = (f"<h3>{escape(snap.title)}</h3>" + (f"<p style='color:#b00'>{escape(snap.error)}</p>"
                                                             if snap.error else ""))
        for name in snap.tables:
            if name not in panels:
                panels[name] = FieldPanel(name, snap.run)
                page.children.append(panels[name].layout)
            panels[name].update(snap)
        extras.update(snap.panels)

    tick()
    doc.add_periodic_callback(tick, PERIOD_MS)


def line_figure(title: str, source, series: dict[str, str], **kw):
    f = figure(title=title, x_axis_label="step", **SIZE, **kw)
    for (label, column_name), colour in zip(series.items(), Category10_10):
        f.line("step", column_name, source=source, color=colour, legend_label=label, line_width=1.5)
    f.legend.location, f.legend.label_text_font_size, f.legend.background_fill_alpha = "top_left", "8pt", 0.5
    return f


class FieldPanel:
    """One field's figures and their sources."""

    def __init__(self, name: str, run: Run):
        self.name, self.spec = name, run.fields[name]
        self.source = ColumnDataSource({key: [] for key in ("step", *STATS)})
        if not self.spec.stored_shape:
            plots = [line_figure(f"{name} (value)", self.source, {name: "mean"})]
        else:
            plots = [line_figure(f"{name}: norm, mean, max |x|", self.source,
                                 {"||x||": "norm", "mean": "mean", "max |x|": "max_abs"}),
                     line_figure(f"{name}: update ||x_t - x_(t-1)||", self.source, {"update": "update_norm"}),
                     line_figure(f"{name}: cos between successive updates", self.source, {"cos": "update_cos"},
                                 y_range=Range1d(-1.05, 1.05))]
        self.plane = PlanePanel(name, run) if len(self.spec.stored_shape) >= 2 else None
        self.layout = column(Div(text=f"<b>{escape(name)}</b> {tuple(self.spec.shape)} "
                                      f"{str(self.spec.dtype).replace('torch.', '')}, every {self.spec.every}"),
                             row(*plots), *([self.plane.layout] if self.plane else []))

    def update(self, snap: Snapshot) -> None:
        table = snap.tables[self.name]
        have = len(self.source.data["step"])
        if len(table["step"]) < have:  # the commit moved back
            self.source.data = {key: table[key] for key in self.source.data}
        elif len(table["step"]) > have:
            self.source.stream({key: table[key][have:] for key in self.source.data})
        if self.plane and self.name in snap.bases and self.name in snap.row_norms:
            self.plane.update(snap, table["step"])


class PlanePanel:
    """Heatmap of row norms, the rows in a PCA plane at a slider's step, one row's path."""

    def __init__(self, name: str, run: Run):
        self.name, self.spec = name, run.fields[name]
        self.rows = self.spec.stored_shape[0]
        self.heat_source = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        heat = figure(title=f"{name}: row norms (rows x steps)", x_axis_label="step", y_axis_label="row",
                      y_range=Range1d(0, self.rows), **SIZE)
        heat.image("image", x="x", y="y", dw="dw", dh="dh", source=self.heat_source,
                   color_mapper=LinearColorMapper(palette=Viridis256))
        self.points = ColumnDataSource({"x": [], "y": [], "group": [], "colour": []})
        self.path = ColumnDataSource({"x": [], "y": [], "step": []})
        self.plane = figure(title=f"{name}: rows in one PCA plane", x_range=Range1d(0, 1), y_range=Range1d(0, 1),
                            **SIZE)
        self.plane.scatter("x", "y", source=self.points, color="colour", legend_field="group", size=4, alpha=0.6)
        self.plane.line("x", "y", source=self.path, color="black", line_width=1.5)
        self.plane.legend.label_text_font_size = "8pt"
        self.groups = colour_groups(run, self.spec)
        self.slider = Slider(start=0, end=1, value=0, step=self.spec.every, title="step", width=SIZE["width"])
        self.slider.on_change("value_throttled", lambda attr, old, new: self.show_step(int(new)))
        self.row_input = TextInput(title=f"row of {name} to follow (index of its first axis)", width=SIZE["width"])
        self.row_input.on_change("value", lambda attr, old, new: self.show_row())
        self.note = Div(text="")
        self.snap: Snapshot | None = None
        self.stale, self.next_read = False, 0.0  # the newest step not drawn yet; when reads may resume
        self.layout = row(heat, column(self.plane, self.slider, self.row_input, self.note))

    def update(self, snap: Snapshot, steps: np.ndarray) -> None:
        old, shown = self.snap, self.snap and len(self.snap.tables[self.name]["step"])
        self.snap = snap
        if (old is not None and shown == len(steps) and old.bases[self.name] is snap.bases[self.name]
                and not self.stale):
            return
        norms = snap.row_norms[self.name]
        stride = -(-len(steps) // MAX_COLUMNS)
        # bins of about equal rows (stats.row_bin_edges), every stride-th step
        self.heat_source.data = {"image": [np.ascontiguousarray(norms[::stride].T)], "x": [int(steps[0])], "y": [0],
                                 "dw": [int(steps[-1] - steps[0]) + self.spec.every], "dh": [self.rows]}
        basis = snap.bases[self.name]
        at_end = old is None or self.slider.value >= self.slider.end or old.bases[self.name] is not basis
        self.slider.start, self.slider.end = int(steps[0]), int(max(steps[-1], steps[0] + self.spec.every))
        self.plane.title.text = (f"{self.name}: {len(basis.rows)} of {self.rows} rows in one PCA plane "
                                 f"(fitted at steps {', '.join(map(str, basis.steps))})")
        if at_end:
            self.slider.value = self.slider.end
        # following the run: a step of rows spread over the field, and a row's whole path, may each
        # decode whole blocks on the event loop: at most one tick in ten is spent on them
        self.stale = time.monotonic() < self.next_read
        if not self.stale:
            began = time.monotonic()
            if at_end:
                self.show_step(int(steps[-1]))
            if self.row_input.value.strip():
                self.show_row()
            self.next_read = time.monotonic() + 9 * (time.monotonic() - began)

    def show_step(self, step: int) -> None:
        field, basis = self.snap.run[self.name], self.snap.bases[self.name]
        i = min(max(0, (step - field.steps.start) // field.every), len(field) - 1)
        xy = basis.project(field.numpy((i, basis.rows)).reshape(len(basis.rows), -1), field.dtype)
        group, colour = self.groups
        # the fitted points' extent, grown to the points shown (a run that drifts out of it)
        x0, x1, y0, y1 = basis.extent
        pad = 0.05 * max(x1 - x0, y1 - y0)
        if np.isfinite(xy).all() and len(xy):
            x0, x1 = min(x0, xy[:, 0].min() - pad), max(x1, xy[:, 0].max() + pad)
            y0, y1 = min(y0, xy[:, 1].min() - pad), max(y1, xy[:, 1].max() + pad)
        self.plane.x_range.update(start=float(x0), end=float(x1))
        self.plane.y_range.update(start=float(y0), end=float(y1))
        self.points.data = {"x": xy[:, 0], "y": xy[:, 1], "group": group[basis.rows], "colour": colour[basis.rows]}

    def show_row(self) -> None:
        text = self.row_input.value.strip()
        field, basis = self.snap.run[self.name], self.snap.bases[self.name]
        kept = self.spec.row_indices
        try:
            wanted = int(text)
            position = wanted if kept is None else int(np.flatnonzero(kept == wanted)[0])
            if not 0 <= position < self.rows:
                raise IndexError
        except (ValueError, IndexError):
            self.path.data, self.note.text = {"x": [], "y": [], "step": []}, f"no row {escape(text)} is recorded"
            return
        xy = basis.project(field.numpy((slice(None), position)).reshape(len(field), -1), field.dtype)
        self.path.data = {"x": xy[:, 0], "y": xy[:, 1], "step": np.asarray(field.steps)}
        self.note.text = f"the black line: row {wanted} over steps {field.steps[0]}..{field.steps[-1]}"


def colour_groups(run: Run, spec) -> tuple[np.ndarray, np.ndarray]:
    """Per stored row: a legend group and a colour, from the first boolean constant of one value per
    row of the field's first axis (e.g. a dead-token mask); one group if there is none."""
    kept = spec.row_indices if spec.row_indices is not None else np.arange(spec.shape[0])
    for name in run.info.constants:
        mask = run.constant(name)
        if mask.dtype == torch.bool and tuple(mask.shape) == (spec.shape[0],):
            mask = mask.numpy()[kept]
            return (np.where(mask, name, f"not {name}").astype(object),
                    np.where(mask, Category10_10[3], Category10_10[0]).astype(object))
    return np.full(len(kept), "rows", dtype=object), np.full(len(kept), Category10_10[0], dtype=object)


class ExtraPanels:
    """The experiment's panels: one figure per title, a line per series, replaced when they change."""

    def __init__(self, page):
        self.page, self.shown, self.figures, self.row = page, None, {}, row()

    def update(self, panels) -> None:
        if panels is self.shown:
            return
        self.shown = panels
        for title, series in panels.items():
            if title not in self.figures:
                f = figure(title=title, x_axis_label="step", **SIZE)
                sources = {}
                for (label, _), colour in zip(series.items(), Category10_10):
                    sources[label] = ColumnDataSource({"x": [], "y": []})
                    f.line("x", "y", source=sources[label], color=colour, legend_label=label, line_width=1.5)
                f.legend.location, f.legend.label_text_font_size = "bottom_left", "8pt"
                self.figures[title] = sources
                if len(self.figures) == 1:
                    self.page.children.append(Div(text="<b>The experiment's questions</b>"))
                    self.page.children.append(self.row)
                self.row.children.append(f)
            for label, (x, y) in series.items():
                self.figures[title][label].data = {"x": np.asarray(x), "y": np.asarray(y, dtype=np.float64)}
