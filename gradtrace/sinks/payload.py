"""What every tracker shows, decided once: which chart keys exist, what goes to the run summary instead,
and the images and histogram per step.

Each tracker module (W&B, TensorBoard, MLflow, trackio) only translates a :class:`Frame` into its own
calls, so a user who switches tracker finds the same panels under the same keys. The keys are chosen for
how the dashboards lay them out: TensorBoard groups cards by the key's first segment and MLflow by all but
its last, both in alphabetical order, and both shorten a card's title from the left (TensorBoard keeps what
follows the last ``/``, MLflow shows only that). So every key is ``<section>/<name>`` with a ``name`` that no
other chart shares, and the sections sort the headline first:

- ``gradtrace/<metric>``: the headline sparsities, gradient and update sparsity and its tolerance variants
  (:func:`is_headline`). These names are a contract.
- ``gradtrace_expert/...`` (MoE models): experts without gradient, the min / median / max expert gradient
  density (``min_gradient_density``...), and the gradient density of the
  :data:`~gradtrace.anatomy.grouping.EXTREME_EXPERTS` least and most touched routed experts, each under
  its own name (``gradtrace_expert/layer_3.expert_5``): the series says which expert it follows.
- ``gradtrace_heatmap/<label>.layer_x_step`` (``update``, ``grad``: :data:`METRIC_LABELS`): an image per
  logging step, all layers (rows) x the steps so far (columns), for :data:`LAYER_STEP_METRICS`: the
  per-layer picture at any depth, live; ``<label>.layer_x_kind`` the layer x kind image of the current
  step, and MoE models ``<label>.layer_x_expert`` (:data:`HEATMAP_METRICS`).
- ``gradtrace_kind/<label>.<kind>``: per module kind, for :data:`KIND_METRICS`, the metric shortened
  (``gradtrace_kind/update.q``, ``gradtrace_kind/grad.expert.down``: :func:`kind_key`); the number of
  kinds does not grow with depth.
- ``gradtrace_layer/layer_<NN>.<label>``: one scalar series per layer and metric, only with
  ``per_layer_curves=True`` (5 charts per layer: 320 for a 64-layer model, which nobody reads).
- ``gradtrace_split/<metric>``: where the elements went (cancelled, absorbed, changed without gradient,
  no gradient, updated, zero lr...), the step's gradient density, and the histogram of |Σg|/Σ|g|
  (:data:`HISTOGRAM_KEY`).
- ``gradtrace_sync/<metric>``: the weight-sync budget's curves, when it is observed (``step_changed``,
  ``window_bytes_dense``...: the run log's ``sync_...`` names, less the prefix).

Counts that only grow or never change (``optimizer_steps``, ``tracked_elements``, ``zero_lr_steps``, the
skipped-step counts...: :func:`is_counter`) are no charts: they go to the run summary as
``gradtrace/<name>`` (:func:`run_summary`), and at the end every global value with the step as
``gradtrace/final/<name>`` (:func:`final_summary`): the W&B summary, MLflow tags, trackio's run config,
a TensorBoard text. An unrecognised MoE layout's ``anatomy_warnings`` go there too, once.

Every per-layer number stays reachable without per-layer charts: the run log, the layer x step images, and
the final per-matrix table. :func:`chart_keys_bound` states how many chart keys a logging step gets.

At the end, trackers with artifacts (W&B, trackio) get the same one, built by :func:`masks_artifact`: type
``gradtrace-masks``, the masks file and ``summary.json``.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradtrace.anatomy.grouping import EXTREME_EXPERTS
from gradtrace.formats.run_dir import MASKS_NAME, SUMMARY_NAME

BREAKDOWN_METRICS = ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed", "changed_without_gradient")
KIND_METRICS = ("gradient_sparsity", "update_sparsity")
# How a per-kind curve or an image names its metric (kind_key, layer_step_key...): short and first, so what
# tells two cards apart still shows when a dashboard cuts the title to the card's width.
METRIC_LABELS = {"gradient_sparsity": "grad", "update_sparsity": "update", "cancelled": "cancelled",
                 "absorbed": "absorbed", "changed_without_gradient": "changed_no_grad"}
# Global values renamed in their section, for the same reason (the run log keeps the left-hand names).
CHART_NAMES = {"expert_gradient_density_min": "min_gradient_density",
               "expert_gradient_density_median": "median_gradient_density",
               "expert_gradient_density_max": "max_gradient_density"}
# Drawn live by default: the two sparsities (each image costs a render per logging step; the other
# breakdown metrics are one layer_step_metrics=... away, and always in the run log).
LAYER_STEP_METRICS = ("update_sparsity", "gradient_sparsity")
HEATMAP_METRICS = ("update_sparsity", "gradient_sparsity")

GLOBAL_SECTION = "gradtrace"
EXPERT_SECTION = "gradtrace_expert"
HEATMAP_SECTION = "gradtrace_heatmap"
KIND_SECTION = "gradtrace_kind"
LAYER_SECTION = "gradtrace_layer"
SPLIT_SECTION = "gradtrace_split"
SYNC_SECTION = "gradtrace_sync"
FINAL_SECTION = "gradtrace_final"  # the end-of-run tables
HISTOGRAM_KEY = f"{SPLIT_SECTION}/cancellation_ratio"
TABLE_KEY = f"{FINAL_SECTION}/per_matrix"
WARNINGS_KEY = f"{GLOBAL_SECTION}/anatomy_warnings"  # in the run summary, not a chart
ARTIFACT_TYPE = "gradtrace-masks"
SECTIONS = (GLOBAL_SECTION, EXPERT_SECTION, HEATMAP_SECTION, KIND_SECTION, LAYER_SECTION, SPLIT_SECTION,
            SYNC_SECTION, FINAL_SECTION)

# Global values that count steps or elements: the same, or one more, at every logging step (a chart of them
# is a flat line or a ramp). Names ending in _steps / _elements are counters too (is_counter).
COUNTERS = frozenset({"optimizer_steps", "tracked_elements", "step_gradient_density_step", "experts",
                      "sync_host_bytes"})


def finite(value: Any) -> bool:
    """A number a tracker can plot (not a bool, not None, not NaN / inf)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_counter(metric: str) -> bool:
    """A global value for the run summary, not a chart: a count of steps or elements, or a fixed size."""
    return metric in COUNTERS or metric.endswith(("_steps", "_elements"))


def is_headline(metric: str) -> bool:
    """Gradient sparsity, update sparsity and its tolerance variants: the ``gradtrace/`` section."""
    return metric in ("gradient_sparsity", "update_sparsity") or metric.startswith(("update_sparsity_abs_",
                                                                                     "update_sparsity_rel_"))


def global_key(metric: str) -> str | None:
    """The chart key of a global value, or None for a counter (:func:`is_counter`: the run summary)."""
    if is_counter(metric):
        return None
    if is_headline(metric):
        return f"{GLOBAL_SECTION}/{metric}"
    if metric.startswith("expert"):
        return f"{EXPERT_SECTION}/{CHART_NAMES.get(metric, metric)}"
    if metric.startswith("sync_"):
        return f"{SYNC_SECTION}/{metric.removeprefix('sync_')}"
    return f"{SPLIT_SECTION}/{metric}"


def kind_key(kind: str, metric: str) -> str:
    """``gradtrace_kind/<metric label>.<kind>`` (``gradtrace_kind/update.q``): one section for every kind.

    The label comes first and is short (:data:`METRIC_LABELS`): a card title cut to its width keeps what tells
    it apart, where ``shared_expert.gate_up.update_sparsity`` and ``...gradient_sparsity`` read the same.
    For the same reason ``shared_expert`` kinds are ``shared`` here (``gradtrace_kind/update.shared.gate_up``)."""
    return f"{KIND_SECTION}/{label(metric)}.{kind.replace('shared_expert', 'shared')}"


def label(metric: str) -> str:
    """The short name of a per-layer metric in chart keys (:data:`METRIC_LABELS`)."""
    return METRIC_LABELS.get(metric, metric)


def layer_key(layer: str, metric: str, width: int) -> str:
    """``gradtrace_layer/layer_<NN>.<label>`` (``layer_07.update``): zero-padded so charts sort in layer order."""
    return f"{LAYER_SECTION}/layer_{layer.zfill(width)}.{label(metric)}"


def layer_step_key(metric: str) -> str:
    """``gradtrace_heatmap/update.layer_x_step``: the layer x step image of ``metric``."""
    return f"{HEATMAP_SECTION}/{label(metric)}.layer_x_step"


def layer_kind_key(metric: str) -> str:
    return f"{HEATMAP_SECTION}/{label(metric)}.layer_x_kind"


def layer_expert_key(metric: str) -> str:
    return f"{HEATMAP_SECTION}/{label(metric)}.layer_x_expert"


def _padded(part: str, width: int) -> str:
    return part.zfill(width) if part.isdigit() else part


def expert_series_key(expert: str, widths: tuple[int, int] = (1, 1)) -> str:
    """``gradtrace_expert/layer_<L>.expert_<E>`` for the run log's ``"<layer>/<expert>"``; ``widths``: the
    zero padding of layer and expert numbers, so the series sort in model order."""
    layer, _, index = expert.rpartition("/")
    return f"{EXPERT_SECTION}/layer_{_padded(layer, widths[0])}.expert_{_padded(index, widths[1])}"


def _expert_widths(summary: Mapping[str, Any]) -> tuple[int, int]:
    keys = [key.rpartition("/") for key in summary.get("per_expert") or ()]
    return (max((len(layer) for layer, _, _ in keys if layer.isdigit()), default=1),
            max((len(index) for _, _, index in keys if index.isdigit()), default=1))


def scalar_payload(summary: Mapping[str, Any], *, per_layer_curves: bool = False,
                   kind_metrics: Sequence[str] = KIND_METRICS) -> dict[str, float]:
    """The scalar charts of one summary: global curves (counters left out), per-kind curves, the named
    extreme experts of a MoE model, and per-layer curves if asked."""
    payload = {}
    for metric, value in summary["global"].items():
        key = global_key(metric)
        if key is not None and finite(value):
            payload[key] = value
    for kind, values in summary["per_kind"].items():
        payload.update({kind_key(kind, m): values[m] for m in kind_metrics if finite(values.get(m))})
    widths = _expert_widths(summary)
    for entries in (summary.get("expert_extremes") or {}).values():
        payload.update({expert_series_key(entry["expert"], widths): entry["gradient_density"] for entry in entries})
    if per_layer_curves:
        width = max((len(layer) for layer in summary["per_layer"]), default=1)
        for layer, values in summary["per_layer"].items():
            payload.update({layer_key(layer, m, width): values[m] for m in BREAKDOWN_METRICS if finite(values.get(m))})
    return payload


def run_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``gradtrace/<counter>``: the counters of one summary (:func:`is_counter`), for a run's summary."""
    return {f"{GLOBAL_SECTION}/{k}": v for k, v in summary["global"].items() if is_counter(k) and finite(v)}


def final_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``gradtrace/final/<metric>``: every last global value (charts and counters) and the step."""
    final = {f"{GLOBAL_SECTION}/final/{k}": v for k, v in summary["global"].items() if finite(v)}
    final[f"{GLOBAL_SECTION}/final/step"] = summary["step"]
    return final


def anatomy_warnings(summary: Mapping[str, Any]) -> str | None:
    """The summary's ``anatomy_warnings`` (an unrecognised MoE layout) as one text, or None."""
    warnings = summary.get("anatomy_warnings") or []
    return "\n".join(str(w) for w in warnings) or None


def histogram_of(summary: Mapping[str, Any]) -> tuple[list[int], list[float]] | None:
    """``(counts, edges)`` of the cancellation-ratio histogram, or None when it counted nothing
    (``cancellation="off"``, or no element with a gradient yet)."""
    histogram = summary.get("cancellation_histogram") or {}
    counts, edges = list(histogram.get("counts") or []), list(histogram.get("edges") or [])
    if sum(counts) > 0 and len(edges) == len(counts) + 1:
        return counts, edges
    return None


def chart_keys_bound(global_charts: int, kinds: int, *, kind_metrics: int = len(KIND_METRICS),
                     layer_step_metrics: int = len(LAYER_STEP_METRICS),
                     heatmap_metrics: int = len(HEATMAP_METRICS), moe: bool = False) -> int:
    """Chart keys of one logging step by default: independent of the model's depth and number of experts.

    ``global_charts`` (the finite global values that are not counters, about 10) + ``kinds`` x
    ``kind_metrics`` + one image key per layer x step and layer x kind metric + the histogram: 10 global
    charts and 10 kinds give 10 + 20 + 2 + 2 + 1 = 35. A MoE model (``moe``, at least
    :data:`~gradtrace.anatomy.grouping.EXTREME_EXPERTS` routed experts) adds the layer x expert images
    (``heatmap_metrics`` more) and the named series of the least and most touched experts (that many of
    each); over a run, a series starts for each expert that joins them.
    """
    experts = heatmap_metrics + 2 * EXTREME_EXPERTS if moe else 0
    return global_charts + kinds * kind_metrics + layer_step_metrics + heatmap_metrics + 1 + experts


def masks_artifact(artifact_class: Any, name: str, run_dir: str | Path, metadata: dict[str, Any]) -> Any | None:
    """The end-of-run artifact: the masks file, and ``summary.json`` beside it when written; None when the
    run wrote no masks file (nothing to fetch).

    ``artifact_class`` is the tracker's (``wandb.Artifact``, ``trackio.Artifact``): both take
    ``(name, type=, metadata=, description=)`` and ``add_file(path, name=)``, so one recipe serves both.
    """
    masks = Path(run_dir) / MASKS_NAME
    if not masks.is_file():
        return None
    artifact = artifact_class(name, type=ARTIFACT_TYPE, metadata=metadata,
                              description="gradtrace masks: which elements received a gradient / changed")
    artifact.add_file(str(masks), name=MASKS_NAME)
    exported = Path(run_dir) / SUMMARY_NAME
    if exported.is_file():
        artifact.add_file(str(exported), name=SUMMARY_NAME)
    return artifact


def file_stem(key: str) -> str:
    """A chart key as a file name a person can read (``gradtrace_heatmap~update.layer_x_step``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key.replace("/", "~"))


@dataclass
class Frame:
    """Everything a tracker shows for one logging step; images are PNG bytes, by key, drawn once.

    ``drawn`` holds the same images as drawn (:class:`~gradtrace.views.raster.GridImage`: their size, and
    their pixels on demand) and :meth:`png_file` as files, so each tracker takes the form it stores
    without decoding or encoding them again (a PNG encode per tracker and image cost more than drawing it).
    """

    step: int
    scalars: dict[str, float]
    counters: dict[str, Any] = field(default_factory=dict)  # run_summary(): for the run's summary, not charts
    images: dict[str, bytes] = field(default_factory=dict)
    histogram: tuple[list[int], list[float]] | None = None
    drawn: dict[str, Any] = field(default_factory=dict)  # GridImage by key
    folder: Path | None = None  # where png_file writes; one folder per frame

    @property
    def pixels(self) -> dict[str, Any]:
        """Each image as an (height, width, 3) uint8 RGB array, what its PNG decodes to (made at each ask)."""
        return {key: image.pixels for key, image in self.drawn.items()}

    def png_file(self, key: str) -> Path:
        """The PNG of ``key`` as a file, written at the first ask (the trackers that take a path copy it)."""
        if self.folder is None:
            raise ValueError("this frame has no folder for image files (made outside LiveCharts)")
        path = self.folder / f"{file_stem(key)}+step+{self.step}.png"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.images[key])
        return path


class LiveCharts:
    """Turns each summary into a :class:`Frame`, keeping the per-layer history the layer x step images need.

    One instance can serve several sinks (the Trainer callback shares one between the trackers it
    reports to): the images of a step are rendered once, however many trackers show them.

    Args:
        per_layer_curves: also log ``gradtrace_layer/layer_<NN>.<label>`` scalar series (5 per layer).
        heatmaps: render the images (layer x step per metric, layer x kind of the current step); each
            is redrawn at every logging step (a few tens of ms each: ``benchmarks/live_charts.py``).
        kind_metrics: the per-kind curves logged.
        layer_step_metrics: the per-layer metrics drawn as layer x step images.
    """

    def __init__(self, *, per_layer_curves: bool = False, heatmaps: bool = True,
                 kind_metrics: Iterable[str] = KIND_METRICS, layer_step_metrics: Iterable[str] = LAYER_STEP_METRICS):
        from gradtrace.views.live import LayerStepHistory

        self.per_layer_curves = per_layer_curves
        self.heatmaps = heatmaps
        self.kind_metrics = tuple(kind_metrics)
        # one name alone is one metric (tuple() would split it into letters)
        self.layer_step_metrics = (layer_step_metrics,) if isinstance(layer_step_metrics, str) else tuple(layer_step_metrics)
        unknown = sorted(set(self.layer_step_metrics) - set(BREAKDOWN_METRICS))
        if unknown:
            raise ValueError(f"layer_step_metrics: unknown metric(s) {unknown}; choose from {BREAKDOWN_METRICS}")
        self.history = LayerStepHistory()
        self._last: tuple[int, int, Frame] | None = None  # (id(summary), step, frame): one render per step
        self._files: Path | None = None  # image files of the current and previous frame (trackers copy them)

    def _frame_folder(self, step: int) -> Path:
        """A fresh folder for this frame's image files; the frame before the previous one's is removed."""
        if self._files is None:
            self._files = Path(tempfile.mkdtemp(prefix="gradtrace-frames-"))
            weakref.finalize(self, shutil.rmtree, self._files, True)
        if self._last is not None and self._last[2].folder is not None:
            for old in self._files.iterdir():
                if old != self._last[2].folder:
                    shutil.rmtree(old, ignore_errors=True)
        return self._files / f"{step}-{id(object())}"

    def frame(self, summary: Mapping[str, Any]) -> Frame:
        """The frame of ``summary`` (rendered once per summary, however many sinks ask)."""
        step = int(summary["step"])
        if self._last is not None and self._last[0] == id(summary) and self._last[1] == step:
            return self._last[2]
        self.history.add(summary)
        frame = Frame(step=step, histogram=histogram_of(summary), counters=run_summary(summary),
                      scalars=scalar_payload(summary, per_layer_curves=self.per_layer_curves,
                                             kind_metrics=self.kind_metrics))
        if self.heatmaps:
            from gradtrace.views.live import expert_image, layer_kind_image, layer_step_images

            drawn = {layer_step_key(metric): image
                     for metric, image in layer_step_images(self.history, self.layer_step_metrics).items()}
            if summary.get("per_matrix"):
                for metric in HEATMAP_METRICS:
                    drawn[layer_kind_key(metric)] = layer_kind_image(summary, metric)
            if summary.get("per_expert"):  # MoE models: layer x expert, one image per metric
                for metric in HEATMAP_METRICS:
                    drawn[layer_expert_key(metric)] = expert_image(summary, metric)
            frame.images = {key: image.png for key, image in drawn.items()}
            frame.drawn = drawn
            frame.folder = self._frame_folder(step)
        self._last = (id(summary), step, frame)
        return frame

    @staticmethod
    def table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
        """The final per-matrix table: ``(columns, rows)``, one row per parameter matrix."""
        from gradtrace.views.run_data import matrix_rows

        return matrix_rows(summary["per_matrix"])
