"""The W&B dashboard, read back from the offline run's own ``.wandb`` file and files directory.

Real tiny trainings (a plain loop inside ``wandb.init``, and a ``transformers.Trainer`` with
``report_to="wandb"``) log through the sink; every value W&B recorded is compared with the local run
log, which is the record of truth.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import wandb
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import gradtrace
from gradtrace import GradTraceWarning, TraceSession, TrackerConfig, read_run_log
from gradtrace.anatomy.naming import kind_of, layer_of
from gradtrace.sinks.payload import HISTOGRAM_KEY, LAYER_STEP_METRICS, TABLE_KEY, scalar_payload
from gradtrace.sinks.wandb import ARTIFACT_TYPE, WandbSink
from gradtrace.views.live import layer_kind_image
from gradtrace.views.run_data import layer_kind_grid
from tests.helpers.tracker_checks import assert_grid_image, assert_layer_step_image, pixels
from tests.helpers.wandb_file import read_run

VOCAB = 64
# Global values that count steps or elements: in the run summary, not charted.
COUNTERS = ("optimizer_steps", "zero_gradient_steps", "nonfinite_gradient_steps", "skipped_overflow_steps",
            "discarded_gradient_elements", "step_gradient_density_step", "tracked_elements", "zero_lr_steps")
# How chart keys name the per-layer metrics (short: a title cut to a card's width still tells them apart).
LABELS = {"gradient_sparsity": "grad", "update_sparsity": "update", "cancelled": "cancelled", "absorbed": "absorbed"}
SEEN_TOKENS = 40  # embedding rows 40..63 never get a gradient: gradient sparsity > 0


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype)


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SEEN_TOKENS, (4, 8), generator=generator) for _ in range(count)]


def rows_at(history: list[dict], step_key: str, probe: str) -> dict[int, dict]:
    """History rows that carry ``probe``, by their step-key value (each step logged exactly once)."""
    rows: dict[int, dict] = {}
    for row in history:
        if probe in row:
            step = row[step_key]
            assert step not in rows, f"{probe} logged twice at {step_key}={step}"
            rows[step] = row
    return rows


def assert_dashboard_matches_run_log(wb, run_dir: Path, step_key: str, *, expected_steps: list[int],
                                     tokens: torch.Tensor, per_layer_curves: bool = False) -> None:
    """Every gradtrace series W&B recorded equals the run log at the same step; media and table too."""
    log = read_run_log(run_dir)
    records = {int(r["step"]): r for r in log["logs"]}
    assert sorted(records) == expected_steps

    # define_metric: each section is plotted against the step key.
    globs = {m["glob_name"]: m["step_metric"] for m in wb.metrics if m["glob_name"]}
    for section in ("gradtrace", "gradtrace_kind", "gradtrace_layer", "gradtrace_heatmap", "gradtrace_split"):
        assert globs[f"{section}/*"] == step_key, section

    rows = rows_at(wb.history, step_key, "gradtrace/update_sparsity")
    assert sorted(rows) == expected_steps
    for step, record in records.items():
        row = rows[step]
        assert row[step_key] == step == record["step"]
        # The global curves equal the run log exactly: the sparsities under the gradtrace/<metric> contract,
        # where the elements went under gradtrace_split/; the counters are in the run summary, not charts.
        g = record["global"]
        for metric in ("gradient_sparsity", "update_sparsity", "update_sparsity_abs_1e-05", "update_sparsity_rel_0.001"):
            assert row[f"gradtrace/{metric}"] == g[metric], (step, metric)
        for metric in ("cancelled", "absorbed", "changed_without_gradient", "no_gradient", "updated",
                       "gradient_unchanged", "zero_lr", "step_gradient_density"):
            assert row[f"gradtrace_split/{metric}"] == g[metric], (step, metric)
        for counter in COUNTERS:
            assert f"gradtrace/{counter}" not in row and counter in g
        # Per kind / per layer, read against the run log's own groups (not the sink's flattening).
        for kind, values in record["per_kind"].items():
            assert row[f"gradtrace_kind/update.{kind}"] == values["update_sparsity"]
            assert row[f"gradtrace_kind/grad.{kind}"] == values["gradient_sparsity"]
        for layer, values in record["per_layer"].items():
            for metric in ("update_sparsity", "gradient_sparsity", "cancelled", "absorbed"):
                key = f"gradtrace_layer/layer_{layer}.{LABELS[metric]}"
                if per_layer_curves:
                    assert row[key] == values[metric], (step, key)
                else:
                    assert key not in row  # by default, per-layer numbers are in the layer x step images
        scalars = {k for k in row if k.startswith(("gradtrace/", "gradtrace_kind/", "gradtrace_layer/", "gradtrace_split/"))
                   and not isinstance(row[k], dict)}
        assert scalars - {step_key} == set(scalar_payload(record, per_layer_curves=per_layer_curves))
        # The live layer x step images: every layer's cell at every step so far shows the run log's value.
        history = [records[s] for s in expected_steps if s <= step]
        for metric in LAYER_STEP_METRICS:
            entry = row[f"gradtrace_heatmap/{LABELS[metric]}.layer_x_step"]
            assert entry["_type"] == "image-file" and entry["format"] == "png"
            assert_layer_step_image(pixels(wb.files_dir / entry["path"]), history, metric)

        # Heatmaps: an image file in the run's files, showing this step's grid.
        for metric in ("update_sparsity", "gradient_sparsity"):
            entry = row[f"gradtrace_heatmap/{LABELS[metric]}.layer_x_kind"]
            assert entry["_type"] == "image-file" and entry["format"] == "png"
            logged = pixels(wb.files_dir / entry["path"])
            assert logged.shape[0] > 100 and logged.shape[1] > 200 and logged.std() > 10
            image = layer_kind_image(record, metric)
            assert np.array_equal(logged, pixels(image.png)), (step, metric)
            assert_grid_image(logged, image, layer_kind_grid(record["per_matrix"], metric).values)
        # Histogram of the cancellation ratio: the run log's counts and edges.
        histogram = row[HISTOGRAM_KEY]
        assert histogram["_type"] == "histogram"
        assert histogram["values"] == record["cancellation_histogram"]["counts"]
        assert histogram["bins"] == record["cancellation_histogram"]["edges"]
        assert sum(histogram["values"]) > 0

    # Nothing is logged between logging steps: gradtrace rows exist at the logging steps only.
    assert {row[step_key] for row in wb.history if any(k.startswith("gradtrace") for k in row)
            } == set(expected_steps)

    # The per-matrix table: one row per parameter matrix, the final record's numbers.
    final = records[expected_steps[-1]]
    [table_row] = [row for row in wb.history if TABLE_KEY in row]
    assert table_row[step_key] == expected_steps[-1]
    assert table_row[TABLE_KEY]["_type"] == "table-file"
    table = json.loads(wb.load_file(table_row[TABLE_KEY]["path"]))
    columns = table["columns"]
    assert columns[:4] == ["name", "layer", "kind", "numel"]
    assert len(table["data"]) == len(final["per_matrix"]) == log["info"]["parameters"]["tracked_parameters"]
    by_name = {r[0]: dict(zip(columns, r, strict=True)) for r in table["data"]}
    assert set(by_name) == set(final["per_matrix"])
    for name, values in final["per_matrix"].items():
        got = by_name[name]
        assert got["layer"] == layer_of(name) and got["kind"] == kind_of(name)
        assert got["numel"] == values["numel"]
        for metric, value in values.items():
            assert got[metric] == value, (name, metric)
    assert by_name["model.layers.1.mlp.down_proj.weight"]["layer"] == 1
    assert by_name["model.layers.1.mlp.down_proj.weight"]["kind"] == "down"
    assert by_name["model.embed_tokens.weight"]["layer"] is None
    # Embedding rows of tokens that never occur in the data get no gradient (nor those only in the last
    # position: causal attention and the shifted loss leave its hidden state unused).
    assert by_name["model.embed_tokens.weight"]["gradient_sparsity"] == 1 - len(tokens[:, :-1].unique()) / VOCAB > 0

    # Run summary: the final global values, and the counters (their last values).
    for metric, value in final["global"].items():
        if isinstance(value, float | int) and math.isfinite(value):
            assert wb.summary[f"gradtrace/final/{metric}"] == value, metric
    for counter in COUNTERS:
        assert wb.summary[f"gradtrace/{counter}"] == final["global"][counter], counter
    assert "gradtrace/anatomy_warnings" not in wb.summary  # a dense Llama: nothing unrecognised

    # The masks file, as an artifact of type gradtrace-masks, byte for byte (MD5 as in the manifest).
    [artifact] = [a for a in wb.artifacts if a["type"] == ARTIFACT_TYPE]
    masks = (run_dir / "masks.safetensors").read_bytes()
    entry = artifact["files"]["masks.safetensors"]
    assert entry["size"] == len(masks)
    assert entry["digest"] == base64.b64encode(hashlib.md5(masks).digest()).decode()
    assert "summary.json" in artifact["files"]
    assert artifact["metadata"]["step"] == expected_steps[-1]
    assert artifact["metadata"]["update_sparsity"] == final["global"]["update_sparsity"]
    assert artifact["metadata"]["info"]["tracker_config"] == log["info"]["tracker_config"]
    assert wb.summary["gradtrace/final/masks_artifact"] == artifact["name"]


def test_plain_loop_dashboard_reads_back_equal_to_run_log(tmp_path, wandb_env):
    run = wandb.init(mode="offline", dir=wandb_env, project="gradtrace-tests")
    run_id = run.id
    model = tiny_llama(torch.bfloat16)  # bf16 + small lr: absorbed and cancelled elements exist
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    tracer = gradtrace.trace(model, optimizer, tmp_path / "run", log_every=2, strict=True,
                             config=TrackerConfig(cancellation="full"))
    data = batches(6)
    for tokens in data:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    wandb.finish()

    wb = read_run(wandb_env)
    assert wb.path.name == f"run-{run_id}.wandb"
    assert_dashboard_matches_run_log(wb, tmp_path / "run", "gradtrace/step", expected_steps=[2, 4, 6],
                                     tokens=torch.cat(data))
    final = read_run_log(tmp_path / "run")["logs"][-1]["global"]
    assert final["absorbed"] > 0 and final["cancelled"] > 0  # the run is not trivial
    [artifact] = [a for a in wb.artifacts if a["type"] == ARTIFACT_TYPE]
    assert artifact["name"] == f"gradtrace-masks-{run_id}"


def test_trainer_report_to_wandb_reads_back_equal_to_run_log(tmp_path, wandb_env):
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = torch.cat(batches(6, seed=2))

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.rows[index], "labels": self.rows[index]}

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6,
                             logging_steps=2, report_to="wandb", use_cpu=True, save_strategy="no",
                             learning_rate=1e-3, disable_tqdm=True, seed=0)
    callback = gradtrace.GradTraceCallback(strict=True, cancellation="full", per_layer_curves=True)
    dataset = Tokens()
    Trainer(model=tiny_llama(), args=args, train_dataset=dataset, callbacks=[callback]).train()
    wandb.finish()

    wb = read_run(wandb_env)
    run_dir = tmp_path / "out" / "gradtrace"
    assert_dashboard_matches_run_log(wb, run_dir, "train/global_step", expected_steps=[2, 4, 6],
                                     tokens=dataset.rows, per_layer_curves=True)
    # The trainer's own rows (loss) share the step key, so W&B aligns them with gradtrace's.
    loss_steps = {row["train/global_step"] for row in wb.history if "train/loss" in row}
    assert loss_steps == {2, 4, 6}


class _Broken:
    """A W&B run whose every call fails (a network or quota error, say)."""

    id = "broken"

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError("W&B is down")

        return fail


class _Disabled(_Broken):
    """What ``wandb.init(mode="disabled")`` returns: a run that drops everything."""

    disabled = True


def test_sink_is_a_no_op_without_an_active_or_with_a_disabled_run(tmp_path):
    assert wandb.run is None
    summary = {"step": 1, "global": {"update_sparsity": 0.5}, "per_kind": {}, "per_layer": {}, "per_matrix": {},
               "cancellation_histogram": {"edges": [0, 1], "counts": [0]}}
    for sink in (WandbSink(), WandbSink(run=_Disabled())):
        sink.log(summary, 1)  # would raise if it touched the run
        sink.finish(summary, tmp_path)


def test_a_failing_wandb_run_never_stops_training(tmp_path, monkeypatch):
    """One warning for the broken W&B run; the local log and the tracker beside it get every step."""
    from tests.helpers.tensorboard_events import tb_events  # skips only this test without tensorboard

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, report_to="tensorboard")
    assert [s.name for s in tracer.session.sinks] == ["TensorBoard"]
    # First in line: its failure must not keep the step from the sink after it.
    tracer.session.sinks.insert(0, WandbSink(run=_Broken()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        tracer.finish()
    messages = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(messages) == 1 and "W&B" in messages[0] and "switched off" in messages[0]
    records = read_run_log(tmp_path)["logs"]
    assert [r["step"] for r in records] == [1, 2, 3]  # the local log went on
    assert isinstance(tracer.session, TraceSession) and [s.name for s in tracer.session.sinks] == ["TensorBoard"]
    # The working tracker got every logging step, with the run log's values (TensorBoard stores float32).
    tb = tb_events(tmp_path / "tensorboard")
    for key in scalar_payload(records[-1]):
        assert [(e.step, e.value) for e in tb.Scalars(key)] == [
            (r["step"], np.float32(scalar_payload(r)[key])) for r in records], key
