"""Per-expert counts of a MoE model under FSDP2 and DeepSpeed ZeRO-3 (2 CPU processes, gloo) equal the
single process's. Run alone with ``python -m pytest -m distributed``."""

from __future__ import annotations

import json

import pytest

from gradtrace import load_masks, read_run_log
from tests.helpers.launching import assert_same_masks, launch

pytestmark = pytest.mark.distributed


def test_fsdp2_per_expert_counts_match_single_process(tmp_path):
    launch("moe_fsdp2.py", str(tmp_path / "fsdp"), processes=2, cwd=tmp_path)
    launch("moe_fsdp2.py", str(tmp_path / "single"), processes=1, cwd=tmp_path)
    ranks = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"sharded": True, "local_experts": 4, "spans": {}}, {"sharded": True, "local_experts": 3, "spans": {}}]
    assert_same_masks(tmp_path / "fsdp" / "masks.safetensors", tmp_path / "single" / "masks.safetensors")
    sharded, single = read_run_log(tmp_path / "fsdp")["logs"], read_run_log(tmp_path / "single")["logs"]
    assert [r["step"] for r in sharded] == [1, 2, 3]
    for got, want in zip(sharded, single, strict=True):
        assert got["per_expert"] == want["per_expert"]  # sampled columns included (stride 3, uneven shards)
        assert got["global"] == want["global"]
    # and the single process's numbers are the masks' own, cut into experts
    masks = load_masks(tmp_path / "single" / "masks.safetensors")["gradient"]
    final = json.loads((tmp_path / "single" / "summary.json").read_text())["per_expert"]
    for layer in ("0", "1"):
        grads = [masks[f"model.layers.{layer}.mlp.experts.{w}"].reshape(7, -1) for w in ("gate_up_proj", "down_proj")]
        for e in range(7):
            received = sum(int(g[e].sum()) for g in grads)
            numel = sum(g[e].numel() for g in grads)
            assert final[f"{layer}/{e}"]["gradient_sparsity"] == pytest.approx(1 - received / numel, abs=1e-12)
    without = sum(1 for v in final.values() if v["gradient_sparsity"] == 1)
    assert 0 < without < 14  # top-1 of 7 on 3 tokens a step: some experts got no token


def test_ddp_split_tracking_per_expert_counts_match_single_process(tmp_path):
    """Under DDP each fused expert tensor is tracked whole by one rank; the per-expert rows of the others
    are zeros of the same layout, so the one all-reduce sums them to the single process's."""
    launch("moe_fsdp2.py", str(tmp_path / "ddp"), "ddp", processes=2, cwd=tmp_path)
    launch("moe_fsdp2.py", str(tmp_path / "single"), processes=1, cwd=tmp_path)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert all(r["sharded"] for r in ranks) and sorted(r["spans"][fused][1] for r in ranks)[0] == 0
    assert_same_masks(tmp_path / "ddp" / "masks.safetensors", tmp_path / "single" / "masks.safetensors")
    split, single = read_run_log(tmp_path / "ddp")["logs"], read_run_log(tmp_path / "single")["logs"]
    for got, want in zip(split, single, strict=True):
        assert got["per_expert"] == want["per_expert"]
        assert got["global"] == want["global"]


def test_zero3_per_expert_counts_match_single_process(tmp_path):
    """ZeRO-3's flat partitions split each fused expert tensor in the middle of expert 3."""
    pytest.importorskip("deepspeed")
    launch("moe_deepspeed.py", str(tmp_path / "ds"), "3", "1", processes=2, cwd=tmp_path,
           env_extra={"DS_ACCELERATOR": "cpu"})
    launch("moe_deepspeed.py", str(tmp_path / "single"), "none", "2", processes=1, cwd=tmp_path)
    ranks = [json.loads((tmp_path / "ds" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] and len(r["fused"]) == 4 for r in ranks)  # partitions, experts identified
    assert_same_masks(tmp_path / "ds" / "gradtrace" / "masks.safetensors",
                      tmp_path / "single" / "gradtrace" / "masks.safetensors")
    sharded = read_run_log(tmp_path / "ds" / "gradtrace")["logs"]
    single = read_run_log(tmp_path / "single" / "gradtrace")["logs"]
    assert [r["step"] for r in sharded] == [1, 2, 3]
    for got, want in zip(sharded, single, strict=True):
        assert got["per_expert"].keys() == want["per_expert"].keys()
        for key, values in want["per_expert"].items():  # the mask-derived fields exactly
            for field in ("numel", "gradient_sparsity", "update_sparsity", "no_gradient", "updated"):
                assert got["per_expert"][key][field] == values[field], (got["step"], key, field)
