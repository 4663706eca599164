"""TensorBoard and MLflow beside W&B, read back from each tracker's own store.

A real ``transformers.Trainer`` with ``report_to=["tensorboard", "mlflow"]`` runs its own
``TensorBoardCallback`` and ``MLflowCallback``; gradtrace follows ``args.report_to`` into the same runs.
The TensorBoard event files are read with TensorBoard's ``EventAccumulator``, the MLflow run with
``MlflowClient`` on a SQLite store; every value is compared with the local run log (the record of truth).
A 64-layer model checks the default chart-key bound in W&B, TensorBoard, MLflow and trackio at once
(trackio read back from its own SQLite store).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gradtrace
from gradtrace import GradTraceWarning, read_run_log
from gradtrace.sinks.payload import (
    BREAKDOWN_METRICS,
    HISTOGRAM_KEY,
    TABLE_KEY,
    chart_keys_bound,
    final_summary,
    finite,
    is_counter,
    layer_step_key,
    run_summary,
    scalar_payload,
)
from tests.helpers.models import Tokens, tiny_llama
from tests.helpers.tensorboard_events import tb_events
from tests.helpers.tracker_checks import assert_layer_step_image

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

# trackio fixes its store's folder at import: a private one, unless another test module already chose one.
if "trackio" not in __import__("sys").modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="gradtrace-trackio-")

from gradtrace.sinks.payload import LAYER_STEP_METRICS as LAYER_STEP  # noqa: E402

KEY_BOUND = 60  # stated in README: distinct chart keys per run by default, at any depth
# How chart keys name the per-layer metrics (short, so a card title cut to its width still tells them apart).
LABELS = {"gradient_sparsity": "grad", "update_sparsity": "update", "cancelled": "cancelled", "absorbed": "absorbed",
          "changed_without_gradient": "changed_no_grad"}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A SQLite MLflow store under tmp_path (MLflow 3 refuses the plain file store by default)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gradtrace-tests")
    import mlflow

    mlflow.set_tracking_uri(uri)
    # Artifacts (the logged images) under tmp_path too: a SQLite store's default is ./mlruns in the cwd.
    mlflow.MlflowClient(uri).create_experiment("gradtrace-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("gradtrace-tests")  # in this store (mlflow keeps the previous test's experiment id)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """The markdown tables of a TensorBoard text, by the bold title above each: rows of cells, header first."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("**"):
            title = line.split("**")[1]
        elif line.startswith("|") and not line.startswith("|---"):
            tables.setdefault(title, []).append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


HEADERS = {"gradient_sparsity": "gradient", "update_sparsity": "update", "update_sparsity_abs_1e-05": "abs 1e-05",
           "update_sparsity_rel_0.001": "rel 0.001", "no_gradient": "no gradient",
           "changed_without_gradient": "changed without gradient", "updated": "updated", "cancelled": "cancelled",
           "absorbed": "absorbed", "zero_lr": "zero lr"}


def assert_per_matrix_markdown(text: str, per_matrix: dict, estimated: set[tuple[str, str]] = frozenset()) -> None:
    """TensorBoard's per-matrix text: four narrow tables, every value of the run log in % with two decimals,
    ``≈`` exactly on the ``estimated`` (matrix, metric) pairs."""
    tables = markdown_tables(text)
    assert list(tables) == ["sparsity per matrix", "update sparsity within a tolerance",
                            "where each matrix's elements went: changed or not",
                            "where each matrix's elements went: a gradient, yet unchanged"]
    shown = {}
    for rows in tables.values():
        assert len(rows[0]) <= 4  # narrow: TensorBoard breaks numbers mid-digit in a table wider than its card
        assert [row[0] for row in rows[1:]] == list(per_matrix)  # one row per matrix, in model order
        for row in rows[1:]:
            shown.update({(row[0], head): cell for head, cell in zip(rows[0][1:], row[1:], strict=True)})
    for name, values in per_matrix.items():
        assert shown[(name, "elements")] == f"{values['numel']:,}"
        for metric, value in values.items():
            if metric in ("numel", "gradient_unchanged"):
                continue
            mark = "≈" if (name, metric) in estimated else ""
            assert shown[(name, HEADERS[metric])] == f"{mark}{100 * value:.2f}", (name, metric)


def test_trainer_report_to_tensorboard_and_mlflow_read_back_equal_to_run_log(tmp_path, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient
    from transformers import Trainer, TrainingArguments

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, logging_steps=2,
                             report_to=["tensorboard", "mlflow"], use_cpu=True, save_strategy="no",
                             learning_rate=1e-3, disable_tqdm=True, seed=0)
    callback = gradtrace.GradTraceCallback(strict=True, cancellation="full")
    Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[callback]).train()

    log = read_run_log(out / "gradtrace")
    records = {int(r["step"]): r for r in log["logs"]}
    assert sorted(records) == [2, 4, 6]
    history = [records[s] for s in sorted(records)]

    # --- TensorBoard: gradtrace's event file sits in the Trainer's run directory, beside its own.
    [run] = [d for d in (out / "runs").iterdir() if d.is_dir()]
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the Trainer's and gradtrace's
    tb = tb_events(run)
    tags = tb.Tags()
    assert "train/loss" in tags["scalars"]  # same run as the Trainer's own curves
    assert [e.step for e in tb.Scalars("train/loss")] == [2, 4, 6]
    for step, record in records.items():
        for key, value in scalar_payload(record).items():
            [event] = [e for e in tb.Scalars(key) if e.step == step]
            assert event.value == np.float32(value), (key, step)  # TensorBoard stores float32
    assert not [t for t in tags["scalars"] if t.startswith("gradtrace_layer/")]  # default: no per-layer series
    gradtrace_scalars = {t for t in tags["scalars"] if t.startswith("gradtrace")}
    assert gradtrace_scalars == set(scalar_payload(records[6]))
    assert not {"gradtrace/optimizer_steps", "gradtrace/tracked_elements", "gradtrace/zero_lr_steps",
                "gradtrace/final/update_sparsity"} & gradtrace_scalars  # counters and finals: no charts
    # ... but the run summary, as text: the counters at the first logging step, every final value at the end
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in tb.Tensors("gradtrace/run_summary/text_summary")}
    assert sorted(texts) == [2, 6]
    assert f"| gradtrace/optimizer_steps | {records[2]['global']['optimizer_steps']} |" in texts[2]
    assert f"| gradtrace/tracked_elements | {records[2]['global']['tracked_elements']} |" in texts[2]
    assert f"| gradtrace/final/update_sparsity | {records[6]['global']['update_sparsity']:.6g} |" in texts[6]
    for metric in LAYER_STEP:
        images = tb.Images(layer_step_key(metric))
        assert [i.step for i in images] == [2, 4, 6]
        for image in images:
            assert_layer_step_image(decode(image.encoded_image_string),
                                    [r for r in history if r["step"] <= image.step], metric)
    assert [i.step for i in tb.Images("gradtrace_heatmap/update.layer_x_kind")] == [2, 4, 6]
    histograms = tb.Histograms(HISTOGRAM_KEY)
    assert [e.step for e in histograms] == [2, 4, 6]  # else the loop below would pass on no histogram at all
    for event in histograms:
        counts = records[event.step]["cancellation_histogram"]["counts"]
        assert event.histogram_value.bucket == counts and event.histogram_value.num == sum(counts) > 0
    [table] = tb.Tensors(f"{TABLE_KEY}/text_summary")
    assert table.step == 6
    assert_per_matrix_markdown(table.tensor_proto.string_val[0].decode(), records[6]["per_matrix"])

    # --- MLflow: the run the Trainer's MLflowCallback opened (its loss), gradtrace's keys inside.
    client = MlflowClient(mlflow_store)
    [experiment] = [e for e in client.search_experiments() if e.name == "gradtrace-tests"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    run_id = mlrun.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6]  # the Trainer's own key
    for key in scalar_payload(records[6]):
        by_step = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert by_step == {s: float(scalar_payload(r)[key]) for s, r in records.items()
                           if key in scalar_payload(r)}, key
    assert not {"gradtrace/optimizer_steps", "gradtrace/final/update_sparsity"} & set(client.get_run(run_id).data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run_id, "images")]
    for metric in LAYER_STEP:
        for step in (2, 4, 6):  # each at MLflow's step 0 (where its image card opens), named by its step
            [path] = [p for p in artifacts if p.startswith(f"images/gradtrace_heatmap~{LABELS[metric]}.layer_x_step+step+0+")
                      and p.endswith(f"+training-step-{step}.png")]
            png = Path(client.download_artifacts(run_id, path, str(tmp_path / "dl"))).read_bytes()
            assert_layer_step_image(decode(png), [r for r in history if r["step"] <= step], metric)
    # Counters and final values: run tags (strings), equal to the run log's.
    tags = client.get_run(run_id).data.tags
    assert tags["gradtrace/optimizer_steps"] == str(records[6]["global"]["optimizer_steps"])
    assert tags["gradtrace/tracked_elements"] == str(records[6]["global"]["tracked_elements"])
    for metric, value in records[6]["global"].items():
        if finite(value):
            assert tags[f"gradtrace/final/{metric}"] == str(value), metric
    assert tags["gradtrace/final/step"] == "6"
    masks = Path(client.download_artifacts(run_id, "gradtrace/masks.safetensors", str(tmp_path / "dl")))
    assert masks.read_bytes() == (out / "gradtrace" / "masks.safetensors").read_bytes()
    table = Path(client.download_artifacts(run_id, f"{TABLE_KEY}.json", str(tmp_path / "dl"))).read_text()
    assert "model.layers.1.mlp.down_proj.weight" in table


def test_64_layers_stay_under_the_chart_key_bound_in_every_tracker(tmp_path, mlflow_store, monkeypatch):
    """A 64-layer model by default: a few dozen keys, none per layer, in W&B, TensorBoard, MLflow and trackio."""
    import mlflow
    import wandb
    from mlflow.tracking import MlflowClient

    trackio = pytest.importorskip("trackio", reason="trackio is not installed (the `test` extra installs it)")
    from trackio.sqlite_storage import SQLiteStorage

    from tests.helpers.wandb_file import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    for layers in (64,):
        root = tmp_path / f"L{layers}"
        model = tiny_llama(layers, hidden=16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        wandb.init(mode="offline", dir=root, project="gradtrace-tests")
        mlflow.start_run(run_name=f"L{layers}")
        project = f"gradtrace-{tmp_path.name}"  # the store is shared by this module's tests: one project each
        trackio.init(project=project, name=f"L{layers}", embed=False)
        tracer = gradtrace.trace(model, optimizer, root / "run", log_every=1, strict=True,
                                 report_to=["wandb", "tensorboard", "mlflow", "trackio"])
        for tokens in Tokens(4).rows.split(2):
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        tracer.finish()
        run_id = mlflow.active_run().info.run_id
        mlflow.end_run()
        wandb.finish()
        trackio.finish()

        wb = read_run(root)
        wb_keys = {k for row in wb.history for k in row if k.startswith("gradtrace") and k != "gradtrace/step"
                   and k != TABLE_KEY}
        tb = tb_events(root / "run" / "tensorboard").Tags()
        tb_keys = set(tb["scalars"]) | set(tb["images"]) | set(tb["histograms"])
        client = MlflowClient(mlflow_store)
        ml_metrics = set(client.get_run(run_id).data.metrics)
        ml_images = {p.path.split("/")[1].split("+")[0].replace("~", "/")
                     for p in client.list_artifacts(run_id, "images")}
        # Every tracker's final values and counters are in its run summary, not in its charts.
        tr_keys = {k for row in SQLiteStorage.get_logs(project, run=f"L{layers}") for k in row
                   if k.startswith("gradtrace") and k not in ("gradtrace/step", TABLE_KEY)}
        record = read_run_log(root / "run")["logs"][-1]
        assert len(record["per_layer"]) == layers
        kinds = len(record["per_kind"])
        charted = [k for k, v in record["global"].items() if finite(v) and not is_counter(k)]
        expected = chart_keys_bound(len(charted), kinds)
        assert len(wb_keys) == len(tb_keys) == expected <= KEY_BOUND, (layers, len(wb_keys), len(tb_keys))
        # MLflow has no histogram type: the same keys less the cancellation histogram.
        assert ml_metrics | ml_images == wb_keys - {HISTOGRAM_KEY}
        assert tr_keys == wb_keys  # trackio has scalars, images and histograms: every key
        # The bound does not grow with depth: the number of kinds and global values is the model's, not its layers'.
        assert not [k for k in wb_keys if k.startswith("gradtrace_layer/")]
        # The counters and final values: W&B's summary, MLflow's tags, trackio's config.
        ends = {**run_summary(record), **final_summary(record)}
        ml_tags = client.get_run(run_id).data.tags
        tr_config = SQLiteStorage.get_run_config(project, f"L{layers}")
        for key, value in ends.items():
            assert wb.summary[key] == value and ml_tags[key] == str(value) and tr_config[key] == value, key


def test_per_layer_curves_restore_the_per_layer_series_in_tensorboard(tmp_path):
    model = tiny_llama(3, hidden=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracer = gradtrace.trace(model, optimizer, tmp_path / "run", log_every=1, strict=True, heatmaps=False,
                             report_to="tensorboard", per_layer_curves=True)
    for tokens in Tokens(6).rows.split(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    tb = tb_events(tmp_path / "run" / "tensorboard")
    logs = read_run_log(tmp_path / "run")["logs"]
    assert not tb.Tags()["images"]  # heatmaps=False: no rendering at all
    layers = ("0", "1", "2")
    assert all(sorted(r["per_layer"]) == list(layers) for r in logs)
    # Every per-layer metric that the run log has a finite value of, and nothing else, is a series.
    expected = {f"gradtrace_layer/layer_{layer}.{LABELS[metric]}" for layer in layers for metric in BREAKDOWN_METRICS
                if any(finite(r["per_layer"][layer].get(metric)) for r in logs)}
    assert {t for t in tb.Tags()["scalars"] if t.startswith("gradtrace_layer/")} == expected
    assert len(expected) == len(layers) * len(BREAKDOWN_METRICS)  # this run has all 5 per layer
    for layer in layers:
        for metric in BREAKDOWN_METRICS:
            series = {e.step: e.value for e in tb.Scalars(f"gradtrace_layer/layer_{layer}.{LABELS[metric]}")}
            assert series == {r["step"]: np.float32(r["per_layer"][layer][metric]) for r in logs
                              if finite(r["per_layer"][layer].get(metric))}, (layer, metric)


# Not the defaults (LAYER_STEP), so a keyword dropped on the way to LiveCharts would show the defaults instead.
CHOSEN_LAYER_STEP = ("cancelled", "absorbed")


def assert_only_chosen_layer_step_images(tb, history: list[dict]) -> None:
    """The layer x step images are exactly CHOSEN_LAYER_STEP's, each showing the run log."""
    images = {t for t in tb.Tags()["images"] if t.endswith(".layer_x_step")}
    assert images == {f"gradtrace_heatmap/{LABELS[m]}.layer_x_step" for m in CHOSEN_LAYER_STEP}
    steps = [int(r["step"]) for r in history]
    for metric in CHOSEN_LAYER_STEP:
        logged = tb.Images(layer_step_key(metric))
        assert [i.step for i in logged] == steps
        assert_layer_step_image(decode(logged[-1].encoded_image_string), history, metric)


def test_trainer_callback_draws_the_chosen_layer_step_metrics(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    with pytest.raises(ValueError, match="layer_step_metrics: unknown metric"):
        gradtrace.GradTraceCallback(layer_step_metrics=("update_sparsity", "nonsense"))
    assert gradtrace.GradTraceCallback(layer_step_metrics="cancelled").charts.layer_step_metrics == ("cancelled",)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             report_to="tensorboard", use_cpu=True, save_strategy="no",
                             learning_rate=1e-3, disable_tqdm=True, seed=0)
    callback = gradtrace.GradTraceCallback(strict=True, cancellation="full", layer_step_metrics=CHOSEN_LAYER_STEP)
    Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    history = read_run_log(out / "gradtrace")["logs"]
    assert [r["step"] for r in history] == [2, 4]
    [run] = [d for d in (out / "runs").iterdir() if d.is_dir()]
    assert_only_chosen_layer_step_images(tb_events(run), history)


def test_trace_draws_the_chosen_layer_step_metrics(tmp_path):
    model = tiny_llama(2, hidden=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="layer_step_metrics: unknown metric"):
        gradtrace.trace(model, optimizer, tmp_path / "bad", layer_step_metrics=("nonsense",))
    tracer = gradtrace.trace(model, optimizer, tmp_path / "run", log_every=1, strict=True, report_to="tensorboard",
                             config=gradtrace.TrackerConfig(cancellation="full"), layer_step_metrics=CHOSEN_LAYER_STEP)
    for tokens in Tokens(6).rows.split(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    log = read_run_log(tmp_path / "run")
    assert "layer_step_metrics" not in log["info"]  # a chart option, not a run-info entry
    assert [r["step"] for r in log["logs"]] == [1, 2, 3]
    assert_only_chosen_layer_step_images(tb_events(tmp_path / "run" / "tensorboard"), log["logs"])


def test_report_to_names_are_checked_and_a_missing_tracker_only_warns(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no sink for \\['comet'\\]"):
        gradtrace.trace(model, optimizer, tmp_path / "a", report_to=["tensorboard", "comet"])
    with pytest.raises(ValueError, match="report_to"):
        gradtrace.GradTraceCallback(report_to="neptun")

    import gradtrace.sinks.select as select

    real = select.importlib.util.find_spec
    monkeypatch.setattr(select.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer = gradtrace.trace(model, optimizer, tmp_path / "b", log_every=1, report_to=["mlflow", "tensorboard"])
    messages = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(messages) == 1 and "mlflow" in messages[0] and "gradtrace[mlflow]" in messages[0]
    assert [s.name for s in tracer.session.sinks] == ["TensorBoard"]  # the other tracker goes on
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    tracer.finish()
    assert tb_events(tmp_path / "b" / "tensorboard").Scalars("gradtrace/update_sparsity")[0].step == 1


def test_anatomy_warnings_reach_every_tracker_once(tmp_path, mlflow_store, monkeypatch):
    """An unrecognised MoE layout (experts without a router): its warning in each tracker's run summary."""
    import mlflow
    import wandb
    from mlflow.tracking import MlflowClient

    trackio = pytest.importorskip("trackio", reason="trackio is not installed (the `test` extra installs it)")
    from trackio.sqlite_storage import SQLiteStorage

    from tests.helpers.moe_models import RouterlessMixture
    from tests.helpers.wandb_file import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([RouterlessMixture()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wandb.init(mode="offline", dir=tmp_path, project="gradtrace-tests")
    mlflow.start_run(run_name="routerless")
    project = f"gradtrace-{tmp_path.name}"
    trackio.init(project=project, name="routerless", embed=False)
    tracer = gradtrace.trace(model, optimizer, tmp_path / "run", log_every=1, strict=True,
                             report_to=["wandb", "tensorboard", "mlflow", "trackio"])
    for _ in range(3):
        model.layers[0](torch.randn(2, 5)).backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()
    wandb.finish()
    trackio.finish()

    log = read_run_log(tmp_path / "run")
    [note] = log["logs"][0]["anatomy_warnings"]
    assert "no identifiable expert dimension" in note and len(log["logs"]) == 3
    wb = read_run(tmp_path)
    assert wb.summary["gradtrace/anatomy_warnings"] == note
    assert not [row for row in wb.history if "gradtrace/anatomy_warnings" in row]  # not a chart
    assert MlflowClient(mlflow_store).get_run(run_id).data.tags["gradtrace/anatomy_warnings"] == note
    assert SQLiteStorage.get_run_config(project, "routerless")["gradtrace/anatomy_warnings"] == note
    tb = tb_events(tmp_path / "run" / "tensorboard")
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in tb.Tensors("gradtrace/run_summary/text_summary")}
    assert sorted(texts) == [1, 3]  # the first logging step's summary, and the final one
    assert all(f"- {note}" in text for text in texts.values())


def test_tensorboard_table_marks_the_estimates_of_a_sampled_run(tmp_path):
    """cancellation="sampled": cancelled / absorbed are estimates wherever something was split between them
    (elements with a gradient that kept their value, less those at lr 0), and marked so; exact elsewhere. The
    bf16 run at a small lr keeps many values (estimates); the fp32 one at a large lr changes every element
    with a gradient (nothing to split: exact zeros)."""
    import json

    from gradtrace.sinks.tensorboard import per_matrix_markdown, sampling_stride
    from tests.helpers.traced_runs import traced_run

    for dtype, lr in ((torch.bfloat16, 1e-5), (torch.float32, 1e-3)):
        run = traced_run(tmp_path / str(dtype), dtype=dtype, lr=lr, tokens=32, steps=4, cancellation="sampled")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["info"]["tracker_config"]["sample_stride"] == 64
        per_matrix = summary["per_matrix"]
        estimated = {(name, metric) for name, values in per_matrix.items() for metric in ("cancelled", "absorbed")
                     if values["gradient_unchanged"] - values["zero_lr"] > 0}
        text = per_matrix_markdown(per_matrix, sampling_stride(summary["info"]))
        assert_per_matrix_markdown(text, per_matrix, estimated)
        assert ('every 64th element (cancellation="sampled")' in text) == bool(estimated)
        assert "≈" not in per_matrix_markdown(per_matrix, None)  # a run that kept every element's sums
        assert len(estimated) == (2 * len(per_matrix) if dtype == torch.bfloat16 else 0)  # both cases met
