"""Real torch.distributed (gloo, 2 CPU processes under torchrun) against single-process references.

Run alone with ``python -m pytest -m distributed``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradtrace import load_masks, read_run_log

pytestmark = pytest.mark.distributed
SCRIPTS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: str, *args: str, processes: int, cwd: Path,
           env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(SCRIPTS / script), *args]
    else:
        command = [sys.executable, str(SCRIPTS / script), *args]
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as hung:  # say what the ranks had printed before they stopped
        result = subprocess.CompletedProcess(command, "timed out after 300 s", _text(hung.stdout), _text(hung.stderr))
        raise AssertionError(failure_report(script, result)) from None
    assert result.returncode == 0, failure_report(script, result)
    # a rank that aborts at exit (SIGABRT after its work is written) must not pass unnoticed either
    assert "terminate called" not in result.stderr, failure_report(script, result)
    return result


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def failure_report(script: str, result: subprocess.CompletedProcess) -> str:
    """What a failed launch said, the failing ranks first: torchrun's summary of which rank ended how
    (exit code or signal), each rank's own last lines (``[rankN]:`` prefixed), then the output's tail."""
    lines = result.stderr.splitlines()
    summary = lines[next((i for i, line in enumerate(lines) if "Failures:" in line), len(lines)):]
    ranks = sorted({line.split("]:", 1)[0] + "]" for line in lines if line.startswith("[rank")})
    per_rank = ["\n".join([f"--- {rank} (last lines) ---", *[line for line in lines if line.startswith(rank)][-25:]])
                for rank in ranks]
    return "\n".join([f"{script} exited with {result.returncode}", "--- torchrun's summary ---", *summary[:40],
                      *per_rank, "--- stdout (tail) ---", result.stdout[-2000:],
                      "--- stderr (tail) ---", result.stderr[-4000:]])


def assert_same_masks(actual_path: Path, expected_path: Path) -> None:
    actual, expected = load_masks(actual_path), load_masks(expected_path)
    assert set(actual) == set(expected)
    for kind in expected:
        assert set(actual[kind]) == set(expected[kind])
        for name, mask in expected[kind].items():
            assert torch.equal(actual[kind][name], mask), (kind, name)
    gradient = torch.cat([m.reshape(-1) for m in expected["gradient"].values()])
    assert gradient.any() and not gradient.all()


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
