"""Per-expert measurement: fused expert tensors counted per slice, in real Trainer runs of tiny MoE models.

The counts are checked against an independent computation: the ReferenceRecorder's full boolean gradient
masks (read at ``on_pre_optimizer_step``) and a copy of the starting weights, cut into experts in the test.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from datasets import Dataset
from rich.console import Console
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer

import gradtrace
from gradtrace import GradTraceCallback, load_masks, read_run_log
from gradtrace.anatomy.naming import layer_key
from gradtrace.formats.bitpack import pack_bits
from gradtrace.masks.diff import diff_checkpoints
from gradtrace.masks.overlap import pair_overlap
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.slices import slice_rows
from gradtrace.tracking.tracker import COUNT_FIELDS, GradTracker
from gradtrace.views.report import write_report
from gradtrace.views.watch import LogFollower, render
from tests.helpers import moe_models
from tests.helpers.moe_models import RouterlessMixture, token_data, training_args
from tests.helpers.reference import assert_masks_equal_reference

pytestmark = pytest.mark.filterwarnings("error::gradtrace.GradTraceWarning")


def _expected_per_expert(reference, layout) -> dict[str, dict[str, int]]:
    """Per expert ``numel`` / gradient / updated elements, from the reference's full masks."""
    updated = reference.updated()
    out: dict[str, dict[str, int]] = {}
    for name, experts in layout.fused.items():
        grads = reference.gradient[name].reshape(experts, -1)
        changed = updated[name].reshape(experts, -1)
        for e in range(experts):
            entry = out.setdefault(f"{layer_key(name)}/{e}", {"numel": 0, "gradient": 0, "updated": 0})
            entry["numel"] += grads.shape[1]
            entry["gradient"] += int(grads[e].sum())
            entry["updated"] += int(changed[e].sum())
    return out


@pytest.mark.parametrize("arch", sorted(moe_models.MOE_MODELS))
def test_per_expert_counts_in_a_trainer_run(arch, tmp_path, reference):
    torch.manual_seed(0)
    model = moe_models.MOE_MODELS[arch]()
    callback = GradTraceCallback(strict=True, wandb=False, sample_stride=3)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=token_data(0), callbacks=[callback, reference]).train()
    run_dir = tmp_path / "gradtrace"
    assert_masks_equal_reference(load_masks(run_dir / "masks.safetensors"), reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    layout = callback.tracker.experts
    expected = _expected_per_expert(reference, layout)
    per_expert = summary["per_expert"]
    assert list(per_expert) == list(expected)  # every routed expert of every MoE layer, in order
    moe_layers = {"1"} if arch == "deepseek_v3" else {"0", "1"}
    assert {key.split("/")[0] for key in per_expert} == moe_layers and len(per_expert) == 8 * len(moe_layers)
    for key, counts in expected.items():
        got = per_expert[key]
        assert got["numel"] == counts["numel"]
        assert got["gradient_sparsity"] == pytest.approx(1 - counts["gradient"] / counts["numel"], abs=1e-12)
        assert got["update_sparsity"] == pytest.approx(1 - counts["updated"] / counts["numel"], abs=1e-12)
        assert set(got) >= set(summary["per_layer"]["1"])  # the same fields as a per_layer entry
    without = sum(1 for c in expected.values() if c["gradient"] == 0)
    assert 0 < without < len(expected), "top-1 of 8 on a few tokens should leave some experts without a token"
    densities = sorted(c["gradient"] / c["numel"] for c in expected.values())
    g = summary["global"]
    assert g["experts"] == len(expected) and g["experts_without_gradient"] == without
    assert (g["expert_gradient_density_min"], g["expert_gradient_density_max"]) == (densities[0], densities[-1])
    # the named extremes: least touched lowest first, most touched highest first, ties in expert order
    order = list(expected)
    ranked = [(key, c["gradient"] / c["numel"]) for key, c in expected.items()]
    least = sorted(ranked, key=lambda kv: (kv[1], order.index(kv[0])))[:3]
    most = sorted(ranked, key=lambda kv: (-kv[1], order.index(kv[0])))[:3]
    assert summary["expert_extremes"] == {
        "least_touched": [{"expert": k, "gradient_density": d} for k, d in least],
        "most_touched": [{"expert": k, "gradient_density": d} for k, d in most]}
    assert "router" in summary["per_kind"] and "gate" not in summary["per_kind"] or arch == "deepseek_v3"
    # the run log carries the same at every logging step
    logs = read_run_log(run_dir)["logs"]
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert logs[-1]["per_expert"] == per_expert and all("per_expert" in r for r in logs)
    assert read_run_log(run_dir)["info"]["experts"] == {"per_layer": {k: 8 for k in sorted(moe_layers)}, "note": None}


def test_vlm_layer_keys_in_a_trainer_run(tmp_path, reference):
    torch.manual_seed(0)
    model = moe_models.qwen2_5_vl()
    data = Dataset.from_list([{"seed": i} for i in range(6)])
    callback = GradTraceCallback(strict=True, wandb=False)
    Trainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=1, remove_unused_columns=False),
            train_dataset=data, data_collator=lambda rows: moe_models.vl_example(rows[0]["seed"]),
            callbacks=[callback, reference]).train()
    masks = load_masks(tmp_path / "gradtrace" / "masks.safetensors")
    assert_masks_equal_reference(masks, reference)
    summary = json.loads((tmp_path / "gradtrace" / "summary.json").read_text())
    assert list(summary["per_layer"]) == ["0", "1", "vision.0", "vision.1", "projector"]
    assert "per_expert" not in summary
    # the image reached the vision tower: its blocks' gradient sparsity is the reference's
    vision0 = [n for n in reference.gradient if layer_key(n) == "vision.0"]
    received = sum(int(reference.gradient[n].sum()) for n in vision0)
    numel = sum(reference.gradient[n].numel() for n in vision0)
    assert received > 0
    assert summary["per_layer"]["vision.0"]["gradient_sparsity"] == pytest.approx(1 - received / numel, abs=1e-12)
    assert {"vision.gate", "vision.qkv", "projector.mlp.0", "gate"} <= set(summary["per_kind"])


def _random_masks(numel: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.rand(numel, generator=generator) < 0.4 for k in ("gradient", "updated", "updated_abs",
                                                                     "updated_rel", "ever_changed")}


@pytest.mark.parametrize(("experts", "slice_numel", "offset", "local"), [
    (7, 15, 0, 105),   # slices of 15 elements: no boundary after the first on a byte boundary
    (7, 15, 23, 60),   # a shard starting mid-expert (ZeRO-3 flat partition) and ending mid-expert
    (4, 8, 16, 16),    # a shard holding whole experts 2 and 3 (FSDP2 Shard(0))
    (5, 3, 14, 1),     # one element
])
def test_slice_counts_match_unpacked_masks(experts, slice_numel, offset, local):
    config = TrackerConfig(sample_stride=4)
    masks = _random_masks(local, seed=experts + offset)
    generator = torch.Generator().manual_seed(1)
    sample_start = (-offset) % 4
    samples = len(range(sample_start, local, 4))
    signed, absolute = torch.randn(samples, generator=generator), torch.rand(samples, generator=generator)
    rows = slice_rows({k: pack_bits(v) for k, v in masks.items()}, (signed, absolute), config=config,
                      slices=experts, slice_numel=slice_numel, offset=offset, local_numel=local,
                      sample_start=sample_start)
    # independent: each local element's expert from its global index, counted with plain boolean sums
    expert = (torch.arange(local) + offset) // slice_numel
    positions = torch.tensor(list(range(sample_start, local, 4)), dtype=torch.long)
    unchanged = masks["gradient"][positions] & ~masks["updated"][positions]
    cancelled = unchanged & (signed.abs() <= absolute * config.cancel_epsilon)
    for e in range(experts):
        mine = expert == e
        sampled = expert[positions] == e
        want = {"numel": int(mine.sum()), "gradient": int(masks["gradient"][mine].sum()),
                "updated": int(masks["updated"][mine].sum()), "updated_abs": int(masks["updated_abs"][mine].sum()),
                "updated_rel": int(masks["updated_rel"][mine].sum()),
                "gradient_and_updated": int((masks["gradient"] & masks["updated"])[mine].sum()),
                "ever_changed": int(masks["ever_changed"][mine].sum()), "sampled": int(sampled.sum()),
                "sampled_gradient": int(masks["gradient"][positions][sampled].sum()),
                "sampled_gradient_unchanged": int(unchanged[sampled].sum()),
                "sampled_cancelled": int(cancelled[sampled].sum())}
        assert dict(zip(COUNT_FIELDS, rows[e].tolist(), strict=True)) == want, e


class _OddMoE(nn.Module):
    """A MoE block whose 7 experts hold 15 elements each: expert boundaries off byte boundaries."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 7, bias=False)
        self.experts = nn.Module()
        self.experts.down_proj = nn.Parameter(torch.randn(7, 3, 5))

    def forward(self, x):
        chosen = self.gate(x).argmax(-1)
        return (self.experts.down_proj[chosen].sum((-1, -2)) * self.gate(x).softmax(-1).amax(-1)).sum()


@pytest.mark.parametrize("cpu_path", [True, False])
def test_tracker_per_slice_counts_on_odd_expert_sizes(cpu_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].mlp = _OddMoE()
    tracker = GradTracker(model, TrackerConfig(cancellation="full", ever_changed=True))
    tracker.backend = "numpy" if cpu_path else "torch"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    name = "layers.0.mlp.experts.down_proj"
    param = model.get_parameter(name)
    start = param.detach().clone()
    gradient = torch.zeros(param.shape, dtype=torch.bool)
    for _ in range(2):
        model.layers[0].mlp(torch.randn(2, 4)).backward()
        param.grad[:, 0, :2] = 0  # some elements of a touched expert get no gradient
        gradient |= param.grad != 0
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
    measurement = tracker.measure()
    rows = measurement.per_slice[name]
    assert [r["numel"] for r in rows] == [15] * 7
    assert [r["gradient"] for r in rows] == gradient.reshape(7, -1).sum(1).tolist()
    assert [r["updated"] for r in rows] == (param.detach() != start).reshape(7, -1).sum(1).tolist()
    assert [r["ever_changed"] for r in rows] == [r["updated"] for r in rows]  # SGD never moves back
    for field in COUNT_FIELDS:
        assert sum(r[field] for r in rows) == measurement.per_param[name][field], field
    assert 0 < sum(r["gradient"] == 0 for r in rows) < 7


def _train_qwen3_moe(out, seed: int, *, save_to=None):
    """A 3-step Trainer run of the tiny Qwen3-MoE from the same start; optionally saves start and end."""
    torch.manual_seed(0)
    model = moe_models.qwen3_moe()
    if save_to is not None:
        model.save_pretrained(save_to / "base")
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, save_to / "base.safetensors")
    callback = GradTraceCallback(strict=True, wandb=False)
    Trainer(model=model, args=training_args(out), train_dataset=token_data(seed), callbacks=[callback]).train()
    if save_to is not None:
        model.save_pretrained(save_to / "tuned")
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  save_to / "tuned.safetensors")
    return out / "gradtrace"


def test_overlap_and_diff_per_expert(tmp_path):
    run_a = _train_qwen3_moe(tmp_path / "a", seed=0, save_to=tmp_path)
    run_b = _train_qwen3_moe(tmp_path / "b", seed=1)
    result = pair_overlap(run_a / "masks.safetensors", run_b / "masks.safetensors")
    a, b = (load_masks(r / "masks.safetensors")["update"] for r in (run_a, run_b))
    expected: dict[str, list[int]] = {}
    for name in a:
        if ".mlp.experts." not in name:
            continue
        for e in range(8):
            counts = expected.setdefault(f"{layer_key(name)}/{e}", [0, 0, 0, 0])
            for i, value in enumerate((a[name][e].numel(), a[name][e].sum(), b[name][e].sum(),
                                       (a[name][e] & b[name][e]).sum())):
                counts[i] += int(value)
    assert list(result["per_expert"]) == list(expected)
    for key, (n, ua, ub, both) in expected.items():
        got = result["per_expert"][key]
        assert (got["numel"], got["updated_1"], got["updated_2"], got["intersection"]) == (n, ua, ub, both)
    assert any(c[1] == 0 for c in expected.values()) and any(c[3] > 0 for c in expected.values())
    assert list(result["per_tower"]) == ["language"]
    # post-hoc: the checkpoints' per-expert update sparsity equals the live run's, whether the experts
    # are saved fused (a raw state dict) or as transformers saves them (one module per expert)
    live = json.loads((run_a / "summary.json").read_text())["per_expert"]
    for base, tuned in (("base", "tuned"), ("base.safetensors", "tuned.safetensors")):
        diff = diff_checkpoints(tmp_path / base, tmp_path / tuned, tolerances=[0]).to_dict()
        assert list(diff["per_expert"]) == list(live)
        for key, values in live.items():
            assert diff["per_expert"][key]["numel"] == values["numel"]
            assert diff["per_expert"][key]["sparsity"]["0"] == pytest.approx(values["update_sparsity"], abs=1e-12)


def test_a_frozen_router_still_identifies_the_experts(tmp_path, reference):
    torch.manual_seed(0)
    model = moe_models.qwen3_moe()
    for layer in model.model.layers:
        layer.mlp.gate.weight.requires_grad_(False)  # a common choice when fine-tuning a MoE
    callback = GradTraceCallback(strict=True, wandb=False)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=token_data(0), callbacks=[callback, reference]).train()
    summary = json.loads((tmp_path / "gradtrace" / "summary.json").read_text())
    assert "router" not in summary["per_kind"]  # not tracked
    expected = _expected_per_expert(reference, callback.tracker.experts)
    assert len(expected) == 16
    assert {k: v["gradient_sparsity"] for k, v in summary["per_expert"].items()} == {
        k: 1 - c["gradient"] / c["numel"] for k, c in expected.items()}


def test_an_unidentified_expert_dimension_is_said_once_and_training_goes_on(tmp_path):
    model = nn.Module()
    model.layers = nn.ModuleList([RouterlessMixture()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, strict=True)
    for _ in range(2):
        model.layers[0](torch.randn(2, 5)).backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    log = read_run_log(tmp_path)
    note = log["info"]["experts"]["note"]
    assert "layers.0.mlp.experts.down_proj" in note and "per matrix only" in note
    # once at the start, and in every summary as a warning that views and trackers show
    assert all(r["anatomy_warnings"] == [note] for r in log["logs"])
    assert (tmp_path / "log.jsonl").read_text().count("no identifiable expert dimension") == 1 + len(log["logs"])
    assert [r["step"] for r in log["logs"]] == [1, 2] and all("per_expert" not in r for r in log["logs"])
    # visible where people look: the watch dashboard and the HTML report
    follower = LogFollower(tmp_path)
    follower.poll()
    console = Console(record=True, file=io.StringIO(), width=200)
    console.print(render(follower, width=200))
    assert "no identifiable expert dimension" in console.export_text()
    assert "no identifiable expert dimension" in write_report([tmp_path], tmp_path / "report").read_text()
    assert log["logs"][-1]["per_matrix"]["layers.0.mlp.experts.down_proj"]["gradient_sparsity"] == 0
