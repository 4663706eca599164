"""Send summaries to the active Weights & Biases run (the Trainer's, or the user's ``wandb.init``).

W&B's default workspace makes one panel section per first key segment, so each view gets its own:

- ``gradtrace/<metric>``: the global curves (gradient sparsity, update sparsity and its tolerance
  variants, cancelled, absorbed, changed without gradient, ...). These names are a contract.
- ``gradtrace_kind/<kind>/<metric>`` and ``gradtrace_layer/<NN>/<metric>``: per module kind, per layer.
- ``gradtrace_heatmap/update_sparsity``, ``gradtrace_heatmap/gradient_sparsity``: layer x kind images.
- ``gradtrace_cancellation/ratio``: histogram of |Σg|/Σ|g| over the elements whose sums are kept.
- ``gradtrace_final/per_matrix``: at the end, a table with one row per parameter matrix.
- MoE models: ``gradtrace_heatmap/expert_<metric>`` (layer x expert images), ``gradtrace_final/per_expert``
  (a table at the end); their headline curves are global values (``gradtrace/experts_without_gradient``...).

Every series is plotted against ``step_key`` (the Trainer's ``train/global_step``, or ``gradtrace/step``).
At the end the masks file is logged as an artifact of type ``gradtrace-masks`` so another run can fetch it
with ``run.use_artifact("<name>:latest")``.

The sink only formats what :meth:`TraceSession.log` already measured (one host sync per logging step,
the tracker's); it is called on logging steps only. It stays simple on purpose: when W&B is missing it
does nothing, and when W&B raises the session switches the sink off with one warning.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import MASKS_NAME, SUMMARY_NAME

BREAKDOWN_METRICS = ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed", "changed_without_gradient")
SECTIONS = ("gradtrace", "gradtrace_kind", "gradtrace_layer", "gradtrace_heatmap", "gradtrace_cancellation",
            "gradtrace_final")
HEATMAP_METRICS = ("update_sparsity", "gradient_sparsity")
HISTOGRAM_KEY = "gradtrace_cancellation/ratio"
TABLE_KEY = "gradtrace_final/per_matrix"
EXPERT_TABLE_KEY = "gradtrace_final/per_expert"
ARTIFACT_TYPE = "gradtrace-masks"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_summary(summary: dict[str, Any]) -> dict[str, float]:
    """The scalar W&B payload for one summary: global curves and per-kind / per-layer breakdowns."""
    payload = {f"gradtrace/{key}": value for key, value in summary["global"].items() if _finite(value)}
    for kind, values in summary["per_kind"].items():
        payload.update({f"gradtrace_kind/{kind}/{m}": values[m] for m in BREAKDOWN_METRICS if _finite(values.get(m))})
    width = max((len(layer) for layer in summary["per_layer"]), default=1)
    for layer, values in summary["per_layer"].items():
        name = layer.zfill(width)  # zero-padded so panels sort in layer order
        payload.update({f"gradtrace_layer/{name}/{m}": values[m] for m in BREAKDOWN_METRICS if _finite(values.get(m))})
    return payload


def default_artifact_name(run: Any) -> str:
    """``gradtrace-masks-<run id>``: unique per run, and a legal artifact name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"gradtrace-masks-{getattr(run, 'id', None) or 'run'}")


class WandbSink:
    """Logs to ``run`` or, if none is given, to whatever ``wandb.run`` is active at each log.

    Does nothing while no run is active (W&B not installed, or never initialised): the local run log
    is the record of truth; this is a live view of it.

    Args:
        run: a W&B run; default: ``wandb.run`` at each call (the Trainer opens it after callbacks exist).
        step_key: the x axis of every gradtrace series.
        heatmaps: log the layer x kind heatmap images (a matplotlib render, ~0.1 s per logging step).
        artifact_name: name of the masks artifact; default ``gradtrace-masks-<run id>``.
    """

    name = "W&B"

    def __init__(self, run: Any | None = None, step_key: str = "gradtrace/step", *, heatmaps: bool = True,
                 artifact_name: str | None = None):
        self._explicit_run = run
        self.step_key = step_key
        self.heatmaps = heatmaps
        self.artifact_name = artifact_name
        self._defined_for: Any | None = None

    def _run(self) -> Any | None:
        if self._explicit_run is not None:
            run = self._explicit_run
        else:
            try:
                import wandb
            except ImportError:
                return None
            run = wandb.run
        # wandb.init(mode="disabled") returns a run that drops everything: skip rendering for it.
        return None if getattr(run, "disabled", False) is True else run

    def _define_metrics(self, run: Any) -> None:
        if self._defined_for is run:
            return
        run.define_metric(self.step_key)
        for section in SECTIONS:
            run.define_metric(f"{section}/*", step_metric=self.step_key)
        self._defined_for = run

    def media(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The non-scalar payload: heatmap images and the cancellation-ratio histogram."""
        import numpy as np
        import wandb

        payload: dict[str, Any] = {}
        if self.heatmaps and summary.get("per_matrix"):
            from PIL import Image

            from gradtrace.views.report import heatmap_png

            for metric in HEATMAP_METRICS:
                png = heatmap_png(summary, metric)
                payload[f"gradtrace_heatmap/{metric}"] = wandb.Image(Image.open(io.BytesIO(png)),
                                                                    caption=f"step {summary.get('step')}")
            if summary.get("per_expert"):
                from gradtrace.views.report import expert_heatmap_png

                for metric in HEATMAP_METRICS:
                    png = expert_heatmap_png(summary, metric)
                    payload[f"gradtrace_heatmap/expert_{metric}"] = wandb.Image(
                        Image.open(io.BytesIO(png)), caption=f"step {summary.get('step')}")
        histogram = summary.get("cancellation_histogram") or {}
        counts, edges = histogram.get("counts") or [], histogram.get("edges") or []
        if sum(counts) > 0 and len(edges) == len(counts) + 1:  # nothing counted with cancellation="off"
            payload[HISTOGRAM_KEY] = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        return payload

    def log(self, summary: dict[str, Any], step: int) -> None:
        run = self._run()
        if run is None:
            return
        self._define_metrics(run)
        payload: dict[str, Any] = flatten_summary(summary)
        payload.update(self.media(summary))
        payload[self.step_key] = step
        run.log(payload)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """Per-matrix table, final values in the run summary, and the masks file as an artifact."""
        run = self._run()
        if run is None or not summary:
            return
        import wandb

        from gradtrace.views.report import expert_rows, matrix_rows

        self._define_metrics(run)
        columns, rows = matrix_rows(summary["per_matrix"])
        tables = {TABLE_KEY: wandb.Table(columns=columns, data=rows)}
        if summary.get("per_expert"):
            columns, rows = expert_rows(summary["per_expert"])
            tables[EXPERT_TABLE_KEY] = wandb.Table(columns=columns, data=rows)
        run.log({**tables, self.step_key: summary["step"]})
        final = {f"gradtrace/final/{k}": v for k, v in summary["global"].items() if _finite(v)}
        final["gradtrace/final/step"] = summary["step"]
        masks = Path(run_dir) / MASKS_NAME
        if masks.is_file():
            name = self.artifact_name or default_artifact_name(run)
            metadata = {"step": summary["step"], **{k: v for k, v in summary["global"].items() if _finite(v)}}
            exported = Path(run_dir) / SUMMARY_NAME
            if exported.is_file():
                # The run's info (optimizer, lr, dtypes, tracker config) travels with its masks: whoever
                # fetches them needs it to interpret them.
                metadata["info"] = json.loads(exported.read_text(encoding="utf-8")).get("info", {})
            artifact = wandb.Artifact(name, type=ARTIFACT_TYPE, metadata=metadata,
                                      description="gradtrace masks: which elements received a gradient / changed")
            artifact.add_file(str(masks), name=MASKS_NAME)
            if exported.is_file():
                artifact.add_file(str(exported), name=SUMMARY_NAME)
            run.log_artifact(artifact)
            final["gradtrace/final/masks_artifact"] = name
        run.summary.update(final)
