"""Send summaries to the current trackio run (the Trainer's ``TrackioCallback`` run, or your ``trackio.init``).

trackio's dashboard (``trackio show``) groups charts by the first key segment, so ``gradtrace/...`` keys
appear as a ``gradtrace`` section with an ``update_sparsity`` chart, as in W&B. Shown: the scalars, the
layer x step and layer x kind images (``trackio.Image``), the cancellation-ratio histogram
(``trackio.Histogram``); the counters (``gradtrace/optimizer_steps``...) and an unrecognised MoE layout's
``gradtrace/anatomy_warnings`` in the run's config (at the first log, the counters again at the end), not
as charts; at the end the per-matrix table (``trackio.Table``), the final values in the config
(``gradtrace/final/<name>``) and the masks file as an artifact of type ``gradtrace-masks``.

The x axis: every gradtrace row is logged at the training step (``run.log(..., step=step)``), so its
points and images sit at the trainer's global step, not at trackio's row counter. The Trainer's
``TrackioCallback`` logs its loss without a step, at that counter, right after gradtrace's row of the same
step; with ``step_key="train/global_step"`` (the Trainer's) the sink leaves the counter at the step it
logged, so the Trainer's row lands on the same step.

The Trainer's callback finishes its trackio run in ``on_train_end``, before gradtrace's final export:
the sink then resumes that run by project and name (``resume="must"``, keeping its config), logs the end,
and finishes it again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gradtrace.sinks.payload import (
    HISTOGRAM_KEY,
    TABLE_KEY,
    WARNINGS_KEY,
    LiveCharts,
    anatomy_warnings,
    final_summary,
    masks_artifact,
    run_summary,
)

TRAINER_STEP_KEY = "train/global_step"


def update_config(run: Any, values: dict[str, Any]) -> None:
    """Add ``values`` to ``run``'s config, sent with its next log.

    trackio sends a run's config once, with its first log (``Run._config_logged``), and stores the whole
    config again whenever a log carries one: clearing the flag makes the next log carry the updated config.
    """
    run.config.update(values)
    if getattr(run, "_config_logged", None) is True:
        run._config_logged = False  # noqa: SLF001 - trackio has no public call to update a config


class TrackioSink:
    """Logs to the trackio run current at each log (nothing while none is; trackio is not even imported
    unless something else did).

    Args:
        step_key: logged with every row; ``"train/global_step"`` means "log beside the Trainer" (above).
        charts: what to show (:class:`~.payload.LiveCharts`); may be shared with other sinks.
        artifact_name: name of the masks artifact; default ``gradtrace-masks-<run name>``.
    """

    name = "trackio"

    def __init__(self, step_key: str = "gradtrace/step", *, charts: LiveCharts | None = None,
                 artifact_name: str | None = None):
        self.step_key = step_key
        self._beside_trainer = step_key == TRAINER_STEP_KEY
        self.charts = charts or LiveCharts()
        self.artifact_name = artifact_name
        self._seen: tuple[str, str] | None = None  # (project, run name) of the run logged to
        self._configured: Any | None = None  # the run whose config has gradtrace's counters

    @staticmethod
    def _current() -> Any | None:
        if "trackio" not in sys.modules:
            return None
        import trackio

        return trackio.context_vars.current_run.get()

    def log(self, summary: dict[str, Any], step: int) -> None:
        run = self._current()
        if run is None:
            return
        import trackio

        self._seen = (run.project, run.name)
        frame = self.charts.frame(summary)
        payload: dict[str, Any] = dict(frame.scalars)
        for key in frame.images:  # from the frame's PNG file: trackio copies it (from pixels it would encode again)
            payload[key] = trackio.Image(str(frame.png_file(key)), caption=f"step {step}")
        if frame.histogram is not None:
            import numpy as np

            counts, edges = frame.histogram
            payload[HISTOGRAM_KEY] = trackio.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        payload[self.step_key] = step
        if self._configured is not run:  # once per run: the config is stored again with each change
            warnings = anatomy_warnings(summary)
            update_config(run, {**frame.counters, **({WARNINGS_KEY: warnings} if warnings else {})})
            self._configured = run
        counter = getattr(run, "_next_step", None)
        run.log(payload, step=step)
        if self._beside_trainer and isinstance(counter, int) and counter <= step:
            # The Trainer's row of this step follows, logged at trackio's counter, which log(step=) just
            # moved to step + 1: set back, that row lands on this step too (a counter ahead is left alone).
            run._next_step = step  # noqa: SLF001 - the counter the Trainer's callback logs at

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """Per-matrix table, final values (in the config) and the masks artifact, into the run logged to."""
        if not summary or (self._current() is None and self._seen is None):
            return
        import trackio

        reopened = False
        run = self._current()
        if run is None:  # the Trainer's callback finished it already: resume it by name, with its config
            project, name = self._seen
            run = trackio.init(project=project, name=name, resume="must", embed=False)
            run.config.update(stored_config(project, name))  # resuming starts an empty config, stored at the next log
            reopened = True
        warnings = anatomy_warnings(summary)
        update_config(run, {**run_summary(summary), **final_summary(summary),
                            **({WARNINGS_KEY: warnings} if warnings else {})})
        columns, rows = self.charts.table(summary)
        run.log({TABLE_KEY: trackio.Table(columns=columns, data=rows), self.step_key: summary["step"]},
                step=summary["step"])
        artifact = masks_artifact(trackio.Artifact, self.artifact_name or f"gradtrace-masks-{run.name}", run_dir,
                                  {"step": summary["step"]})
        if artifact is not None:
            run.log_artifact(artifact)
        if reopened:
            trackio.finish()


def stored_config(project: str, name: str) -> dict[str, Any]:
    """The config trackio's local store holds for a run (empty when there is none, or the store is remote)."""
    try:
        from trackio.sqlite_storage import SQLiteStorage

        return dict(SQLiteStorage.get_run_config(project, name) or {})
    except Exception:  # a remote or older store: the resumed run keeps only what gradtrace adds
        return {}
