"""Each logging step's images are drawn once and stored as drawn: TensorBoard, MLflow and W&B keep the very
PNG bytes of the shared frame (no decode and second encode per tracker, which cost more than the drawing).

Real stores, read back with each tracker's own reader: TensorBoard's ``EventAccumulator``, ``MlflowClient``
on SQLite, and the files of a W&B offline run.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from gradtrace import GradTracker
from gradtrace.sinks.payload import LiveCharts
from gradtrace.tracking.summary import summarize

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def summaries(steps: int = 3) -> list[dict]:
    """A real tracker's summaries of a few sparse-gradient steps on a 3-layer Llama."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    tracker = GradTracker(model)
    generator = torch.Generator().manual_seed(1)
    out = []
    for step in range(1, steps + 1):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * (torch.rand(p.shape, generator=generator) < 0.1)
        tracker.observe_gradients()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-1e-2)
        tracker.observe_update()
        out.append(summarize(tracker.measure(), step=step))
    return out


def test_frame_pixels_are_its_pngs():
    charts = LiveCharts()
    for summary in summaries(2):
        frame = charts.frame(summary)
        assert frame.images and set(frame.pixels) == set(frame.images)
        for key, png in frame.images.items():
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), frame.pixels[key])
            assert frame.png_file(key).read_bytes() == png


def test_tensorboard_stores_the_drawn_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradtrace.sinks.tensorboard import TensorBoardSink

    charts = LiveCharts()
    sink = TensorBoardSink(str(tmp_path), charts=charts)
    drawn = {}
    for summary in summaries():
        sink.log(summary, summary["step"])
        drawn[summary["step"]] = dict(charts.frame(summary).images)
    sink.finish(summary, tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["images"]) == set(drawn[1])
    for key in drawn[1]:
        logged = events.Images(key)
        assert [e.step for e in logged] == sorted(drawn)
        for event in logged:
            assert event.encoded_image_string == drawn[event.step][key]
            width, height = Image.open(io.BytesIO(event.encoded_image_string)).size
            assert (event.height, event.width) == (height, width)


def test_mlflow_step_images_are_the_drawn_pngs_with_thumbnails(tmp_path, monkeypatch):
    import mlflow

    from gradtrace.sinks.mlflow import THUMBNAIL_PX, MlflowSink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment("images", artifact_location=(tmp_path / "a").as_uri())
    charts = LiveCharts()
    sink = MlflowSink(charts=charts)
    drawn = {}
    with mlflow.start_run(experiment_id=experiment) as run:
        for summary in summaries():
            sink.log(summary, summary["step"])
            drawn[summary["step"]] = dict(charts.frame(summary).images)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run.info.run_id).data.tags.get("mlflow.loggedImages") == "True"
    folder = Path(client.download_artifacts(run.info.run_id, "images", str(tmp_path / "down")))
    files = sorted(p.name for p in folder.iterdir())
    keys = set(drawn[1])
    # each PNG and its thumbnail at each step, and once more at step 0 (the newest, replaced at each step)
    assert len(files) == 2 * sum(len(images) for images in drawn.values()) + 2 * len(keys)
    last = max(drawn)
    for step, images in [*drawn.items(), (0, drawn[last])]:
        for key, png in images.items():
            # the names the run page reads step images by (as MlflowClient.log_image(key=, step=) writes
            # them), with no uuid: key, step and time, and "latest" for the newest at step 0
            stem = f"{key.replace('/', '~')}+step+{step}+timestamp+"
            pngs = [f for f in files if f.startswith(stem) and f.endswith(".png")]
            thumbs = [f for f in files if f.startswith(stem) and f.endswith("+compressed.webp")]
            assert len(pngs) == 1 and thumbs == [pngs[0][:-4] + "+compressed.webp"]
            assert re.fullmatch(re.escape(stem) + r"\d{13}" + (r"\+latest" if step == 0 else "") + r"\.png", pngs[0])
            assert (folder / pngs[0]).read_bytes() == png
            thumb = Image.open(folder / thumbs[0])
            width, height = Image.open(io.BytesIO(png)).size
            assert max(thumb.size) <= THUMBNAIL_PX
            assert abs(thumb.size[0] / thumb.size[1] - width / height) < 0.05


def test_wandb_media_are_the_drawn_pngs(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from gradtrace.sinks.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    charts = LiveCharts()
    run = wandb.init(project="images", dir=str(tmp_path), mode="offline")
    try:
        sink = WandbSink(run, charts=charts)
        drawn = []
        for summary in summaries(2):
            sink.log(summary, summary["step"])
            drawn += charts.frame(summary).images.values()
        media = sorted((Path(run.dir) / "media" / "images").rglob("*.png"))
    finally:
        run.finish()
    assert sorted(p.read_bytes() for p in media) == sorted(drawn)
