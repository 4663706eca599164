"""Present traced runs: a layer x module-kind grid, plots, and a self-contained HTML report.

Everything here reads plain data (the summaries of :mod:`gradtrace.tracking.summary`, as the run log stores
them), never a tracker, so a report can be made from a finished run, from a run still being written,
or on another machine. The W&B sink draws its heatmaps with the same functions, so the local report
and the dashboard show the same picture.

Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, not through
``pyplot``: no global backend is switched and no window can open (training may run under a GUI
backend the user chose).

    write_report(["runs/grpo", "runs/sft"], "runs/compare")   # -> runs/compare/report.html (+ PNGs)
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from gradtrace.anatomy.naming import layer_sort_key
from gradtrace.views.run_data import (
    CURVE_METRICS,
    Grid,
    RunData,
    evolution_steps,
    expert_grid,
    expert_rows,
    kind_sort_key,
    layer_kind_grid,
    load_run,
    matrix_rows,
    metric_keys,
    percent,
)

REPORT_NAME = "report.html"
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


def heatmap_figure(grids: Sequence[Grid], titles: Sequence[str], *, suptitle: str | None = None,
                   vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis", colorbar_label: str = "") -> Figure:
    """Heatmaps side by side with one shared colour scale (so panels can be compared by colour).

    Laid out by hand, in inches, rather than with a layout engine: the W&B sink draws two of these at
    every logging step, and a layout engine more than doubles the render time.
    """
    rows = max(len(g.rows) for g in grids)
    columns = max(len(g.columns) for g in grids)
    panel_w, panel_h = max(2.0, 0.42 * columns), min(max(1.2, 0.26 * rows), 12.0)
    left, gap, bottom, top = 0.9, 0.9, 0.85, 0.65 if suptitle else 0.4
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
    figure = new_figure(16, 7)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.1, top=0.95, wspace=0.12, hspace=0.4)
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


# --------------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; position: sticky; top: 0; } td.text { text-align: left; font-family: monospace; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: .9em; }
details { margin: .5em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _cell(value: Any, *, fraction: bool) -> str:
    """A table cell; fractions show as % and keep their exact value in ``data-value`` (for tools, tests)."""
    if fraction:
        exact = repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        return f'<td data-value="{exact}">{html.escape(percent(value, 3))}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td data-value="{value}">{value:,}</td>'
    return f'<td class="text">{html.escape("—" if value is None else str(value))}</td>'


def matrix_table_html(per_matrix: Mapping[str, Mapping[str, Any]], table_id: str) -> str:
    """The per-matrix table: one row per parameter matrix (fractions in %, exact values in data-value)."""
    columns, rows = matrix_rows(per_matrix)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(_cell(v, fraction=i >= 4) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<table id="{html.escape(table_id)}" class="per-matrix"><tr>{head}</tr>\n{body}</table>'


def _global_table_html(runs: Sequence[RunData]) -> str:
    metrics = metric_keys({k: None for run in runs for k in run.final["global"]},
                          (*CURVE_METRICS, "no_gradient", "gradient_unchanged", "ever_changed"))
    head = "<th>metric</th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = [f'<tr><td class="text">{html.escape(m)}</td>'
            + "".join(_cell(r.final["global"].get(m), fraction=True) for r in runs) + "</tr>" for m in metrics]
    counts = ("optimizer_steps", "zero_gradient_steps", "nonfinite_gradient_steps", "skipped_overflow_steps",
              "tracked_elements",
              *(k for k in ("experts", "experts_without_gradient") if any(k in r.final["global"] for r in runs)))
    for key in counts:
        rows.append(f'<tr><td class="text">{key}</td>'
                    + "".join(_cell(r.final["global"].get(key), fraction=False) for r in runs) + "</tr>")
    return f'<table id="global"><tr>{head}</tr>\n' + "\n".join(rows) + "</table>"


def _info_table_html(runs: Sequence[RunData]) -> str:
    """What the numbers depend on: optimizer, lr, weight decay, clipping, dtypes, tracker settings."""

    def describe(run: RunData) -> dict[str, str]:
        info = run.info
        optimizer = info.get("optimizer") or {}
        groups = optimizer.get("param_groups") or [{}]
        params = info.get("parameters") or {}
        config = info.get("tracker_config") or {}
        return {
            "directory": str(run.path),
            "status": "finished" if run.ended else "running (or stopped without finishing)",
            "last step": str(run.final.get("step")),
            "optimizer": str(optimizer.get("class", "—")).rsplit(".", 1)[-1],
            "learning rate": ", ".join(sorted({f"{g['lr']:g}" for g in groups if "lr" in g})) or "—",
            "weight decay": ", ".join(sorted({f"{g['weight_decay']:g}" for g in groups if "weight_decay" in g})) or "—",
            "max grad norm": str(info.get("max_grad_norm", "—")),
            "gradient accumulation": str(info.get("gradient_accumulation_steps", "—")),
            "mixed precision": str(info.get("mixed_precision", "—")),
            "stored dtypes (elements)": ", ".join(f"{k}: {v:,}" for k, v in
                                                   (params.get("elements_by_dtype") or {}).items()) or "—",
            "master weights dtype": str(info.get("master_weights_dtype")),
            "cancellation": f"{config.get('cancellation', '—')} (ε = {config.get('cancel_epsilon', '—')}, "
                            f"stride {config.get('sample_stride', '—')})",
            "tolerances": f"abs {config.get('abs_tolerance', '—')}, rel {config.get('rel_tolerance', '—')}",
        }

    described = [describe(run) for run in runs]
    head = "<th></th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = [f'<tr><td class="text">{html.escape(key)}</td>'
            + "".join(f'<td class="text">{html.escape(d[key])}</td>' for d in described) + "</tr>"
            for key in described[0]]
    return f'<table id="info"><tr>{head}</tr>\n' + "\n".join(rows) + "</table>"


def anatomy_warnings_html(runs: Sequence[RunData]) -> str:
    """Each run's ``anatomy_warnings`` (an unrecognised MoE layout) as a visible paragraph; ``""`` if none."""
    out = []
    for run in runs:
        for warning in (run.final or {}).get("anatomy_warnings") or []:
            out.append(f'<p style="color:#b00"><b>{html.escape(run.label)}: model anatomy:</b> '
                       f"{html.escape(warning)}</p>")
    return "".join(out)


def _unique_labels(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (self-contained: PNGs embedded as data URIs) and the PNGs into ``out_dir``.

    One run: its curves, layer x kind heatmaps at the end and over time, cancellation histogram and
    per-matrix table. Several runs (e.g. GRPO and SFT): the same plots overlaid or side by side on one
    colour scale, plus each run's difference from the first. Reads only the run logs (and
    ``summary.json``), so it works on a run still being written. ``out`` is a directory (``report.html``
    goes in it) or a file name ending in ``.html`` / ``.htm`` (the PNGs go beside it); it defaults to
    ``<first run>/report``. Returns the HTML file's path.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    html_path = Path(out) if out is not None else runs[0].path / "report"
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path / REPORT_NAME
    out = html_path.parent
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}

    def add(name: str, figure: Figure) -> str:
        images[name] = figure_png(figure)
        (out / name).write_bytes(images[name])
        return name

    sections: list[str] = []

    def image_html(name: str, alt: str) -> str:
        data = base64.b64encode(images[name]).decode("ascii")
        return f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}"></p>'

    title = " vs ".join(r.label for r in runs)
    sections.append(f"<h1>gradtrace report: {html.escape(title)}</h1>")
    sections.append('<p class="note">Fractions are of tracked elements. Update sparsity = share of elements '
                    "bitwise unchanged in their storage dtype (the _abs/_rel variants: within an absolute / "
                    "relative tolerance); gradient sparsity = share that never received a nonzero gradient.</p>")
    sections.append("<h2>Runs</h2>" + _info_table_html(runs) + anatomy_warnings_html(runs))
    sections.append("<h2>At the end</h2>" + _global_table_html(runs))

    sections.append("<h2>Over training</h2>" + image_html(add("curves.png", curves_figure(runs)), "curves"))

    heatmaps = []
    for run in runs:
        grids = [layer_kind_grid(run.final["per_matrix"], m) for m in ("update_sparsity", "gradient_sparsity")]
        name = add(f"heatmap-{_slug(run.label)}.png",
                   heatmap_figure(grids, ["update sparsity", "gradient sparsity"],
                                  suptitle=f"{run.label}: layer x module kind at step {run.final.get('step')}"))
        heatmaps.append(image_html(name, f"heatmap {run.label}"))
    for run in runs[1:]:
        # The difference from the first run, cell by cell, where both runs have that (layer, kind).
        base = layer_kind_grid(runs[0].final["per_matrix"], "update_sparsity")
        other = layer_kind_grid(run.final["per_matrix"], "update_sparsity")
        if base.rows == other.rows and base.columns == other.columns:
            diff = Grid("update_sparsity", base.rows, base.columns, [
                [None if a is None or b is None else b - a for a, b in zip(ra, rb, strict=True)]
                for ra, rb in zip(base.values, other.values, strict=True)])
            name = add(f"heatmap-diff-{_slug(run.label)}-vs-{_slug(runs[0].label)}.png",
                       heatmap_figure([diff], [f"{run.label} − {runs[0].label}"], vmin=-1, vmax=1, cmap="RdBu",
                                      colorbar_label="difference (percentage points)",
                                      suptitle="update sparsity difference (positive: sparser than "
                                               f"{runs[0].label})"))
            heatmaps.append(image_html(name, f"difference {run.label}"))
    sections.append("<h2>Layer x module kind, at the end</h2>" + "".join(heatmaps))

    experts = [image_html(add(f"experts-{_slug(run.label)}.png", expert_heatmap_figure(run.final, label=run.label)),
                          f"experts {run.label}") for run in runs if run.final.get("per_expert")]
    if experts:
        for run in runs:
            if run.final.get("per_expert"):
                columns, rows = expert_rows(run.final["per_expert"])
                head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
                body = "\n".join("<tr>" + "".join(_cell(v, fraction=i >= 3) for i, v in enumerate(row)) + "</tr>"
                                 for row in rows)
                experts.append(f"<details><summary>{html.escape(run.label)}: {len(rows)} routed experts</summary>"
                               f'<table id="experts-{_slug(run.label)}" class="per-expert"><tr>{head}</tr>\n'
                               f"{body}</table></details>")
        sections.append("<h2>Layer x routed expert, at the end</h2>" + "".join(experts))

    evolutions = [image_html(add(f"evolution-{_slug(run.label)}.png", evolution_figure(run)),
                             f"evolution {run.label}") for run in runs]
    sections.append("<h2>Layer x module kind over training</h2>" + "".join(evolutions))
    sections.append("<h2>Per layer and per module kind</h2>"
                    + image_html(add("breakdown.png", breakdown_figure(runs)), "breakdown"))
    sections.append("<h2>Cancellation</h2>" + image_html(add("histogram.png", histogram_figure(runs)), "histogram"))

    tables = []
    for index, run in enumerate(runs):
        table = matrix_table_html(run.final["per_matrix"], f"matrices-{_slug(run.label)}")
        tables.append(f"<details{' open' if index == 0 else ''}><summary>{html.escape(run.label)}: "
                      f"{len(run.final['per_matrix'])} matrices at step {run.final.get('step')}</summary>"
                      f"{table}</details>")
    sections.append("<h2>Per parameter matrix</h2>" + "".join(tables))

    document = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>gradtrace: '
                f"{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(sections) + "\n</body></html>\n")
    html_path.write_text(document, encoding="utf-8")
    return html_path
