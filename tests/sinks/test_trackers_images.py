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


def test_mlflow_images_are_the_drawn_pngs_at_step_0_named_by_their_step_in_time_order(tmp_path, monkeypatch):
    """MLflow's image card opens at step 0 and shows the last image listed there: every step's image at step 0,
    named by its training step, listed in logging order (so the card shows the newest)."""
    import mlflow

    from gradtrace.sinks.mlflow import MlflowSink

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
    listed = [a.path.split("/")[1] for a in client.list_artifacts(run.info.run_id, "images")]  # as the run page gets them
    folder = Path(client.download_artifacts(run.info.run_id, "images", str(tmp_path / "down")))
    assert len(listed) == 2 * sum(len(images) for images in drawn.values())  # each PNG, and the card's copy
    for key in drawn[1]:
        # the names the run page reads step images by (as MlflowClient.log_image(key=, step=) writes them),
        # the training step in place of the uuid
        pattern = re.escape(f"{key.replace('/', '~')}+step+0+timestamp+") + r"(\d{13})\+training-step-(\d+)\.png"
        images = [(name, re.fullmatch(pattern, name)) for name in listed]
        images = [(name, match) for name, match in images if match]
        assert [int(match.group(2)) for _, match in images] == sorted(drawn)  # listed in logging order
        assert [int(m.group(1)) for _, m in images] == sorted({int(m.group(1)) for _, m in images})  # times increase
        for name, match in images:
            png = drawn[int(match.group(2))][key]
            card = name[:-4] + "+compressed.png"
            assert card in listed
            assert (folder / name).read_bytes() == (folder / card).read_bytes() == png  # as drawn, full size


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
