"""Real torch.distributed (gloo, 2 CPU processes under torchrun) against single-process references.

Run alone with ``python -m pytest -m distributed``.
"""

from __future__ import annotations

import json

import pytest

from gradtrace import read_run_log
from tests.helpers.launching import assert_same_masks, launch

pytestmark = pytest.mark.distributed


def test_ddp_trainer_matches_single_process_and_only_rank0_writes(tmp_path):
    launch("trainer_ddp.py", str(tmp_path / "ddp"), "4", processes=2, cwd=tmp_path,
           env_extra={"WANDB_DIR": str(tmp_path / "wandb-ddp")})
    launch("trainer_ddp.py", str(tmp_path / "single"), "8", processes=1, cwd=tmp_path,
           env_extra={"WANDB_DIR": str(tmp_path / "wandb-single")})
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["optimizer_steps"] for r in ranks] == [4, 4]

    assert_same_masks(tmp_path / "ddp" / "gradtrace" / "masks.safetensors",
                      tmp_path / "single" / "gradtrace" / "masks.safetensors")
    ddp_log, single_log = read_run_log(tmp_path / "ddp" / "gradtrace"), read_run_log(tmp_path / "single" / "gradtrace")
    assert [r["step"] for r in ddp_log["logs"]] == [2, 4]
    assert ddp_log["logs"][-1]["global"] == single_log["logs"][-1]["global"]
    assert ddp_log["info"]["world_size"] == 2
    # one writer: one start record in the run log, one W&B run
    lines = (tmp_path / "ddp" / "gradtrace" / "log.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in lines) == 1 and len(lines) == 4
    assert len(list((tmp_path / "wandb-ddp" / "wandb").glob("offline-run-*"))) == 1


def test_fsdp2_sharded_loop_matches_single_process(tmp_path):
    launch("loop_fsdp2.py", str(tmp_path / "fsdp"), processes=2, cwd=tmp_path)
    launch("loop_fsdp2.py", str(tmp_path / "single"), processes=1, cwd=tmp_path)
    ranks = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    # the gradients really were sharded DTensors, and the tracker knew it
    assert all(r["grad_types"] == ["DTensor"] and r["sharded"] for r in ranks)
    assert single["grad_types"] == ["Tensor"] and not single["sharded"]

    assert_same_masks(tmp_path / "fsdp" / "masks.safetensors", tmp_path / "single" / "masks.safetensors")
    sharded_log, single_log = read_run_log(tmp_path / "fsdp"), read_run_log(tmp_path / "single")
    for got, want in zip(sharded_log["logs"], single_log["logs"], strict=True):
        assert got["step"] == want["step"]
        assert got["global"] == want["global"]  # counts summed across shards, sampled set included
        assert got["per_matrix"] == want["per_matrix"]
        assert got["cancellation_histogram"] == want["cancellation_histogram"]

    # state memory per rank ~ half of the single process's
    for where in ("device", "reference"):
        per_rank = [r["state_bytes"][where] for r in ranks]
        assert abs(sum(per_rank) - single["state_bytes"][where]) <= 0.01 * single["state_bytes"][where] + 64
        assert max(per_rank) <= 0.55 * single["state_bytes"][where]
