"""Send summaries to the active MLflow run (the Trainer's ``MLflowCallback`` run, or your ``mlflow.start_run``).

Shown: every chart scalar as a metric against the global step (the run page's "Model metrics" tab makes
one section per key up to its last ``/``: ``gradtrace`` with the sparsities first, then
``gradtrace_heatmap``, ``gradtrace_kind``...), the layer x step and layer x kind images as step images in
those sections (at MLflow's step 0, where its image cards open, named by their training step:
:meth:`MlflowSink._log_images`), the counters (``gradtrace/optimizer_steps``...) and an unrecognised MoE
layout's ``gradtrace/anatomy_warnings`` as run tags, at the first log and the counters again at the end (a
tag update is a database commit of its own: a third of the sink's time when a counter was re-tagged at
every step); at the end the final values as tags
(``gradtrace/final/<name>``, not one-point charts), and the per-matrix table
(``gradtrace_final/per_matrix.json``), the masks file and the run's summary as artifacts under
``gradtrace/``. MLflow has no histogram type: the cancellation histogram stays in the run log and the
HTML report.

The run is found once, at the first log, and kept by id: the Trainer's callback ends its run in
``on_train_end`` before gradtrace's final export, which still goes to that run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import MASKS_NAME, SUMMARY_NAME
from gradtrace.sinks.payload import (
    TABLE_KEY,
    WARNINGS_KEY,
    LiveCharts,
    anatomy_warnings,
    final_summary,
    run_summary,
)

ARTIFACT_DIR = "gradtrace"
MAX_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics, params and tags together
MAX_TAG_CHARS = 8000  # and a tag value of at most 8000 characters


class MlflowSink:
    """Logs to ``run_id`` or, if none is given, to the run active at the first log.

    Args:
        run_id: an MLflow run id; default: ``mlflow.active_run()`` when the first summary arrives (nothing
            is logged while no run is active, and mlflow is not even imported unless something else did).
        charts: what to show (:class:`~.payload.LiveCharts`); may be shared with other sinks.
    """

    name = "MLflow"

    def __init__(self, run_id: str | None = None, *, charts: LiveCharts | None = None):
        self.run_id = run_id
        self.charts = charts or LiveCharts()
        self._images_tagged = False
        self._tagged = False  # the counters (and anatomy warnings) are tags of the run
        self._last_ms = 0  # the time in the previous step's image names

    def _client(self) -> Any | None:
        if self.run_id is None:
            if "mlflow" not in sys.modules:  # nobody started a run: mlflow was never imported
                return None
            import mlflow

            active = mlflow.active_run()
            if active is None:
                return None
            self.run_id = active.info.run_id
        from mlflow.tracking import MlflowClient

        return MlflowClient()

    def log(self, summary: dict[str, Any], step: int) -> None:
        client = self._client()
        if client is None:
            return
        import time

        from mlflow.entities import Metric

        frame = self.charts.frame(summary)
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in frame.scalars.items()]
        # The run's counters: tags, not one flat or ramping chart each; once here, again at the end.
        tags: dict[str, Any] = {}
        if not self._tagged:
            warnings = anatomy_warnings(summary)
            tags = {**frame.counters, **({WARNINGS_KEY: warnings} if warnings else {})}
            self._tagged = True
        self._log_batch(client, metrics, tags)
        if frame.images:
            self._log_images(client, frame, step, now)

    def _log_batch(self, client: Any, metrics: list[Any], tags: dict[str, Any]) -> None:
        """``metrics`` and ``tags`` in as few ``log_batch`` calls as MLflow's limits allow (tags in the first)."""
        from mlflow.entities import RunTag

        entities = [RunTag(key, str(value)[:MAX_TAG_CHARS]) for key, value in tags.items()]
        size = MAX_BATCH - len(entities)
        client.log_batch(self.run_id, metrics=metrics[:size], tags=entities, synchronous=True)
        for start in range(size, len(metrics), MAX_BATCH):
            client.log_batch(self.run_id, metrics=metrics[start:start + MAX_BATCH], synchronous=True)

    def _log_images(self, client: Any, frame: Any, step: int, now: int) -> None:
        """The step's images as MLflow step images, in one upload.

        The run page finds step images by file name (what ``MlflowClient.log_image(key=, step=)`` writes:
        ``images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>.png``, and beside it the smaller image the
        card shows, ``...+compressed.webp``: a 256-pixel WebP, in which a layer x step image filled a third
        of its card, unreadable). Its image card opens at step 0, where training has logged nothing ("No
        image logged at this step"), and shows one image per step: the last listed (names sort by time).

        So every image goes to MLflow's step 0, named by the training step it shows in place of the uuid
        (``...+step+0+timestamp+<ms>+training-step-40.png``: readable, and in time order): the card opens on
        the newest (whose title says its step), and Artifacts > images lists every step's. The frame's PNG is
        uploaded as drawn, and is also the card's image (``...+compressed.png``: the run page takes a PNG
        there too), at its full size; nothing is encoded again (``log_image`` encodes each image twice).
        """
        import tempfile

        now = max(now, self._last_ms + 1)  # strictly later than the previous step's: the newest sorts last
        self._last_ms = now
        with tempfile.TemporaryDirectory(prefix="gradtrace-mlflow-") as folder:
            for key, png in frame.images.items():
                stem = f"{key.replace('/', '~')}+step+0+timestamp+{now}+training-step-{step}"  # no folders: / as ~
                for name in (f"{stem}.png", f"{stem}+compressed.png"):
                    (Path(folder) / name).write_bytes(png)
            client.log_artifacts(self.run_id, folder, artifact_path="images")
        if not self._images_tagged:  # the run page shows its image panels when this tag is set
            client.set_tag(self.run_id, "mlflow.loggedImages", True)
            self._images_tagged = True

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """The counters as they end and the final values as tags (not one-point charts); per-matrix table and
        the masks file (with summary.json) as artifacts."""
        client = self._client()
        if client is None or not summary:
            return
        columns, rows = self.charts.table(summary)
        client.log_table(self.run_id, data={c: [r[i] for r in rows] for i, c in enumerate(columns)},
                         artifact_file=f"{TABLE_KEY}.json")
        self._log_batch(client, [], {**run_summary(summary), **final_summary(summary)})
        for name in (MASKS_NAME, SUMMARY_NAME):
            path = Path(run_dir) / name
            if path.is_file():
                client.log_artifact(self.run_id, str(path), artifact_path=ARTIFACT_DIR)
