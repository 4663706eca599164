"""The live layer x step heatmap: every layer of a model in one picture, growing as the run goes.

A dashboard with one chart per layer and metric does not read at real depth (a 64-layer model would get
320 one-line charts). This view puts all layers side by side instead: rows are transformer layers, columns
are the logging steps so far, the colour is one per-layer metric. It is the report's "evolution" idea,
drawn at every logging step so trackers can show it live (W&B, TensorBoard, MLflow and trackio all have an
image-per-step panel).

:class:`LayerStepHistory` keeps the per-layer values of each logged summary (a few floats per layer and
step); :meth:`LayerStepHistory.render` draws one metric. The layout is fixed by the number of layers and
of shown steps, and :class:`LayerStepImage` says where each cell lies in the PNG, so a test (or a user)
can read a cell's colour back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradtrace.views.report import evolution_steps

# Metrics that are fractions of all elements and read on a fixed 0..1 scale; the others (cancelled,
# absorbed, changed without gradient: usually a few %) are scaled to their largest value so far.
FIXED_SCALE = ("gradient_sparsity", "update_sparsity")
MAX_COLUMNS = 120  # past this many logging steps, columns are spread evenly over the run (first and last kept)
CMAP = "viridis"

# Layout in pixels. The image is drawn with NumPy and Pillow, not matplotlib: it is redrawn at every
# logging step for every shown metric, and a matplotlib figure costs ~0.2 s where this costs a few ms
# (benchmarks/live_charts.py measures both).
_LEFT, _RIGHT_BAR, _BOTTOM, _TOP = 70, 110, 60, 45
_PANEL_W = 600
_ROW_PX, _MIN_PANEL_H, _MAX_PANEL_H = 14, 160, 900
_BLANK = (238, 238, 238)  # no value for that layer at that step
_INK = (40, 40, 40)
_BAR_W, _BAR_GAP = 15, 15


def _layer_sort_key(layer: str) -> tuple[int, int | str]:
    return (0, int(layer)) if layer.isdigit() else (1, layer)


@dataclass(frozen=True)
class LayerStepImage:
    """A rendered layer x step heatmap and where its cells are, in PNG pixels (origin top left)."""

    png: bytes
    metric: str
    layers: tuple[str, ...]  # row order, top to bottom
    steps: tuple[int, ...]  # column order, left to right
    box: tuple[float, float, float, float]  # heatmap area: left, top, right, bottom
    vmin: float
    vmax: float

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
        finite = data[np.isfinite(data)]
        vmin, vmax = 0.0, 1.0
        if metric not in FIXED_SCALE:
            vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0

        panel_h = min(max(_MIN_PANEL_H, _ROW_PX * len(layers)), _MAX_PANEL_H)
        name = metric.replace("_", " ")
        png = _draw(data, vmin, vmax, panel_h, layers, steps,
                    title or f"{name} per layer, steps {steps[0]} to {steps[-1]}")
        box = (float(_LEFT), float(_TOP), float(_LEFT + _PANEL_W), float(_TOP + panel_h))
        return LayerStepImage(png=png, metric=metric, layers=tuple(layers), steps=tuple(steps), box=box,
                              vmin=vmin, vmax=vmax)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):  # an old Pillow or one built without FreeType
        return ImageFont.load_default()


def _percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def _draw(data, vmin: float, vmax: float, panel_h: int, layers: Sequence[str], steps: Sequence[int],
          title: str) -> bytes:
    """The PNG: cells coloured by ``data`` (layers x steps, NaN = blank), axis labels, a colour bar."""
    import io

    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    cmap = colormaps[CMAP]
    scaled = np.clip((data - vmin) / (vmax - vmin), 0.0, 1.0)
    cells = cmap(np.nan_to_num(scaled), bytes=True)[..., :3]  # the colormap's own 256-entry lookup table
    cells[~np.isfinite(data)] = _BLANK
    # Pixel x (y) of the panel belongs to column floor(x * columns / width): cells as equal as pixels allow.
    rows = np.arange(panel_h) * len(layers) // panel_h
    columns = np.arange(_PANEL_W) * len(steps) // _PANEL_W
    width, height = _LEFT + _PANEL_W + _RIGHT_BAR, _BOTTOM + panel_h + _TOP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[_TOP:_TOP + panel_h, _LEFT:_LEFT + _PANEL_W] = cells[rows][:, columns]
    bar_left = _LEFT + _PANEL_W + _BAR_GAP
    bar = cmap(np.linspace(1.0, 0.0, panel_h), bytes=True)[:, :3]  # top = vmax
    canvas[_TOP:_TOP + panel_h, bar_left:bar_left + _BAR_W] = bar[:, None, :]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    small, label = _font(10), _font(11)
    draw.rectangle((_LEFT - 1, _TOP - 1, _LEFT + _PANEL_W, _TOP + panel_h), outline=_INK)
    draw.rectangle((bar_left - 1, _TOP - 1, bar_left + _BAR_W, _TOP + panel_h), outline=_INK)
    draw.text((_LEFT + _PANEL_W / 2, _TOP / 2), title, fill=_INK, font=_font(12), anchor="mm")
    label_every = max(1, math.ceil(len(layers) / 32))  # at most ~32 row labels stay readable
    for row in range(0, len(layers), label_every):
        y = _TOP + (row + 0.5) * panel_h / len(layers)
        draw.text((_LEFT - 5, y), layers[row], fill=_INK, font=small, anchor="rm")
    tick_every = max(1, math.ceil(len(steps) / 12))
    for column in range(0, len(steps), tick_every):
        x = _LEFT + (column + 0.5) * _PANEL_W / len(steps)
        draw.line((x, _TOP + panel_h, x, _TOP + panel_h + 3), fill=_INK)
        draw.text((x, _TOP + panel_h + 5), str(steps[column]), fill=_INK, font=small, anchor="mt")
    draw.text((_LEFT + _PANEL_W / 2, height - 12), "step", fill=_INK, font=label, anchor="mb")
    draw.text((_LEFT - 5, _TOP - 4), "layer", fill=_INK, font=label, anchor="rb")
    for fraction in np.linspace(0.0, 1.0, 5):
        y = _TOP + (1.0 - fraction) * (panel_h - 1)
        draw.line((bar_left + _BAR_W, y, bar_left + _BAR_W + 3, y), fill=_INK)
        draw.text((bar_left + _BAR_W + 6, y), _percent(vmin + fraction * (vmax - vmin)), fill=_INK, font=small,
                  anchor="lm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: these images are re-sent at every logging step
    return buffer.getvalue()


def layer_step_pngs(history: LayerStepHistory, metrics: Sequence[str]) -> dict[str, bytes]:
    """PNG per metric of the current layer x step heatmaps (empty when the model has no numbered layers)."""
    if not history.layers():
        return {}
    return {metric: history.render(metric).png for metric in metrics}
