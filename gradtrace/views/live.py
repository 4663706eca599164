"""The live views: every layer of a model in one picture, growing as the run goes, and the step's heatmaps.

A dashboard with one chart per layer and metric does not read at real depth (a 64-layer model would get
320 one-line charts). This view puts all layers side by side instead: rows are transformer layers, columns
are the logging steps so far, the colour is one per-layer metric. It is the report's "evolution" idea,
drawn at every logging step so trackers can show it live (W&B, TensorBoard, MLflow and trackio all have an
image-per-step panel).

:class:`LayerStepHistory` keeps the per-layer values of each logged summary (a few floats per layer and
step); :meth:`LayerStepHistory.render` draws one metric. The layout is fixed by the number of layers and
of shown steps, and :class:`LayerStepImage` says where each cell lies in the PNG, so a test (or a user)
can read a cell's colour back. :func:`layer_kind_image` and :func:`expert_image` draw one summary's
layer x kind and layer x expert grids. All are drawn by :mod:`gradtrace.views.raster` (NumPy and Pillow),
as they are redrawn at every logging step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradtrace.views.raster import GridImage, draw_grid, grid_image, percent
from gradtrace.views.run_data import evolution_steps, expert_grid, layer_kind_grid

MAX_COLUMNS = 120  # past this many logging steps, columns are spread evenly over the run (first and last kept)
_PANEL_W, _ROW_PX, _MIN_PANEL_H, _MAX_PANEL_H = 600, 14, 160, 900  # pixels


def colour_range(data: Any) -> tuple[float, float]:
    """The colour scale of a layer x step image: its data's smallest to largest finite value.

    A fixed 0..100% scale drew a run whose layers all sit between 13.0% and 14.2% as one flat colour; fit
    to the data, the differences between layers and steps show, and the title and colour bar print the
    range. All equal (or nothing finite): the scale is that value (or 0) to itself, drawn in the bottom colour.
    """
    import numpy as np

    finite = np.asarray(data, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def _layer_sort_key(layer: str) -> tuple[int, int | str]:
    return (0, int(layer)) if layer.isdigit() else (1, layer)


@dataclass(frozen=True)
class LayerStepImage(GridImage):
    """A rendered layer x step heatmap (:class:`~gradtrace.views.raster.GridImage`: rows are the layers, top
    to bottom; columns the shown steps, left to right) with its metric and steps as numbers."""

    metric: str
    steps: tuple[int, ...]

    @property
    def layers(self) -> tuple[str, ...]:
        return self.rows

    def cell_center(self, layer: str, step: int) -> tuple[int, int]:
        """Pixel (x, y) at the centre of ``layer``'s cell at ``step``."""
        left, top, right, bottom = self.box
        row, column = self.layers.index(layer), self.steps.index(step)
        x = left + (column + 0.5) * (right - left) / len(self.steps)
        y = top + (row + 0.5) * (bottom - top) / len(self.layers)
        return int(x), int(y)


class LayerStepHistory:
    """Per-layer values of every logged summary, by metric: what the layer x step heatmaps draw."""

    def __init__(self, max_columns: int = MAX_COLUMNS):
        if max_columns < 2:
            raise ValueError(f"max_columns must be at least 2 (first and last step), got {max_columns}")
        self.max_columns = max_columns
        self.steps: list[int] = []
        self._values: list[dict[str, dict[str, float]]] = []  # per step: layer -> metric -> value

    def add(self, summary: Mapping[str, Any]) -> None:
        """Record ``summary``'s per-layer values at its step (a repeated step replaces the earlier one)."""
        step = int(summary["step"])
        values = {str(layer): {m: v for m, v in metrics.items() if isinstance(v, int | float)}
                  for layer, metrics in summary.get("per_layer", {}).items()}
        if self.steps and self.steps[-1] == step:
            self._values[-1] = values
        else:
            self.steps.append(step)
            self._values.append(values)

    def layers(self) -> list[str]:
        """Every layer seen so far, in model order."""
        return sorted({layer for values in self._values for layer in values}, key=_layer_sort_key)

    def value(self, layer: str, step: int, metric: str) -> float | None:
        value = self._values[self.steps.index(step)].get(layer, {}).get(metric)
        return value if value is not None and math.isfinite(value) else None

    def shown_steps(self) -> list[int]:
        """The steps drawn as columns: all of them, or ``max_columns`` spread evenly over the run."""
        return evolution_steps(self.steps, self.max_columns)

    def render(self, metric: str, *, title: str | None = None) -> LayerStepImage:
        """Draw ``metric`` per layer (rows) over the shown steps (columns)."""
        import numpy as np

        if not self.steps:
            raise ValueError("nothing to draw: no summary was added to the history yet")
        layers, steps = self.layers(), self.shown_steps()
        if not layers:
            raise ValueError(f"no per-layer values at steps {self.steps[:3]}...: the model has no numbered layers")
        at = {step: index for index, step in enumerate(self.steps)}
        data = np.array([[self._values[at[step]].get(layer, {}).get(metric, math.nan) for step in steps]
                         for layer in layers], dtype=float)  # NaN, inf: drawn blank
        vmin, vmax = colour_range(data)
        name = metric.replace("_", " ")
        image = draw_grid(data, layers, [str(s) for s in steps], vmin=vmin, vmax=vmax, column_label="step",
                          title=title or f"{name} per layer, steps {steps[0]} to {steps[-1]} "
                                         f"(colour: {percent(vmin)} to {percent(vmax)})", width=_PANEL_W,
                          height=min(max(_MIN_PANEL_H, _ROW_PX * len(layers)), _MAX_PANEL_H))
        return LayerStepImage(**vars(image), metric=metric, steps=tuple(steps))


def layer_step_images(history: LayerStepHistory, metrics: Sequence[str]) -> dict[str, LayerStepImage]:
    """The current layer x step heatmap per metric (empty when the model has no numbered layers)."""
    if not history.layers():
        return {}
    return {metric: history.render(metric) for metric in metrics}


def layer_step_pngs(history: LayerStepHistory, metrics: Sequence[str]) -> dict[str, bytes]:
    """PNG per metric of the current layer x step heatmaps (empty when the model has no numbered layers)."""
    return {metric: image.png for metric, image in layer_step_images(history, metrics).items()}


def layer_kind_image(summary: Mapping[str, Any], metric: str = "update_sparsity") -> GridImage:
    """One summary's layer x kind heatmap of ``metric`` (the trackers' ``gradtrace_heatmap/<metric>``)."""
    grid = layer_kind_grid(summary["per_matrix"], metric)
    return grid_image(grid, title=f"{metric.replace('_', ' ')} at step {summary.get('step')}",
                      column_label="module kind", vertical_columns=True)


def expert_image(summary: Mapping[str, Any], metric: str = "gradient_sparsity") -> GridImage:
    """One summary's layer x routed-expert heatmap of ``metric`` (``gradtrace_heatmap/expert_<metric>``)."""
    grid = expert_grid(summary["per_expert"], metric)
    return grid_image(grid, title=f"{metric.replace('_', ' ')} per expert at step {summary.get('step')}",
                      column_label="expert")
