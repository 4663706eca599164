"""What every tracker shows, decided once: which chart keys exist, and the images and histogram per step.

Each tracker module (W&B, TensorBoard, MLflow, trackio) only translates a :class:`Frame` into its own
calls, so a user who switches tracker finds the same panels under the same keys:

- ``gradtrace/<metric>``: every finite global value (gradient sparsity, update sparsity and its
  tolerance variants, cancelled, absorbed, changed without gradient, counters...). These names are a contract.
- ``gradtrace_kind/<kind>/<metric>``: per module kind, for :data:`KIND_METRICS` (the number of kinds
  does not grow with depth).
- ``gradtrace_layer_step/<metric>``: an image per logging step, all layers (rows) x the steps so far
  (columns), for :data:`LAYER_STEP_METRICS`: the per-layer picture at any depth, live.
- ``gradtrace_heatmap/<metric>``: the layer x kind image of the current step (update / gradient sparsity);
  MoE models also the layer x expert image (``gradtrace_heatmap/expert_<metric>``).
- ``gradtrace_expert/least_touched_<i>`` and ``most_touched_<i>`` (MoE models): the gradient density of
  the i-th least / most touched routed expert, i = 1..3 (``anatomy.grouping.EXTREME_EXPERTS``). Order
  statistics, like the min / median / max under ``gradtrace/``: the number of keys does not grow with the
  number of experts. Which expert holds each rank is named in the run log (``expert_extremes``) and in
  ``gradtrace watch``.
- ``gradtrace_cancellation/ratio``: the histogram of |Σg|/Σ|g|.
- ``gradtrace_layer/<NN>/<metric>``: one scalar series per layer and metric, only with
  ``per_layer_curves=True`` (5 charts per layer: 320 for a 64-layer model, which nobody reads).

Every per-layer number stays reachable without them: the run log, the layer x step images, and the final
per-matrix table. :func:`chart_keys_bound` states how many distinct keys a run gets by default.

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
# Drawn live by default: the two sparsities (each image costs a render per logging step; the other
# breakdown metrics are one layer_step_metrics=... away, and always in the run log).
LAYER_STEP_METRICS = ("update_sparsity", "gradient_sparsity")
HEATMAP_METRICS = ("update_sparsity", "gradient_sparsity")

GLOBAL_SECTION = "gradtrace"
KIND_SECTION = "gradtrace_kind"
LAYER_SECTION = "gradtrace_layer"
LAYER_STEP_SECTION = "gradtrace_layer_step"
HEATMAP_SECTION = "gradtrace_heatmap"
EXPERT_SECTION = "gradtrace_expert"
HISTOGRAM_KEY = "gradtrace_cancellation/ratio"
TABLE_KEY = "gradtrace_final/per_matrix"
ARTIFACT_TYPE = "gradtrace-masks"
SECTIONS = (GLOBAL_SECTION, KIND_SECTION, LAYER_SECTION, LAYER_STEP_SECTION, HEATMAP_SECTION, EXPERT_SECTION,
            "gradtrace_cancellation", "gradtrace_final")


def finite(value: Any) -> bool:
    """A number a tracker can plot (not a bool, not None, not NaN / inf)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def layer_key(layer: str, width: int) -> str:
    """``gradtrace_layer/<NN>``: zero-padded so panels sort in layer order."""
    return f"{LAYER_SECTION}/{layer.zfill(width)}"


def scalar_payload(summary: Mapping[str, Any], *, per_layer_curves: bool = False,
                   kind_metrics: Sequence[str] = KIND_METRICS) -> dict[str, float]:
    """The scalar charts of one summary: global curves, per-kind curves, the ranked experts of a MoE
    model, and per-layer curves if asked."""
    payload = {f"{GLOBAL_SECTION}/{key}": value for key, value in summary["global"].items() if finite(value)}
    for kind, values in summary["per_kind"].items():
        payload.update({f"{KIND_SECTION}/{kind}/{m}": values[m] for m in kind_metrics if finite(values.get(m))})
    for side, entries in (summary.get("expert_extremes") or {}).items():
        payload.update({f"{EXPERT_SECTION}/{side}_{rank}": entry["gradient_density"]
                        for rank, entry in enumerate(entries, 1)})
    if per_layer_curves:
        width = max((len(layer) for layer in summary["per_layer"]), default=1)
        for layer, values in summary["per_layer"].items():
            prefix = layer_key(layer, width)
            payload.update({f"{prefix}/{m}": values[m] for m in BREAKDOWN_METRICS if finite(values.get(m))})
    return payload


def histogram_of(summary: Mapping[str, Any]) -> tuple[list[int], list[float]] | None:
    """``(counts, edges)`` of the cancellation-ratio histogram, or None when it counted nothing
    (``cancellation="off"``, or no element with a gradient yet)."""
    histogram = summary.get("cancellation_histogram") or {}
    counts, edges = list(histogram.get("counts") or []), list(histogram.get("edges") or [])
    if sum(counts) > 0 and len(edges) == len(counts) + 1:
        return counts, edges
    return None


def final_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """``gradtrace/final/<metric>``: the last global values, for a run's summary / final metrics."""
    final = {f"{GLOBAL_SECTION}/final/{k}": v for k, v in summary["global"].items() if finite(v)}
    final[f"{GLOBAL_SECTION}/final/step"] = summary["step"]
    return final


def chart_keys_bound(global_keys: int, kinds: int, *, kind_metrics: int = len(KIND_METRICS),
                     layer_step_metrics: int = len(LAYER_STEP_METRICS),
                     heatmap_metrics: int = len(HEATMAP_METRICS), moe: bool = False) -> int:
    """Distinct per-step chart keys by default: independent of the model's depth and number of experts.

    ``global_keys`` (about 16) + ``kinds`` x ``kind_metrics`` + one image key per layer x step and layer x
    kind metric + the histogram: 16 global values and 10 kinds give 16 + 20 + 2 + 2 + 1 = 41. A MoE model
    (``moe``, at least :data:`~gradtrace.anatomy.grouping.EXTREME_EXPERTS` routed experts) adds the layer x
    expert images (``heatmap_metrics`` more) and the ranked-expert series (that many least and most touched).
    """
    experts = heatmap_metrics + 2 * EXTREME_EXPERTS if moe else 0
    return global_keys + kinds * kind_metrics + layer_step_metrics + heatmap_metrics + 1 + experts


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
    """A chart key as a file name a person can read (``gradtrace_layer_step~update_sparsity``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key.replace("/", "~"))


@dataclass
class Frame:
    """Everything a tracker shows for one logging step; images are PNG bytes, by key, drawn once.

    ``pixels`` holds the same images as RGB arrays and :meth:`png_file` as files, so each tracker takes
    the form it stores without decoding or encoding them again (a PNG encode per tracker and image cost
    more than drawing it).
    """

    step: int
    scalars: dict[str, float]
    images: dict[str, bytes] = field(default_factory=dict)
    histogram: tuple[list[int], list[float]] | None = None
    pixels: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where png_file writes; one folder per frame

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
        per_layer_curves: also log ``gradtrace_layer/<NN>/<metric>`` scalar series (5 per layer).
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
        frame = Frame(step=step, histogram=histogram_of(summary),
                      scalars=scalar_payload(summary, per_layer_curves=self.per_layer_curves,
                                             kind_metrics=self.kind_metrics))
        if self.heatmaps:
            from gradtrace.views.live import expert_image, layer_kind_image, layer_step_images

            drawn = {f"{LAYER_STEP_SECTION}/{metric}": image
                     for metric, image in layer_step_images(self.history, self.layer_step_metrics).items()}
            if summary.get("per_matrix"):
                for metric in HEATMAP_METRICS:
                    drawn[f"{HEATMAP_SECTION}/{metric}"] = layer_kind_image(summary, metric)
            if summary.get("per_expert"):  # MoE models: layer x expert, one image per metric
                for metric in HEATMAP_METRICS:
                    drawn[f"{HEATMAP_SECTION}/expert_{metric}"] = expert_image(summary, metric)
            frame.images = {key: image.png for key, image in drawn.items()}
            frame.pixels = {key: image.pixels for key, image in drawn.items()}
            frame.folder = self._frame_folder(step)
        self._last = (id(summary), step, frame)
        return frame

    @staticmethod
    def table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
        """The final per-matrix table: ``(columns, rows)``, one row per parameter matrix."""
        from gradtrace.views.run_data import matrix_rows

        return matrix_rows(summary["per_matrix"])
