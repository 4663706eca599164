"""Send summaries to the current trackio run (the Trainer's ``TrackioCallback`` run, or your ``trackio.init``).

trackio's dashboard (``trackio show``) groups charts by the first key segment, so ``gradtrace/...`` keys
appear as a ``gradtrace`` section with an ``update_sparsity`` chart, as in W&B. Shown: the scalars, the
layer x step and layer x kind images (``trackio.Image``), the cancellation-ratio histogram
(``trackio.Histogram``), and at the end the per-matrix table (``trackio.Table``) and the masks file as an
artifact of type ``gradtrace-masks``.

The x axis: the Trainer's ``TrackioCallback`` logs without a step (trackio counts its own) and carries
``train/global_step`` as a value; with that step key the sink does the same, so both can be plotted
against ``train/global_step``. With any other step key (the plain loop's ``gradtrace/step``) the step is
passed to trackio as its step.

The Trainer's callback finishes its trackio run in ``on_train_end``, before gradtrace's final export:
the sink then resumes that run by project and name (``resume="must"``), logs the end, and finishes it again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gradtrace.sinks.payload import HISTOGRAM_KEY, TABLE_KEY, LiveCharts, final_scalars, masks_artifact

TRAINER_STEP_KEY = "train/global_step"


class TrackioSink:
    """Logs to the trackio run current at each log (nothing while none is; trackio is not even imported
    unless something else did).

    Args:
        step_key: logged with every row; ``"train/global_step"`` means "log as the Trainer does" (above).
        charts: what to show (:class:`~.payload.LiveCharts`); may be shared with other sinks.
        artifact_name: name of the masks artifact; default ``gradtrace-masks-<run name>``.
    """

    name = "trackio"

    def __init__(self, step_key: str = "gradtrace/step", *, charts: LiveCharts | None = None,
                 artifact_name: str | None = None):
        self.step_key = step_key
        self._own_steps = step_key != TRAINER_STEP_KEY
        self.charts = charts or LiveCharts()
        self.artifact_name = artifact_name
        self._seen: tuple[str, str] | None = None  # (project, run name) of the run logged to

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
        run.log(payload, step=step if self._own_steps else None)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """Per-matrix table, final values and the masks artifact, into the run logged to."""
        if not summary or (self._current() is None and self._seen is None):
            return
        import trackio

        reopened = False
        run = self._current()
        if run is None:  # the Trainer's callback finished it already: resume it by name
            project, name = self._seen
            run = trackio.init(project=project, name=name, resume="must", embed=False)
            reopened = True
        columns, rows = self.charts.table(summary)
        run.log({TABLE_KEY: trackio.Table(columns=columns, data=rows), **final_scalars(summary),
                 self.step_key: summary["step"]}, step=summary["step"] if self._own_steps else None)
        artifact = masks_artifact(trackio.Artifact, self.artifact_name or f"gradtrace-masks-{run.name}", run_dir,
                                  {"step": summary["step"]})
        if artifact is not None:
            run.log_artifact(artifact)
        if reopened:
            trackio.finish()
