"""Send summaries to the active Weights & Biases run (the Trainer's, or the user's ``wandb.init``).

The keys are :mod:`.payload`'s, shared by every tracker; W&B's default workspace makes one panel section
per first key segment (``gradtrace/``, ``gradtrace_heatmap/``, ``gradtrace_kind/``, ...). Every series is
plotted against ``step_key`` (the Trainer's ``train/global_step``, or ``gradtrace/step``). The counters
(``gradtrace/optimizer_steps``, ``gradtrace/tracked_elements``...) and an unrecognised MoE layout's
``gradtrace/anatomy_warnings`` go to the run summary, not the charts. At the end: the per-matrix table
(``gradtrace_final/per_matrix``), the final values in the run summary (``gradtrace/final/<name>``), and
the masks file as an artifact of type ``gradtrace-masks`` so another run can fetch it with
``run.use_artifact("<name>:latest")``.

The sink only formats what :meth:`TraceSession.log` already measured (one host sync per logging step,
the tracker's); it is called on logging steps only. When W&B is missing it does nothing, and when W&B
raises the session switches the sink off with one warning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import SUMMARY_NAME
from gradtrace.sinks.payload import ARTIFACT_TYPE as ARTIFACT_TYPE  # re-exported: its home was here
from gradtrace.sinks.payload import (
    HISTOGRAM_KEY,
    SECTIONS,
    TABLE_KEY,
    WARNINGS_KEY,
    LiveCharts,
    anatomy_warnings,
    final_summary,
    finite,
    masks_artifact,
)

EXPERT_TABLE_KEY = "gradtrace_final/per_expert"  # MoE models: one row per routed expert


def default_artifact_name(run: Any) -> str:
    """``gradtrace-masks-<run id>``: unique per run, and a legal artifact name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"gradtrace-masks-{getattr(run, 'id', None) or 'run'}")


def artifact_metadata(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Step, final global values and the run's info (optimizer, lr, dtypes, tracker config): whoever
    fetches the masks needs them to interpret them."""
    metadata = {"step": summary["step"], **{k: v for k, v in summary["global"].items() if finite(v)}}
    exported = Path(run_dir) / SUMMARY_NAME
    if exported.is_file():
        metadata["info"] = json.loads(exported.read_text(encoding="utf-8")).get("info", {})
    return metadata


class WandbSink:
    """Logs to ``run`` or, if none is given, to whatever ``wandb.run`` is active at each log.

    Does nothing while no run is active (W&B not installed, or never initialised): the local run log
    is the record of truth; this is a live view of it.

    Args:
        run: a W&B run; default: ``wandb.run`` at each call (the Trainer opens it after callbacks exist).
        step_key: the x axis of every gradtrace series.
        charts: what to show (:class:`~.payload.LiveCharts`); may be shared with other sinks.
        artifact_name: name of the masks artifact; default ``gradtrace-masks-<run id>``.
    """

    name = "W&B"

    def __init__(self, run: Any | None = None, step_key: str = "gradtrace/step", *,
                 charts: LiveCharts | None = None, artifact_name: str | None = None):
        self._explicit_run = run
        self.step_key = step_key
        self.charts = charts or LiveCharts()
        self.artifact_name = artifact_name
        self._defined_for: Any | None = None
        self._summarized_for: Any | None = None  # the run whose summary has self._summarized
        self._summarized: dict[str, Any] = {}  # counters (and anatomy warnings) as last put in its summary

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

    def log(self, summary: dict[str, Any], step: int) -> None:
        run = self._run()
        if run is None:
            return
        import numpy as np
        import wandb

        self._define_metrics(run)
        frame = self.charts.frame(summary)
        payload: dict[str, Any] = dict(frame.scalars)
        for key in frame.images:  # from the frame's PNG file: W&B copies it (from pixels it would encode again)
            payload[key] = wandb.Image(str(frame.png_file(key)), caption=f"step {frame.step}")
        if frame.histogram is not None:
            counts, edges = frame.histogram
            payload[HISTOGRAM_KEY] = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        payload[self.step_key] = step
        run.log(payload)
        if self._summarized_for is not run:  # a run whose summary has nothing of gradtrace's yet
            self._summarized, self._summarized_for = {}, run
            warnings = anatomy_warnings(summary)
            if warnings:  # once per run: the layout does not change
                run.summary.update({WARNINGS_KEY: warnings})
        changed = {k: v for k, v in frame.counters.items() if self._summarized.get(k) != v}  # most never change
        if changed:
            run.summary.update(changed)
            self._summarized.update(changed)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """Per-matrix table, final values in the run summary, and the masks file as an artifact."""
        run = self._run()
        if run is None or not summary:
            return
        import wandb

        self._define_metrics(run)
        columns, rows = self.charts.table(summary)
        tables = {TABLE_KEY: wandb.Table(columns=columns, data=rows)}
        if summary.get("per_expert"):
            from gradtrace.views.run_data import expert_rows

            columns, rows = expert_rows(summary["per_expert"])
            tables[EXPERT_TABLE_KEY] = wandb.Table(columns=columns, data=rows)
        run.log({**tables, self.step_key: summary["step"]})
        final = final_summary(summary)
        name = self.artifact_name or default_artifact_name(run)
        artifact = masks_artifact(wandb.Artifact, name, run_dir, artifact_metadata(summary, run_dir))
        if artifact is not None:
            run.log_artifact(artifact)
            final["gradtrace/final/masks_artifact"] = name
        run.summary.update(final)
