"""Plain float8 safetensors (no DeepSeek ``quantization_config``, no block scales): ``diff`` and ``rank``
compare the stored values exactly, widened to float32 (every float8 value is exact there).

Expected numbers come from numpy on the float8 bits and on float32 copies, not from gradtrace's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gradtrace.cli import main as cli_main

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
NAMES = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight")


@pytest.fixture(params=FLOAT8, ids=str)
def pair(request, tmp_path):
    """Two float8 checkpoints: random bit flips in a quarter of the elements, a few rows rewritten."""
    dtype = request.param
    g = torch.Generator().manual_seed(3)
    base, tuned = {}, {}
    for name in NAMES:
        a = (torch.randn(24, 40, generator=g) * 2).to(dtype)
        bits = a.view(torch.uint8).clone()
        flip = torch.rand(bits.shape, generator=g) < 0.25
        bits[flip] ^= torch.randint(1, 8, bits.shape, generator=g, dtype=torch.uint8)[flip]  # low mantissa bits
        b = bits.view(dtype)
        b[[1, 5]] = (torch.randn(2, 40, generator=g) * 2).to(dtype)
        base[name], tuned[name] = a, b
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def as_float32(t: torch.Tensor) -> np.ndarray:
    # float8 -> float32 by the bits' own meaning: torch's conversion is exact, and NaN stays NaN
    return t.to(torch.float32).numpy()


def test_diff_of_plain_float8_counts_exactly(pair, capsys):
    a_path, b_path, base, tuned = pair
    rc = cli_main(["diff", str(a_path), str(b_path), "--tolerance", "0", "--tolerance", "0.05", "--relative", "0.1",
                   "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    for name in NAMES:
        a, b = base[name], tuned[name]
        a32, b32 = as_float32(a), as_float32(b)
        same_bits = a.view(torch.uint8).numpy() == b.view(torch.uint8).numpy()
        within = np.abs(b32 - a32) <= np.float32(0.05)
        relative = np.abs(b32 - a32) <= np.float32(0.1) * np.maximum(np.abs(a32), np.abs(b32))
        row, n = result["per_matrix"][name], a.numel()
        assert row["dtype"] == {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[a.dtype]
        assert round(row["sparsity"]["0"] * n) == int(same_bits.sum())
        assert round(row["sparsity"]["0.05"] * n) == int(within.sum())
        assert round(row["sparsity_relative"]["0.1"] * n) == int(relative.sum())
        assert 0 < int(same_bits.sum()) < int(within.sum()) < n  # the criteria really differ here


def test_rank_of_plain_float8_updates_matches_numpy(pair, capsys):
    a_path, b_path, base, tuned = pair
    rc = cli_main(["rank", str(a_path), str(b_path), "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_matrix"]) == set(NAMES)
    for name in NAMES:
        delta = as_float32(tuned[name]) - as_float32(base[name])
        row = result["per_matrix"][name]
        assert row["rank"] == int(np.linalg.matrix_rank(delta))  # default tol: σ_max · max(m, n) · eps(float32)
        assert row["nonzero"] == int((delta != 0).sum())
