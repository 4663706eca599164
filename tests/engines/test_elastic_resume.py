"""Elastic resume: tracker state saved by 2 processes resumed by 1, and by 1 resumed by 2, under DDP (split
tracking), FSDP2 and DeepSpeed ZeRO-2 (each rank tracks its partition's fragments) and ZeRO-3 (real gloo
processes), against one uninterrupted process.

Run alone with ``python -m pytest -m distributed tests/engines/test_elastic_resume.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from gradtrace import load_masks
from tests.helpers.launching import DEEPSPEED_ENV, assert_same_masks, launch

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, all four steps, on a backend's model: what every resumed run must reproduce. The DDP
    runs train a model with a wide embedding (cut between the ranks), FSDP2 and ZeRO-3 the plain one."""
    runs = {}

    def run(backend: str):
        model = "ddp" if backend == "ddp" else "plain"
        if model not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{model}")
            launch("loop_split.py", str(out / "run"), backend, processes=1, cwd=out)
            runs[model] = out / "run"
        return runs[model]

    return run


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero2", "zero3"])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_with_another_number_of_processes(tmp_path, uninterrupted, backend, before, after):
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    first, second = tmp_path / "first", tmp_path / "second"
    uninterrupted = uninterrupted(backend)
    stopped = launch("loop_split.py", str(first), backend, "--save-at", "2", processes=before, cwd=tmp_path,
                     env_extra=DEEPSPEED_ENV)
    if before > 1 and not backend.startswith("zero"):
        # the tracer, left unfinished, issues no collective at exit, after the group is destroyed (it once
        # did, over the group DDP's reducer still held: docs/distributed.md, "Ending a distributed run")
        assert stopped.stderr.count("under several processes its masks are not written at exit") == 2
        assert "writing the masks at exit failed" not in stopped.stderr
    saved = sorted(p.name for p in (first / "ckpt").glob("tracker_state*.safetensors"))
    assert len(saved) == before  # one file per saving rank: the resumed run must re-cut them
    launch("loop_split.py", str(second), backend, "--resume", str(first / "ckpt"), processes=after, cwd=tmp_path,
           env_extra=DEEPSPEED_ENV)
    records = [json.loads((second / f"rank{r}.json").read_text()) for r in range(after)]
    assert [r["steps"] for r in records] == [4] * after
    # exact, whatever the backend: each rank resumed with its part of the initial weights as reference
    assert [r["reference_is_initial"] for r in records] == [True] * after
    if after > 1:  # every rank resumed only its own part
        assert all(r["sharded"] for r in records)
        if backend == "ddp":  # the embedding, more than half the model, cut between the two ranks
            assert [tuple(r["spans"]["model.embed_tokens.weight"]) for r in records] == [(0, 16000), (16000, 16000)]
        assert sum(r["tracked_numel"] for r in records) == json.loads((uninterrupted / "rank0.json").read_text())[
            "tracked_numel"]
    got_summary = json.loads((second / "summary.json").read_text())
    want_summary = json.loads((uninterrupted / "summary.json").read_text())
    assert got_summary["optimizer_steps"] == want_summary["optimizer_steps"] == 4
    if not backend.startswith("zero"):
        assert_same_masks(second / "masks.safetensors", uninterrupted / "masks.safetensors")
        for key in ("global", "per_matrix", "per_layer", "per_kind", "cancellation_histogram"):
            assert got_summary[key] == want_summary[key], key
        return
    # DeepSpeed's AdamW step on its flat fp32 partitions rounds a few weights differently from torch's in
    # the last place (an uninterrupted ZeRO-2 or ZeRO-3 run does too), which moves a handful of elements
    # across the 1e-5 / 1e-3 tolerances; the gradient and bitwise update masks, the gradient counts and the resumed reference
    # copy (above) are exact.
    got, want = load_masks(second / "masks.safetensors"), load_masks(uninterrupted / "masks.safetensors")
    assert set(got) == set(want)
    for kind in want:
        for name, mask in want[kind].items():
            if kind in ("gradient", "update"):
                assert torch.equal(got[kind][name], mask), (kind, name)
            else:
                # a reference copy cut from the wrong run would differ in most elements
                assert (got[kind][name] != mask).sum() <= max(3, mask.numel() // 100), (kind, name)
    for key in ("gradient_sparsity", "update_sparsity", "tracked_elements", "zero_gradient_steps",
                "step_gradient_density", "discarded_gradient_elements"):
        assert got_summary["global"][key] == want_summary["global"][key], key
