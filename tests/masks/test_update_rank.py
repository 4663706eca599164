"""Update rank of ΔW, checked against numpy's matrix_rank on the same small matrices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gradtrace.cli import main as cli_main
from gradtrace.masks.diff import CheckpointDiffError
from gradtrace.masks.rank import update_ranks

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}

LOW_RANK = "model.layers.0.self_attn.q_proj.weight"  # dense rank-2 update: support is full, values are not
ROWS = "model.layers.0.mlp.up_proj.weight"  # update confined to 3 rows: rank <= 3 by support alone
SPARSE = "model.layers.1.mlp.down_proj.weight"  # unstructured 30 % support: full rank
ZERO = "model.layers.1.self_attn.k_proj.weight"  # untouched
BF16 = "model.layers.1.self_attn.v_proj.weight"  # bf16 storage, dense random update


@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {LOW_RANK: torch.randn(24, 16, generator=g), ROWS: torch.randn(20, 12, generator=g),
            SPARSE: torch.randn(12, 20, generator=g), ZERO: torch.randn(8, 8, generator=g),
            BF16: torch.randn(16, 16, generator=g).bfloat16(),
            "model.norm.weight": torch.ones(16)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned[LOW_RANK] += torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g)
    tuned[ROWS][[2, 7, 11]] += torch.randn(3, 12, generator=g)
    tuned[SPARSE] += torch.randn(12, 20, generator=g) * (torch.rand(12, 20, generator=g) < 0.3)
    tuned[BF16] = (tuned[BF16].float() + torch.randn(16, 16, generator=g) * 0.1).bfloat16()
    tuned["model.norm.weight"] += 0.5
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def numpy_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    delta = b.float().numpy() - a.float().numpy()
    return int(np.linalg.matrix_rank(delta))  # default tol: σ_max · max(m, n) · eps(float32)


def test_ranks_match_numpy_and_the_baseline_separates_values_from_support(checkpoints):
    a, b, base, tuned = checkpoints
    result = update_ranks(a, b)
    ranks = result.matrices
    assert set(ranks) == {LOW_RANK, ROWS, SPARSE, ZERO, BF16}  # the 1-D norm has no matrix rank
    for name, m in ranks.items():
        assert m.rank == numpy_rank(base[name], tuned[name]), name
        assert m.shape == tuple(base[name].shape)
        assert m.nonzero == int((tuned[name].float() - base[name].float() != 0).sum())
    # The sanity of the fixture itself: the ranks it was built to have.
    assert (ranks[LOW_RANK].rank, ranks[ROWS].rank, ranks[SPARSE].rank, ranks[ZERO].rank) == (2, 3, 12, 0)
    # Baseline: random values on the same support. Dense support -> full rank (the low rank was in the
    # values); 3 rows -> 3; zero -> 0.
    assert ranks[LOW_RANK].random_rank == 16
    assert ranks[ROWS].random_rank == 3
    assert ranks[ZERO].random_rank == 0
    assert ranks[SPARSE].random_rank == 12
    fractions = [numpy_rank(base[n], tuned[n]) / min(base[n].shape) for n in ranks]
    data = result.to_dict()
    assert data["global"]["matrices"] == 5
    assert data["global"]["mean_rank_fraction"] == pytest.approx(sum(fractions) / len(fractions))
    baseline = [m.random_rank / min(m.shape) for m in ranks.values()]
    assert data["global"]["mean_random_rank_fraction"] == pytest.approx(sum(baseline) / len(baseline))
    assert data["per_kind"]["q"]["mean_rank_fraction"] == pytest.approx(2 / 16)
    assert data["per_matrix"][ROWS]["rank_fraction"] == pytest.approx(3 / 12)
    assert any("not 2-D" in note for note in data["notes"])


def test_baseline_is_seeded_and_optional(checkpoints):
    a, b, _, _ = checkpoints
    assert update_ranks(a, b, seed=3).to_dict() == update_ranks(a, b, seed=3).to_dict()
    without = update_ranks(a, b, baseline=False).to_dict()
    assert without["global"]["mean_random_rank_fraction"] is None
    assert all(m["random_rank"] is None for m in without["per_matrix"].values())


def test_max_dim_skips_with_a_note(checkpoints):
    a, b, _, _ = checkpoints
    result = update_ranks(a, b, max_dim=16)
    assert set(result.matrices) == {ZERO, BF16}
    assert {s["name"] for s in result.skipped} == {LOW_RANK, ROWS, SPARSE}
    assert any("skipped 3 matrices" in note for note in result.notes)


def test_non_finite_updates_are_skipped_not_crashing(tmp_path):
    base = {"w": torch.zeros(4, 4)}
    tuned = {"w": torch.full((4, 4), float("nan"))}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    result = update_ranks(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert result.matrices == {} and result.skipped[0]["reason"] == "non-finite values in ΔW"


def test_cli_json_and_errors(checkpoints, tmp_path, capsys):
    a, b, base, tuned = checkpoints
    proc = subprocess.run([sys.executable, "-m", "gradtrace.cli", "rank", str(a), str(b), "--json"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["per_matrix"][LOW_RANK]["rank"] == numpy_rank(base[LOW_RANK], tuned[LOW_RANK])
    assert cli_main(["rank", str(a), str(b), "--per-matrix", "--max-dim", "20"]) == 0
    out = capsys.readouterr().out
    assert "random" in out and "skipped" in out
    other = dict(tuned)
    other[ROWS] = other[ROWS][:, :5].clone()
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointDiffError, match="up_proj"):
        update_ranks(a, tmp_path / "other.safetensors")
    assert cli_main(["rank", str(a), str(tmp_path / "other.safetensors")]) == 1
