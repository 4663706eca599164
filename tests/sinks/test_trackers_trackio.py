"""trackio beside W&B: a real ``transformers.Trainer`` with ``report_to="trackio"``, read back from trackio's
own SQLite store (``SQLiteStorage``) and media folder, compared with the local run log.

trackio 0.43 requires ``pillow<13``: constraints.txt pins pillow 12.3.0 with it, and the ``test`` extra
installs trackio, so CI runs these tests.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

# trackio fixes its store's folder at import: a private one for this test module.
if "trackio" not in __import__("sys").modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="gradtrace-trackio-")
trackio = pytest.importorskip("trackio", reason="trackio is not installed (the `test` extra installs it)")

import gradtrace  # noqa: E402
from gradtrace import read_run_log  # noqa: E402
from gradtrace.sinks.payload import (  # noqa: E402
    HISTOGRAM_KEY,
    TABLE_KEY,
    final_summary,
    layer_step_key,
    run_summary,
    scalar_payload,
)
from gradtrace.sinks.payload import LAYER_STEP_METRICS as LAYER_STEP  # noqa: E402
from tests.helpers.models import Tokens, tiny_llama  # noqa: E402
from tests.helpers.tracker_checks import assert_layer_step_image  # noqa: E402


def test_trainer_report_to_trackio_reads_back_equal_to_run_log(tmp_path):
    from trackio.sqlite_storage import SQLiteStorage
    from trackio.utils import MEDIA_DIR
    from transformers import Trainer, TrainingArguments

    project = f"gradtrace-{tmp_path.name}"
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, logging_steps=2,
                             report_to="trackio", project=project, run_name="tiny", use_cpu=True,
                             save_strategy="no", learning_rate=1e-3, disable_tqdm=True, seed=0,
                             trackio_static_space_id=False)
    callback = gradtrace.GradTraceCallback(strict=True, cancellation="full")
    Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[callback]).train()

    records = {int(r["step"]): r for r in read_run_log(out / "gradtrace")["logs"]}
    history = [records[s] for s in sorted(records)]
    assert sorted(records) == [2, 4, 6]
    rows = SQLiteStorage.get_logs(project, run="tiny")
    # The Trainer's own run: its loss and gradtrace's curves share the train/global_step axis, and trackio's
    # own step axis (the dashboard's default x) is that global step too, not trackio's row counter.
    assert {r["train/global_step"] for r in rows if "train/loss" in r} == {2, 4, 6}
    assert all(r["step"] == r["train/global_step"] for r in rows if "train/loss" in r)
    by_step = {}
    for row in rows:
        if "gradtrace/update_sparsity" in row:
            assert row["train/global_step"] not in by_step
            assert row["step"] == row["train/global_step"]
            by_step[row["train/global_step"]] = row
    assert sorted(by_step) == [2, 4, 6]
    for step, record in records.items():
        row = by_step[step]
        for key, value in scalar_payload(record).items():
            assert row[key] == value, (step, key)
        assert not [k for k in row if k.startswith("gradtrace_layer/")]
        assert not {"gradtrace/optimizer_steps", "gradtrace/tracked_elements"} & set(row)  # counters: the config
        for metric in LAYER_STEP:
            entry = row[layer_step_key(metric)]
            assert entry["_type"] == "trackio.image"
            png = (MEDIA_DIR / entry["file_path"]).read_bytes()
            assert_layer_step_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")),
                                    [r for r in history if r["step"] <= step], metric)
        histogram = row[HISTOGRAM_KEY]
        assert histogram["_type"] == "trackio.histogram"
        assert list(histogram["values"]) == record["cancellation_histogram"]["counts"]

    # At the end (after the Trainer's callback finished the run, gradtrace resumed it): table, finals, masks.
    [final] = [r for r in rows if TABLE_KEY in r]
    assert final["train/global_step"] == final["step"] == 6
    assert final[TABLE_KEY]["_type"] == "trackio.table"
    assert not [k for row in rows for k in row if k.startswith("gradtrace/final/")]  # no one-point charts
    # The counters and final values are in the run's config, beside the Trainer's own (kept through the resume).
    config = SQLiteStorage.get_run_config(project, "tiny")
    assert config["learning_rate"] == 1e-3 and config["max_steps"] == 6
    for key, value in {**run_summary(records[6]), **final_summary(records[6])}.items():
        assert config[key] == value, key
    [artifact] = [a for a in SQLiteStorage.list_artifacts(project) if a["type"] == "gradtrace-masks"]
    manifest = {f["path"]: f for f in SQLiteStorage.get_artifact_manifest(project, artifact["name"], None)["manifest"]}
    masks = (out / "gradtrace" / "masks.safetensors").read_bytes()
    assert manifest["masks.safetensors"]["size"] == len(masks)
    assert manifest["masks.safetensors"]["digest"] == hashlib.sha256(masks).hexdigest()
    assert "summary.json" in manifest
