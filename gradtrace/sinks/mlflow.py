"""Send summaries to the active MLflow run (the Trainer's ``MLflowCallback`` run, or your ``mlflow.start_run``).

Shown: every scalar as a metric against the global step (MLflow needs ``/``-free names only on some
stores; ``gradtrace/update_sparsity`` is accepted by the file and SQL stores), the layer x step and layer x
kind images as step images (``mlflow.log_image(key=..., step=...)``, the run page's image panels), and at
the end the per-matrix table (``gradtrace_final/per_matrix.json``), the final values and the masks file
with the run's summary as artifacts under ``gradtrace/``. MLflow has no histogram type: the cancellation
histogram stays in the run log and the HTML report.

The run is found once, at the first log, and kept by id: the Trainer's callback ends its run in
``on_train_end`` before gradtrace's final export, which still goes to that run.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import MASKS_NAME, SUMMARY_NAME
from gradtrace.sinks.payload import TABLE_KEY, LiveCharts, final_scalars

ARTIFACT_DIR = "gradtrace"
THUMBNAIL_PX = 256  # MLflow's own thumbnail size (mlflow.tracking.multimedia.COMPRESSED_IMAGE_SIZE)


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
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch takes at most 1000 metrics
            client.log_batch(self.run_id, metrics=metrics[start:start + 1000], synchronous=True)
        if frame.images:
            self._log_images(client, frame, step, now)

    def _log_images(self, client: Any, frame: Any, step: int, now: int) -> None:
        """The step's images as MLflow step images, in one upload.

        ``MlflowClient.log_image(key=, step=)`` encodes each image again at PIL's default compression and
        uploads it and its thumbnail one by one; here the frame's PNG is uploaded as it is, with the WebP
        thumbnail the run page shows, under the file names ``log_image`` gives (``images/<key with ~ for
        />+step+<step>+timestamp+<ms>+<id>.png`` and ``...+compressed.webp``: how the UI finds them).
        """
        import tempfile
        import uuid

        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="gradtrace-mlflow-") as folder:
            for key, png in frame.images.items():
                stem = f"{key.replace('/', '~')}+step+{step}+timestamp+{now}+{uuid.uuid4()}"
                (Path(folder) / f"{stem}.png").write_bytes(png)
                pixels = frame.pixels.get(key)
                image = Image.fromarray(pixels) if pixels is not None else Image.open(io.BytesIO(png))
                # a box average by a whole factor: a tenth of thumbnail()'s Lanczos time, as legible at this size
                image = image.reduce(max(1, -(-max(image.size) // THUMBNAIL_PX)))
                image.save(Path(folder) / f"{stem}+compressed.webp", quality=80, method=0)
            client.log_artifacts(self.run_id, folder, artifact_path="images")
        if not self._images_tagged:  # the run page shows its image panels when this tag is set
            client.set_tag(self.run_id, "mlflow.loggedImages", True)
            self._images_tagged = True

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """Per-matrix table, final values, and the masks file (with summary.json) as artifacts."""
        client = self._client()
        if client is None or not summary:
            return
        import time

        from mlflow.entities import Metric

        columns, rows = self.charts.table(summary)
        client.log_table(self.run_id, data={c: [r[i] for r in rows] for i, c in enumerate(columns)},
                         artifact_file=f"{TABLE_KEY}.json")
        now = int(time.time() * 1000)
        final = [Metric(k, float(v), now, summary["step"]) for k, v in final_scalars(summary).items()]
        client.log_batch(self.run_id, metrics=final, synchronous=True)
        for name in (MASKS_NAME, SUMMARY_NAME):
            path = Path(run_dir) / name
            if path.is_file():
                client.log_artifact(self.run_id, str(path), artifact_path=ARTIFACT_DIR)
