"""``gradtrace report``: a self-contained HTML report of one or more traced runs, and its PNGs.

Everything here reads plain data (the run logs and ``summary.json``, as :func:`~gradtrace.views.run_data.load_run`
gives them), never a tracker, so a report can be made from a finished run, from a run still being written, or
on another machine. The page: the runs' settings, the values at the end, the curves over training, every
layer over every logged step per metric (the layer x step images, drawn like the trackers' live ones by
:mod:`gradtrace.views.live`, on a colour scale fit to the data, its range printed), the layer x kind
heatmaps at the end and over training, per layer / per kind bars, the cancellation histogram and the
per-matrix table. The figures are :mod:`gradtrace.views.figures`, the tables :mod:`gradtrace.views.report_html`.

    write_report(["runs/grpo", "runs/sft"], "runs/compare")   # -> runs/compare/report.html (+ PNGs)
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

from gradtrace.views.figures import (
    breakdown_figure,
    curves_figure,
    evolution_figure,
    expert_heatmap_figure,
    figure_png,
    heatmap_figure,
    histogram_figure,
)
from gradtrace.views.live import LayerStepHistory, LayerStepImage, colour_range
from gradtrace.views.report_html import (
    CSS,
    SORT_SCRIPT,
    anatomy_warnings_html,
    estimate_note,
    expert_table_html,
    global_table_html,
    info_table_html,
    matrix_table_html,
    slug,
)
from gradtrace.views.run_data import (
    Grid,
    RunData,
    is_estimate,
    layer_kind_grid,
    load_run,
    percent,
    sampling_stride,
)

REPORT_NAME = "report.html"
# The per-layer metrics drawn layer x step, where the run log has per-layer values of them.
LAYER_STEP_METRICS = ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed")


def layer_step_images(run: RunData) -> dict[str, tuple[LayerStepImage, bool]]:
    """Per metric of :data:`LAYER_STEP_METRICS` with a value somewhere: its layer x step image (every layer,
    the logged steps; colour scale fit to the data) and whether its values are estimates (sampled sums).

    Empty for a model without numbered layers.
    """
    history = LayerStepHistory()
    for record in run.logs:  # sorted by step, the newest record of each
        history.add(record)
    layers, steps = history.layers(), history.shown_steps()
    if not layers:
        return {}
    stride = sampling_stride(run.info)
    images = {}
    for metric in LAYER_STEP_METRICS:
        data = [[history.value(layer, step, metric) for step in steps] for layer in layers]
        if all(v is None for row in data for v in row):
            continue  # e.g. cancelled / absorbed with cancellation="off"
        estimated = any(is_estimate(values, metric, stride) for record in run.logs
                        for values in (record.get("per_layer") or {}).values())
        vmin, vmax = colour_range([[math.nan if v is None else v for v in row] for row in data])
        title = (f"{metric.replace('_', ' ')}{' (estimated)' if estimated else ''} per layer, steps {steps[0]} to "
                 f"{steps[-1]} (colour: {percent(vmin)} to {percent(vmax)})")
        images[metric] = (history.render(metric, title=title), estimated)
    return images


def _layer_step_html(run: RunData, add_png) -> str:
    """The run's layer x step figures, side by side, each with its colour range in its title and caption."""
    figures = []
    estimated_any = False
    for metric, (image, estimated) in layer_step_images(run).items():
        name = add_png(f"layer-step-{slug(run.label)}-{metric}.png", image.png)
        described = (f"{run.label}: {metric.replace('_', ' ')}{' (estimated)' if estimated else ''} per layer x "
                     f"step, colour scale {percent(image.vmin)} to {percent(image.vmax)}")
        data = base64.b64encode(image.png).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(described)}" '
            f'title="{html.escape(described)}" data-file="{name}" data-metric="{metric}" '
            f'data-vmin="{image.vmin!r}" data-vmax="{image.vmax!r}"><figcaption>{html.escape(described)} '
            f"(fit to the data: {len(image.rows)} layers, {len(image.columns)} logged steps)</figcaption></figure>")
        estimated_any |= estimated
    if not figures:
        return ""
    note = estimate_note(sampling_stride(run.info)) if estimated_any else ""
    return f'<div class="layer-step" id="layer-step-{slug(run.label)}">{"".join(figures)}</div>{note}'


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

    def add_png(name: str, png: bytes) -> str:
        images[name] = png
        (out / name).write_bytes(png)
        return name

    def add(name: str, figure) -> str:  # a matplotlib Figure
        return add_png(name, figure_png(figure))

    sections: list[str] = []

    def image_html(name: str, alt: str) -> str:
        data = base64.b64encode(images[name]).decode("ascii")
        return f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}"></p>'

    title = " vs ".join(r.label for r in runs)
    sections.append(f"<h1>gradtrace report: {html.escape(title)}</h1>")
    sections.append('<p class="note">Fractions are of tracked elements. Update sparsity = share of elements '
                    "bitwise unchanged in their storage dtype (the _abs/_rel variants: within an absolute / "
                    "relative tolerance); gradient sparsity = share that never received a nonzero gradient.</p>")
    sections.append("<h2>Runs</h2>" + info_table_html(runs) + anatomy_warnings_html(runs))
    sections.append("<h2>At the end</h2>" + global_table_html(runs))

    sections.append("<h2>Over training</h2>" + image_html(add("curves.png", curves_figure(runs)), "curves"))
    layer_steps = [f"<h3>{html.escape(run.label)}</h3>{views}" for run in runs
                   if (views := _layer_step_html(run, add_png))]
    if layer_steps:
        sections.append("<h2>Every layer over training</h2>" + "".join(layer_steps))

    heatmaps = []
    for run in runs:
        grids = [layer_kind_grid(run.final["per_matrix"], m) for m in ("update_sparsity", "gradient_sparsity")]
        name = add(f"heatmap-{slug(run.label)}.png",
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
            name = add(f"heatmap-diff-{slug(run.label)}-vs-{slug(runs[0].label)}.png",
                       heatmap_figure([diff], [f"{run.label} − {runs[0].label}"], vmin=-1, vmax=1, cmap="RdBu",
                                      colorbar_label="difference (percentage points)",
                                      suptitle="update sparsity difference (positive: sparser than "
                                               f"{runs[0].label})"))
            heatmaps.append(image_html(name, f"difference {run.label}"))
    sections.append("<h2>Layer x module kind, at the end</h2>" + "".join(heatmaps))

    experts = [image_html(add(f"experts-{slug(run.label)}.png", expert_heatmap_figure(run.final, label=run.label)),
                          f"experts {run.label}") for run in runs if run.final.get("per_expert")]
    if experts:
        for run in runs:
            if run.final.get("per_expert"):
                table = expert_table_html(run.final["per_expert"], f"experts-{slug(run.label)}",
                                          sampling_stride(run.info))
                experts.append(f"<details><summary>{html.escape(run.label)}: {len(run.final['per_expert'])} routed "
                               f"experts</summary>{table}</details>")
        sections.append("<h2>Layer x routed expert, at the end</h2>" + "".join(experts))

    evolutions = [image_html(add(f"evolution-{slug(run.label)}.png", evolution_figure(run)),
                             f"evolution {run.label}") for run in runs]
    sections.append("<h2>Layer x module kind over training</h2>" + "".join(evolutions))
    sections.append("<h2>Per layer and per module kind</h2>"
                    + image_html(add("breakdown.png", breakdown_figure(runs)), "breakdown"))
    sections.append("<h2>Cancellation</h2>" + image_html(add("histogram.png", histogram_figure(runs)), "histogram"))

    tables = []
    for index, run in enumerate(runs):
        stride = sampling_stride(run.info)
        table = matrix_table_html(run.final["per_matrix"], f"matrices-{slug(run.label)}", stride)
        marked = any(is_estimate(values, metric, stride) for values in run.final["per_matrix"].values()
                     for metric in values)
        tables.append(f"<details{' open' if index == 0 else ''}><summary>{html.escape(run.label)}: "
                      f"{len(run.final['per_matrix'])} matrices at step {run.final.get('step')}</summary>"
                      f"{table}{estimate_note(stride) if marked else ''}</details>")
    sections.append('<h2>Per parameter matrix</h2><p class="note">Click a column header to sort by it.</p>'
                    + "".join(tables))

    document = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>gradtrace: '
                f"{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
                + "\n".join(sections) + f"\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")
    html_path.write_text(document, encoding="utf-8")
    return html_path
