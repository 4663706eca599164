"""Launching real torch.distributed processes (gloo, CPU) for the tests, and reading what they wrote.

The worker scripts live in ``tests/engines/workers/``; ``launch`` runs one under torchrun (or as one plain
process), bounded in time, and on failure reports what each rank printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from gradtrace import load_masks

SCRIPTS = Path(__file__).resolve().parents[1] / "engines" / "workers"
DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu"}  # these runs are CPU + gloo, also on a machine with GPUs


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
    # its own session: on a timeout the ranks are killed with torchrun (not left behind, hung), and what
    # they printed is still read (subprocess.run's timeout kills only torchrun and drops the output)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        result = subprocess.CompletedProcess(command, "timed out after 300 s", stdout, stderr)
        raise AssertionError(failure_report(script, result)) from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, failure_report(script, result)
    # a rank that aborts at exit (SIGABRT after its work is written) must not pass unnoticed either
    assert "terminate called" not in result.stderr, failure_report(script, result)
    return result


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


def ranks(out, world=2):
    """The per-rank JSON results a worker wrote (``rank0.json``, ``rank1.json``...)."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
