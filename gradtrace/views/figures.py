"""The report's figures, drawn with matplotlib: curves over training, layer x kind and layer x expert
heatmaps, per-layer / per-kind bars, the cancellation histogram.

Everything here reads plain data (:class:`~gradtrace.views.run_data.RunData`, summaries), never a tracker.
Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, not through ``pyplot``: no
global backend is switched and no window can open (training may run under a GUI backend the user chose).
The live images the trackers get are drawn by :mod:`gradtrace.views.raster` instead (NumPy and Pillow: fast
enough for every logging step); here the layout matters more than the speed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from gradtrace.anatomy.naming import layer_sort_key
from gradtrace.views.run_data import (
    Grid,
    RunData,
    evolution_steps,
    expert_grid,
    kind_sort_key,
    layer_kind_grid,
    metric_keys,
)

_TITLES = {
    "gradient_sparsity": "gradient sparsity (never a nonzero gradient)",
    "update_sparsity": "update sparsity (bitwise unchanged)",
    "cancelled": "cancelled (gradient, net ~0, unchanged)",
    "absorbed": "absorbed (gradient, lost to rounding)",
    "changed_without_gradient": "changed without gradient",
    "updated": "updated (gradient and changed)",
    "no_gradient": "no gradient and unchanged",
}


def expert_heatmap_figure(summary: Mapping[str, Any], *, label: str = "") -> Figure:
    """Gradient and update sparsity per routed expert, layer x expert, one colour scale."""
    grids = [expert_grid(summary["per_expert"], m) for m in ("gradient_sparsity", "update_sparsity")]
    figure = heatmap_figure(grids, ["gradient sparsity", "update sparsity"], colorbar_label="sparsity",
                            suptitle=f"{label + ': ' if label else ''}layer x routed expert at step "
                                     f"{summary.get('step')} (100: the expert never received a gradient)")
    for ax in figure.axes[:len(grids)]:
        ax.set_xlabel("expert")
    return figure


# ----------------------------------------------------------------------------------------------- plotting
def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot, no GUI).

    Margins are set per plot (``subplots_adjust``) rather than by a layout engine, which would more
    than double the render time.
    """
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def draw_heatmap(ax: Any, grid: Grid, *, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis",
                 annotate: bool | None = None) -> Any:
    """Draw ``grid`` on ``ax`` (rows = layers, columns = kinds); empty cells are left blank.

    Cell values are written in % when the grid is small enough to read them. Returns the image, for a
    colorbar.
    """
    import numpy as np

    data = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in grid.values],
                                         dtype=float).reshape(len(grid.rows), len(grid.columns)))
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_facecolor("#eeeeee")  # blank (masked) cells: no such matrix in that layer
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=8)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    if annotate is None:
        annotate = len(grid.rows) * len(grid.columns) <= 200
    if annotate:
        for i, row in enumerate(grid.values):
            for j, value in enumerate(row):
                if value is not None:
                    red, green, blue, _ = image.cmap(image.norm(value))
                    light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # dark text on light cells
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
    return image


def _below_axis(label_chars: int) -> float:
    """Inches below a heatmap for its column labels (8 pt, turned 45°) and the axis label under them.

    A fixed margin clipped the axis label ("module kind") under long kinds (``shared_expert.gate_up``): a
    character of 8 pt text is about 0.07 in wide, so a label turned 45° reaches 0.05 in lower per character.
    """
    return 0.35 + 0.05 * label_chars + 0.3


def heatmap_figure(grids: Sequence[Grid], titles: Sequence[str], *, suptitle: str | None = None,
                   vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis", colorbar_label: str = "") -> Figure:
    """Heatmaps side by side with one shared colour scale (so panels can be compared by colour).

    Laid out by hand, in inches, rather than with a layout engine: the W&B sink draws two of these at
    every logging step, and a layout engine more than doubles the render time.
    """
    rows = max(len(g.rows) for g in grids)
    columns = max(len(g.columns) for g in grids)
    panel_w, panel_h = max(2.0, 0.42 * columns), min(max(1.2, 0.26 * rows), 12.0)
    left, gap, top = 0.9, 0.9, 0.65 if suptitle else 0.4
    bottom = _below_axis(max(len(c) for g in grids for c in g.columns))
    bar_gap, bar_w, bar_labels = 0.2, 0.18, 0.9
    width = left + len(grids) * panel_w + (len(grids) - 1) * gap + bar_gap + bar_w + bar_labels
    height = bottom + panel_h + top
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    image = None
    for index, (grid, title) in enumerate(zip(grids, titles, strict=True)):
        x = left + index * (panel_w + gap)
        ax = figure.add_axes((x / width, bottom / height, panel_w / width, panel_h / height))
        image = draw_heatmap(ax, grid, vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_title(title, fontsize=9)
    x = left + len(grids) * panel_w + (len(grids) - 1) * gap + bar_gap
    bar_ax = figure.add_axes((x / width, bottom / height, bar_w / width, panel_h / height))
    bar = figure.colorbar(image, cax=bar_ax)
    bar.formatter = PercentFormatter(xmax=1)
    bar.set_label(colorbar_label)
    if suptitle:
        figure.suptitle(suptitle, fontsize=10)
    return figure


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return [palette(i % 10) for i in range(count)]


def curves_figure(runs: Sequence[RunData]) -> Figure:
    """Global fractions over steps, one panel per metric, every run overlaid."""
    metrics = metric_keys({k: None for run in runs for k in run.final["global"]})
    columns = 4
    rows = max(1, math.ceil(len(metrics) / columns))
    figure = new_figure(16, 3.2 * rows + 0.4)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.6 / (3.2 * rows + 0.4), top=1 - 0.7 / (3.2 * rows + 0.4),
                           wspace=0.25, hspace=0.45)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for run, color in zip(runs, _colors(len(runs)), strict=True):
            steps, values = run.series(metric)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, color=color, label=run.label)
        ax.set_title(_TITLES.get(metric, metric.replace("_", " ")), fontsize=9)
        ax.set_xlabel("step")
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if len(runs) > 1 or metrics:
        axes[0].legend(fontsize=8)
    figure.suptitle("fraction of tracked elements over training", fontsize=11)
    return figure


def breakdown_figure(runs: Sequence[RunData]) -> Figure:
    """Final update and gradient sparsity per layer and per module kind, runs as grouped bars."""
    kinds = {k for run in runs for k in run.final.get("per_kind", {})}
    below = _below_axis(max((len(k) for k in kinds), default=4)) - 0.3  # kind labels under each row, no axis label
    panel_h, top = 2.6, 0.35
    height = top + 2 * panel_h + 2 * below + 0.3  # the title of the lower row sits under the upper row's labels
    figure = new_figure(16, height)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=below / height, top=1 - top / height, wspace=0.12,
                           hspace=(below + 0.3) / panel_h)
    axes = figure.subplots(2, 2, squeeze=False)
    colors = _colors(len(runs))
    for column, (group, title) in enumerate((("per_layer", "layer"), ("per_kind", "module kind"))):
        keys: list[str] = []
        for run in runs:
            keys.extend(k for k in run.final.get(group, {}) if k not in keys)
        keys = sorted(keys, key=layer_sort_key) if group == "per_layer" else sorted(keys, key=kind_sort_key)
        for row, metric in enumerate(("update_sparsity", "gradient_sparsity")):
            ax = axes[row][column]
            width = 0.8 / max(len(runs), 1)
            for index, (run, color) in enumerate(zip(runs, colors, strict=True)):
                values = [run.final.get(group, {}).get(k, {}).get(metric) for k in keys]
                positions = [i + (index - (len(runs) - 1) / 2) * width for i in range(len(keys))]
                ax.bar(positions, [v if isinstance(v, (int, float)) else 0 for v in values], width=width,
                       color=color, label=run.label)
            ax.set_xticks(range(len(keys)), keys, fontsize=8, rotation=0 if group == "per_layer" else 45)
            ax.set_ylim(0, 1)
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
            ax.set_title(f"{metric.replace('_', ' ')} per {title} (end)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return figure


def histogram_figure(runs: Sequence[RunData]) -> Figure:
    """Final cancellation-ratio histograms |Σg|/Σ|g| (fraction of counted elements per bin), overlaid."""
    figure = new_figure(9, 4)
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.14, top=0.92)
    ax = figure.subplots()
    drawn = False
    for index, (run, color) in enumerate(zip(runs, _colors(len(runs)), strict=True)):
        histogram = run.final.get("cancellation_histogram") or {}
        counts, edges = histogram.get("counts") or [], histogram.get("edges") or []
        total = sum(counts)
        if not total or len(edges) != len(counts) + 1:
            continue  # cancellation tracking off: nothing was counted
        ax.stairs([c / total for c in counts], edges, color=color, label=f"{run.label} ({total} elements)",
                  fill=len(runs) == 1, alpha=0.6 if len(runs) == 1 else 1.0, linewidth=2)
        epsilon = (run.info.get("tracker_config") or {}).get("cancel_epsilon")
        if isinstance(epsilon, (int, float)) and index == 0:
            ax.axvline(epsilon, color="gray", linestyle="--", label=f"cancel threshold ε = {epsilon:g}")
        drawn = True
    ax.set_xlim(0, 1)
    ax.set_xlabel("|Σg| / Σ|g| over the run (0: gradients cancelled out, 1: always the same sign)")
    ax.set_ylabel("fraction of elements with a gradient")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_title("cancellation ratio at the end (elements whose gradient sums are kept)", fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no gradient sums kept (cancellation='off')", ha="center", va="center",
                transform=ax.transAxes)
    return figure


def evolution_figure(run: RunData, metric: str = "update_sparsity", count: int = 6) -> Figure:
    """Small multiples: the layer x kind heatmap of ``metric`` at a few steps of one run."""
    by_step = {int(r["step"]): r for r in run.logs}
    steps = evolution_steps(sorted(by_step), count)
    grids = [layer_kind_grid(by_step[s]["per_matrix"], metric) for s in steps]
    return heatmap_figure(grids, [f"step {s}" for s in steps], colorbar_label=metric.replace("_", " "),
                          suptitle=f"{run.label}: {metric.replace('_', ' ')} per layer x kind over training")
