"""The live layer x step image and the default chart set, on summaries built here (no training needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gradtrace.sinks.payload import (
    HISTOGRAM_KEY,
    LiveCharts,
    final_summary,
    finite,
    scalar_payload,
)
from gradtrace.views.live import LayerStepHistory
from tests.helpers.tracker_checks import assert_layer_step_image

METRICS = ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed", "changed_without_gradient")


def summary(step: int, layers: int, change: tuple[str, str, float] | None = None) -> dict:
    """A summary whose per-layer values are a smooth function of (layer, step); ``change`` overrides one."""
    per_layer = {str(i): {m: (0.3 + 0.5 * ((i * 7 + step * 3 + k) % 11) / 10) * (1 if k < 2 else 0.05)
                          for k, m in enumerate(METRICS)} for i in range(layers)}
    if change is not None:
        layer, metric, value = change
        per_layer[layer][metric] = value
    return {"step": step, "global": {"update_sparsity": 0.5, "tracked_elements": 10, "note": None},
            "per_kind": {"q": {m: 0.1 for m in METRICS}}, "per_layer": per_layer, "per_matrix": {}}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.mark.parametrize("metric", ["update_sparsity", "absorbed"])
def test_pixels_change_exactly_where_a_layer_changed(metric):
    steps = [10, 20, 30, 40]
    before, after = LayerStepHistory(), LayerStepHistory()
    for step in steps:
        before.add(summary(step, 64))
        # same run, except layer 37's value at step 30, inside the others' range (the colour scale is fit
        # to the data, so it stays: 0.3..0.8, and 5% of that for absorbed)
        after.add(summary(step, 64, ("37", metric, 0.55 if metric == "update_sparsity" else 0.02)
                          if step == 30 else None))
    image_before, image_after = before.render(metric), after.render(metric)
    changed = np.argwhere((pixels(image_before.png) != pixels(image_after.png)).any(axis=2))
    assert len(changed) > 0
    left, top, right, bottom = image_after.box
    cell_w, cell_h = (right - left) / len(steps), (bottom - top) / 64
    x0, y0 = left + 2 * cell_w, top + 37 * cell_h  # column of step 30, row of layer 37
    ys, xs = changed[:, 0], changed[:, 1]
    assert xs.min() >= int(x0) - 1 and xs.max() <= int(x0 + cell_w) + 1
    assert ys.min() >= int(y0) - 1 and ys.max() <= int(y0 + cell_h) + 1
    # and every cell of the new image shows its own value (colours computed independently)
    records = [summary(s, 64, ("37", metric, 0.55 if metric == "update_sparsity" else 0.02) if s == 30 else None)
               for s in steps]
    assert_layer_step_image(pixels(image_after.png), records, metric)


def test_the_image_grows_with_each_logging_step_then_spreads_its_columns():
    history = LayerStepHistory(max_columns=5)
    for step in range(1, 4):
        history.add(summary(step, 3))
        assert history.render("update_sparsity").steps == tuple(range(1, step + 1))
    history.add(summary(3, 3, ("0", "update_sparsity", 0.0)))  # the same step again replaces it
    assert history.steps == [1, 2, 3] and history.value("0", 3, "update_sparsity") == 0.0
    for step in range(4, 21):
        history.add(summary(step, 3))
    shown = history.render("update_sparsity").steps
    assert len(shown) == 5 and shown[0] == 1 and shown[-1] == 20 and list(shown) == sorted(shown)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no summary"):
        LayerStepHistory().render("update_sparsity")
    empty = LayerStepHistory()
    empty.add({"step": 1, "per_layer": {}})
    with pytest.raises(ValueError, match="no numbered layers"):
        empty.render("update_sparsity")
    with pytest.raises(ValueError, match="max_columns"):
        LayerStepHistory(max_columns=1)
    with pytest.raises(ValueError, match="layer_step_metrics.*'sparsity'"):
        LiveCharts(layer_step_metrics=["sparsity"])


def test_default_scalars_have_no_per_layer_series_and_one_render_serves_every_sink():
    record = summary(5, 64)
    keys = set(scalar_payload(record))
    # tracked_elements is a counter: the run summary's, not a chart
    assert keys == {"gradtrace/update_sparsity", "gradtrace_kind/grad.q", "gradtrace_kind/update.q"}
    with_layers = set(scalar_payload(record, per_layer_curves=True)) - keys
    assert len(with_layers) == 64 * 5 and "gradtrace_layer/layer_07.absorbed" in with_layers  # zero-padded
    charts = LiveCharts()
    first = charts.frame(record)
    assert charts.frame(record) is first  # a second sink gets the same frame, not a second render
    assert first.counters == {"gradtrace/tracked_elements": 10}
    # no per_matrix: no layer x kind
    assert sorted(first.images) == ["gradtrace_heatmap/grad.layer_x_step", "gradtrace_heatmap/update.layer_x_step"]


def test_the_colour_scale_fits_a_narrow_spread():
    """Layers between 13.0% and 14.2% read as different colours, and the image says the range."""
    history = LayerStepHistory()
    values = {step: {str(i): 0.130 + 0.012 * ((i + step) % 4) / 3 for i in range(4)} for step in (1, 2)}
    for step, per_layer in values.items():
        history.add({"step": step, "per_layer": {layer: {"update_sparsity": v} for layer, v in per_layer.items()}})
    image = history.render("update_sparsity")
    everything = [v for per_layer in values.values() for v in per_layer.values()]
    assert (image.vmin, image.vmax) == (min(everything), max(everything))
    shown = pixels(image.png)
    colours = {tuple(shown[y, x]) for layer in image.layers for step in image.steps
               for x, y in [image.cell_center(layer, step)]}
    assert len(colours) == 4  # the four distinct values, four colours (on 0..100% they were one)
    assert_layer_step_image(shown, [{"step": s, "per_layer": {k: {"update_sparsity": v} for k, v in p.items()}}
                                    for s, p in values.items()], "update_sparsity")


def moe_summary() -> dict:
    """A real tracker's summary of two sparse steps of a tiny Qwen2-MoE (routed and shared experts), with the
    counter the session adds (``zero_lr_steps``) and a weight-sync curve and counter."""
    import torch

    from gradtrace import GradTracker
    from gradtrace.tracking.summary import summarize
    from tests.helpers.moe_models import qwen2_moe

    torch.manual_seed(0)
    model = qwen2_moe()
    tracker = GradTracker(model)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * (torch.rand(p.shape, generator=generator) < 0.3)
        tracker.observe_gradients()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-1e-2)
        tracker.observe_update()
    summary = summarize(tracker.measure(), step=2)
    summary["global"].update(zero_lr_steps=0, sync_step_changed=0.25, sync_host_bytes=4096)
    return summary


def test_chart_names_put_the_sparsities_first_and_counters_in_the_run_summary():
    summary = moe_summary()
    frame = LiveCharts().frame(summary)
    charts = [*frame.scalars, *frame.images, HISTOGRAM_KEY]
    assert all(key.count("/") == 1 for key in charts), charts  # <section>/<name>: one section per key, everywhere
    # TensorBoard and MLflow order sections (then cards) alphabetically: the first section is the headline.
    first = min(key.split("/")[0] for key in charts)
    assert first == "gradtrace"
    assert sorted(k.split("/")[1] for k in charts if k.split("/")[0] == first) == [
        "gradient_sparsity", "update_sparsity", "update_sparsity_abs_1e-05", "update_sparsity_rel_0.001"]
    g = summary["global"]
    for metric in ("cancelled", "absorbed", "changed_without_gradient", "no_gradient", "updated"):
        assert frame.scalars[f"gradtrace_split/{metric}"] == g[metric]
    assert frame.scalars["gradtrace_sync/step_changed"] == 0.25
    # Counters are not charts; the run summary has them, with the run log's values.
    counters = ("optimizer_steps", "tracked_elements", "zero_lr_steps", "zero_gradient_steps", "skipped_overflow_steps",
                "nonfinite_gradient_steps", "discarded_gradient_elements", "step_gradient_density_step", "experts",
                "sync_host_bytes")
    assert frame.counters == {f"gradtrace/{name}": g[name] for name in counters}
    assert not [key for key in frame.scalars if key.split("/")[1] in counters]
    # No two charts share the name TensorBoard and MLflow keep when they shorten a title (after the last /).
    names = [key.rsplit("/", 1)[1] for key in charts]
    assert len(set(names)) == len(names), sorted(names)
    # ... not even in their first 17 characters: TensorBoard's narrowest cards, in a 1280-pixel window, show
    # 18 to 20 of them (tests/views/test_browser.py reads the titles as drawn)
    assert len({name[:17] for name in names}) == len(names), sorted(names)
    # Per kind: one section, each card named by its metric (short) and kind (shared_expert as shared).
    for kind, values in summary["per_kind"].items():
        short = kind.replace("shared_expert", "shared")
        assert frame.scalars[f"gradtrace_kind/update.{short}"] == values["update_sparsity"]
        assert frame.scalars[f"gradtrace_kind/grad.{short}"] == values["gradient_sparsity"]
    assert {"expert.gate_up", "shared_expert.gate_up", "shared_expert.down"} <= set(summary["per_kind"])
    # The least and most touched experts: one series each, named by layer and expert.
    extremes = [e for entries in summary["expert_extremes"].values() for e in entries]
    assert len(extremes) == 6
    expert_series = {k: v for k, v in frame.scalars.items() if k.startswith("gradtrace_expert/layer_")}
    assert expert_series == {"gradtrace_expert/layer_{}.expert_{}".format(*e["expert"].split("/")): e["gradient_density"]
                             for e in extremes}
    for name, metric in (("experts_without_gradient", "experts_without_gradient"),
                         ("min_gradient_density", "expert_gradient_density_min"),
                         ("median_gradient_density", "expert_gradient_density_median"),
                         ("max_gradient_density", "expert_gradient_density_max")):
        assert frame.scalars[f"gradtrace_expert/{name}"] == g[metric]
    assert {k for k in frame.images if "layer_x_expert" in k} == {"gradtrace_heatmap/update.layer_x_expert",
                                                                    "gradtrace_heatmap/grad.layer_x_expert"}
    # the final values (every global value and the step) are a run summary too, never a chart
    assert final_summary(summary) == {**{f"gradtrace/final/{k}": v for k, v in g.items() if finite(v)},
                                      "gradtrace/final/step": 2}
