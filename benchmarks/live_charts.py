"""What the live dashboard costs per logging step, by model depth: the images each tracker is sent.

    python benchmarks/live_charts.py            # 24 and 64 layers, 30 and 120 logged steps
    python benchmarks/live_charts.py --layers 80 --steps 200

At every logging step :class:`gradtrace.sinks.payload.LiveCharts` turns the tracker's summary into one
frame (rendered once, whatever the number of trackers): the scalars, one layer x step image per shown
metric (all layers x the steps so far) and the layer x kind heatmaps of the step, all drawn with NumPy and
Pillow as palette PNGs. Summaries come from a real :class:`GradTracker` on a Llama-config model of the given
depth (tiny widths: the cost of the charts depends on the number of layers and steps, not on the width),
logged at every step of a short synthetic run.

Printed side by side, medians of several frames: the whole frame (both sparsities' images, scalars,
histogram); its parts; and the same two kinds of image drawn as matplotlib figures (how gradtrace drew them
before; the report still draws its layer x kind heatmaps so), with the ratio.
One thread. Measured results are in README ("Watch it").
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gradtrace
from gradtrace import GradTracker
from gradtrace.sinks.payload import HEATMAP_METRICS, LAYER_STEP_METRICS, LiveCharts, scalar_payload
from gradtrace.tracking.summary import summarize
from gradtrace.views.figures import figure_png, heatmap_figure
from gradtrace.views.live import LayerStepHistory, layer_kind_image
from gradtrace.views.run_data import layer_kind_grid


def summaries(layers: int, steps: int) -> list[dict]:
    """The tracker's summaries of ``steps`` synthetic steps on a ``layers``-deep model (sparse gradients)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2))
    tracker = GradTracker(model)
    generator = torch.Generator().manual_seed(1)
    out = []
    for step in range(1, steps + 1):
        sparse_step(model, tracker, generator, density=0.02)
        out.append(summarize(tracker.measure(), step=step))
    return out


def sparse_step(model: torch.nn.Module, tracker: GradTracker, generator: torch.Generator, *, density: float) -> None:
    """One synthetic SGD step whose gradient is nonzero on about ``density`` of the elements, traced."""
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * (torch.rand(p.shape, generator=generator) < density)
    tracker.observe_gradients()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-1e-2)
    tracker.observe_update()


def matplotlib_layer_step_png(history: LayerStepHistory, metric: str) -> bytes:
    """The same layer x step image drawn with a matplotlib figure (the baseline for the ratio)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, steps = history.layers(), history.shown_steps()
    data = np.array([[np.nan if (v := history.value(layer, s, metric)) is None else v for s in steps]
                     for layer in layers])
    panel_h = min(max(1.6, 0.14 * len(layers)), 9.0)
    figure = Figure(figsize=(7.8, panel_h + 1.05), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.09, 0.6 / (panel_h + 1.05), 0.77, panel_h / (panel_h + 1.05)))
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_yticks(range(0, len(layers), max(1, len(layers) // 32)))
    ax.set_title(f"{metric} per layer", fontsize=9)
    figure.colorbar(image, cax=figure.add_axes((0.88, 0.1, 0.02, 0.8)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def matplotlib_grid_png(summary: dict, metric: str) -> bytes:
    """The layer x kind heatmap as a matplotlib figure: what the report draws (and the trackers got before)."""
    grid = layer_kind_grid(summary["per_matrix"], metric)
    return figure_png(heatmap_figure([grid], [f"{metric} at step {summary['step']}"]))


def median_ms(call, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 64])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 120])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"gradtrace from {gradtrace.__file__}; medians of 7, ms per logging step")
    header = (f"{'layers':>6} {'steps':>5} | {'frame':>6} {'scalars':>7} | {'layer x step':>12} {'matplotlib':>10} "
              f"{'ratio':>6} | {'layer x kind':>12} {'matplotlib':>10} {'ratio':>6} | {'images KB':>9}")
    print(header)
    print("-" * len(header))
    for layers in args.layers:
        records = summaries(layers, max(args.steps))
        for steps in args.steps:
            print(row(layers, steps, records))


def row(layers: int, steps: int, records: list[dict]) -> str:
    """One table row: the frame after ``steps`` logged summaries, and its parts, timed."""
    charts = LiveCharts()
    for record in records[:steps - 1]:
        charts.history.add(record)
    last, history = records[steps - 1], charts.history

    def whole_frame():
        charts._last = None  # noqa: SLF001 - measure a fresh render each time, not the per-step cache
        return charts.frame(last)

    frame_ms = median_ms(whole_frame)
    scalars_ms = median_ms(lambda: scalar_payload(last))
    layer_step_ms = sum(median_ms(lambda m=m: history.render(m)) for m in LAYER_STEP_METRICS)
    baseline_ms = sum(median_ms(lambda m=m: matplotlib_layer_step_png(history, m), 3) for m in LAYER_STEP_METRICS)
    layer_kind_ms = sum(median_ms(lambda m=m: layer_kind_image(last, m)) for m in HEATMAP_METRICS)
    baseline_kind_ms = sum(median_ms(lambda m=m: matplotlib_grid_png(last, m), 3) for m in HEATMAP_METRICS)
    kb = sum(len(png) for png in whole_frame().images.values()) / 1024
    return (f"{layers:>6} {steps:>5} | {frame_ms:6.1f} {scalars_ms:7.2f} | {layer_step_ms:12.1f} "
            f"{baseline_ms:10.1f} {baseline_ms / layer_step_ms:5.1f}x | {layer_kind_ms:12.1f} "
            f"{baseline_kind_ms:10.1f} {baseline_kind_ms / layer_kind_ms:5.1f}x | {kb:9.0f}")


if __name__ == "__main__":
    main()
