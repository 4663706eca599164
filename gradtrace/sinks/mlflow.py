"""Send summaries to the active MLflow run (the Trainer's ``MLflowCallback`` run, or your ``mlflow.start_run``).

Shown: every chart scalar as a metric against the global step (the run page's "Model metrics" tab makes
one section per key up to its last ``/``: ``gradtrace`` with the sparsities first, then
``gradtrace_heatmap``, ``gradtrace_kind``...), the layer x step and layer x kind images as step images in
those sections (the newest also at step 0, where MLflow's image cards open: :meth:`MlflowSink._log_images`),
the counters (``gradtrace/optimizer_steps``...) and an unrecognised MoE layout's
``gradtrace/anatomy_warnings`` as run tags; at the end the final values as tags
(``gradtrace/final/<name>``, not one-point charts), and the per-matrix table
(``gradtrace_final/per_matrix.json``), the masks file and the run's summary as artifacts under
``gradtrace/``. MLflow has no histogram type: the cancellation histogram stays in the run log and the
HTML report.

The run is found once, at the first log, and kept by id: the Trainer's callback ends its run in
``on_train_end`` before gradtrace's final export, which still goes to that run.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import MASKS_NAME, SUMMARY_NAME
from gradtrace.sinks.payload import TABLE_KEY, WARNINGS_KEY, LiveCharts, anatomy_warnings, final_summary

ARTIFACT_DIR = "gradtrace"
MAX_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics, params and tags together
MAX_TAG_CHARS = 8000  # and a tag value of at most 8000 characters
# The longest side of the WebP an image card shows: twice MLflow's own (COMPRESSED_IMAGE_SIZE, 256), which drew a
# layer x step image a third of a card wide, its labels unreadable; the card scales it to fit.
THUMBNAIL_PX = 512


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
        self._warned = False
        self._latest: dict[str, str] = {}  # image key -> file name of its newest image, at step 0
        self._tagged: dict[str, str] = {}  # counter tags as last sent

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
        # The run's counters: tags, not one flat or ramping chart each; only those that changed (a tag costs
        # a database round trip, and most counters never change).
        tags = {k: v for k, v in frame.counters.items() if self._tagged.get(k) != str(v)}
        warnings = anatomy_warnings(summary)
        if warnings and not self._warned:  # once: the layout does not change
            tags[WARNINGS_KEY] = warnings
            self._warned = True
        self._log_batch(client, metrics, tags)
        self._tagged.update({k: str(v) for k, v in tags.items()})
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
        ``images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>.png`` and a WebP thumbnail beside it,
        ``...+compressed.webp``, which is what the card shows). Here the uuid is left out, so the names read
        as what they hold, and the frame's PNG is uploaded as drawn (``log_image`` encodes each image again,
        and uploads it and its thumbnail one by one).

        MLflow opens an image card at step 0, where training has logged nothing ("No image logged at this
        step"): each image is also written at step 0 under one name per key, ``...+latest.png``, replaced at
        every logging step, so the card opens on the newest picture (whose title says its step) and its
        slider goes back through the logging steps.
        """
        import tempfile

        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="gradtrace-mlflow-") as folder:
            for key, png in frame.images.items():
                pixels = frame.pixels.get(key)
                image = Image.fromarray(pixels) if pixels is not None else Image.open(io.BytesIO(png))
                # a box average by a whole factor: a tenth of thumbnail()'s Lanczos time, as legible at this size
                image = image.reduce(max(1, -(-max(image.size) // THUMBNAIL_PX)))
                thumbnail = io.BytesIO()
                image.save(thumbnail, format="WEBP", quality=80, method=0)
                for stem in self._image_stems(key, step, now):
                    (Path(folder) / f"{stem}.png").write_bytes(png)
                    (Path(folder) / f"{stem}+compressed.webp").write_bytes(thumbnail.getvalue())
            client.log_artifacts(self.run_id, folder, artifact_path="images")
        if not self._images_tagged:  # the run page shows its image panels when this tag is set
            client.set_tag(self.run_id, "mlflow.loggedImages", True)
            self._images_tagged = True

    def _image_stems(self, key: str, step: int, now: int) -> list[str]:
        """File names (without extension) of ``key``'s image at ``step``: the newest at step 0 (its name
        fixed at the first write, so each write replaces it), and the step's own."""
        name = key.replace("/", "~")  # as log_image does: no folders under images/
        latest = self._latest.setdefault(key, f"{name}+step+0+timestamp+{now}+latest")
        return [latest] if step == 0 else [latest, f"{name}+step+{step}+timestamp+{now}"]

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """Final values as tags (not one-point charts); per-matrix table and the masks file (with
        summary.json) as artifacts."""
        client = self._client()
        if client is None or not summary:
            return
        columns, rows = self.charts.table(summary)
        client.log_table(self.run_id, data={c: [r[i] for r in rows] for i, c in enumerate(columns)},
                         artifact_file=f"{TABLE_KEY}.json")
        self._log_batch(client, [], final_summary(summary))
        for name in (MASKS_NAME, SUMMARY_NAME):
            path = Path(run_dir) / name
            if path.is_file():
                client.log_artifact(self.run_id, str(path), artifact_path=ARTIFACT_DIR)
