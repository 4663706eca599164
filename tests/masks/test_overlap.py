"""Overlap between runs' masks, checked against Python set arithmetic on small masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradtrace.cli import main as cli_main
from gradtrace.formats.bitpack import pack_bits
from gradtrace.formats.masks_file import MaskFileError, PackedMask, save_masks
from gradtrace.masks import overlap as overlap_mod
from gradtrace.masks.overlap import OverlapError, overlap_matrix, pair_overlap

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}

# name -> (shape, layer, kind); numels deliberately not multiples of 8
PARAMS = {
    "model.embed_tokens.weight": ((13, 5), None, "embed"),
    "model.layers.0.self_attn.q_proj.weight": ((7, 9), 0, "q"),
    "model.layers.0.mlp.up_proj.weight": ((11, 3), 0, "up"),
    "model.layers.1.self_attn.q_proj.weight": ((7, 9), 1, "q"),
    "model.layers.1.post_attention_layernorm.weight": ((9,), 1, "norm"),
}


def random_masks(seed: int, density: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g) < density for name, (shape, _, _) in PARAMS.items()}


def as_set(masks: dict[str, torch.Tensor], names=None) -> set[tuple[str, int]]:
    """Updated elements as a set of (parameter, flat index)."""
    return {(name, i) for name, m in masks.items() if names is None or name in names
            for i, v in enumerate(m.reshape(-1).tolist()) if v}


def reference(m1, m2, names=None) -> dict[str, float]:
    i1, i2 = as_set(m1, names), as_set(m2, names)
    n = sum(m.numel() for name, m in m1.items() if names is None or name in names)
    both = len(i1 & i2)
    p, q = len(i1) / n, len(i2) / n
    return {"overlap": both / len(i1), "chance": q, "overlap_2": both / len(i2), "chance_2": p,
            "jaccard": both / len(i1 | i2), "jaccard_chance": p * q / (p + q - p * q),
            "sparsity_1": 1 - p, "sparsity_2": 1 - q}


def assert_matches(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


@pytest.fixture
def runs(tmp_path):
    """Three runs: update masks of different densities, gradient masks ⊇ update masks."""
    paths, masks = [], []
    for seed, density in ((1, 0.35), (2, 0.6), (3, 0.2)):
        update = random_masks(seed, density)
        gradient = {n: m | (torch.rand(m.shape, generator=torch.Generator().manual_seed(seed + 10)) < 0.5)
                    for n, m in update.items()}
        path = tmp_path / f"run{seed}.safetensors"
        save_masks(path, {"gradient": gradient, "update": update}, step=10)
        paths.append(path)
        masks.append({"update": update, "gradient": gradient})
    return paths, masks


def test_pair_overlap_matches_set_arithmetic_global_per_layer_per_kind(runs):
    paths, masks = runs
    result = pair_overlap(paths[0], paths[1])
    m1, m2 = masks[0]["update"], masks[1]["update"]
    assert_matches(result["global"], reference(m1, m2))
    for layer in (0, 1):
        names = {n for n, (_, lay, _) in PARAMS.items() if lay == layer}
        assert_matches(result["per_layer"][str(layer)], reference(m1, m2, names))
    assert set(result["per_layer"]) == {"0", "1"}
    q = {n for n, (_, _, kind) in PARAMS.items() if kind == "q"}
    assert_matches(result["per_kind"]["q"], reference(m1, m2, q))
    assert set(result["per_kind"]) == {"embed", "q", "up", "norm"}
    assert result["global"]["intersection"] == len(as_set(m1) & as_set(m2))


def test_gradient_kind_and_in_memory_sources(runs):
    paths, masks = runs
    result = pair_overlap(paths[0], masks[2], kind="gradient")
    assert_matches(result["global"], reference(masks[0]["gradient"], masks[2]["gradient"]))
    with pytest.raises(OverlapError, match="no 'nope' masks"):
        pair_overlap(paths[0], paths[1], kind="nope")


def test_cli_json_contract(runs):
    paths, masks = runs
    proc = subprocess.run([sys.executable, "-m", "gradtrace.cli", "overlap", str(paths[0]), str(paths[1]),
                           "--json"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    want = reference(masks[0]["update"], masks[1]["update"])
    assert data["global"]["overlap"] == pytest.approx(want["overlap"])
    assert data["global"]["chance"] == pytest.approx(want["chance"])
    assert data["global"]["jaccard"] == pytest.approx(want["jaccard"])
    assert data["global"]["overlap_2"] == pytest.approx(want["overlap_2"])


def test_matrix_for_three_runs(runs, capsys):
    paths, masks = runs
    result = overlap_matrix(paths)
    updates = [m["update"] for m in masks]
    for i in range(3):
        assert result["sparsity"][i] == pytest.approx(1 - len(as_set(updates[i])) / sum(m.numel() for m in updates[i].values()))
        for j in range(3):
            si, sj = as_set(updates[i]), as_set(updates[j])
            assert result["matrix"]["overlap"][i][j] == pytest.approx(len(si & sj) / len(si))
            assert result["matrix"]["jaccard"][i][j] == pytest.approx(len(si & sj) / len(si | sj))
            if i != j:
                assert result["matrix"]["chance"][i][j] == pytest.approx(1 - result["sparsity"][j])
    assert len(result["pairs"]) == 3
    assert cli_main(["overlap", *map(str, paths)]) == 0
    assert "Jaccard" in capsys.readouterr().out
    assert cli_main(["overlap", *map(str, paths), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["matrix"]["overlap"][0][1] == pytest.approx(
        result["matrix"]["overlap"][0][1])


def test_padding_bits_are_ignored(tmp_path):
    """Only the first numel bits count, even if a writer left garbage in the last byte's padding."""
    masks = random_masks(5, 0.5)
    clean = tmp_path / "clean.safetensors"
    dirty = tmp_path / "dirty.safetensors"
    save_masks(clean, {"update": masks})
    garbage = {}
    for name, m in masks.items():
        bits = pack_bits(m).clone()
        if m.numel() % 8:
            bits[-1] |= 0xFF << (m.numel() % 8) & 0xFF
        garbage[name] = PackedMask(bits, tuple(m.shape))
    save_masks(dirty, {"update": garbage})
    assert pair_overlap(clean, dirty)["global"] == pair_overlap(clean, clean)["global"]
    assert pair_overlap(clean, dirty)["global"]["jaccard"] == pytest.approx(1.0)


def test_chunked_popcount_gives_the_same_counts(runs, monkeypatch):
    paths, _ = runs
    whole = pair_overlap(paths[0], paths[1])
    monkeypatch.setattr(overlap_mod, "_POPCOUNT_CHUNK", 3)
    assert pair_overlap(paths[0], paths[1]) == whole


def test_masks_of_different_models_are_rejected(runs, tmp_path, capsys):
    paths, masks = runs
    renamed = {("model.layers.9.x.weight" if n.startswith("model.layers.0.mlp") else n): m
               for n, m in masks[0]["update"].items()}
    other_names = tmp_path / "other_names.safetensors"
    save_masks(other_names, {"update": renamed})
    with pytest.raises(OverlapError) as info:
        pair_overlap(paths[1], other_names)
    assert str(paths[1]) in str(info.value) and str(other_names) in str(info.value)
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)
    reshaped = dict(masks[0]["update"])
    reshaped["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(9, 7, dtype=torch.bool)
    other_shapes = tmp_path / "other_shapes.safetensors"
    save_masks(other_shapes, {"update": reshaped})
    with pytest.raises(OverlapError, match=r"q_proj.weight.*\[7, 9\].*\[9, 7\]"):
        pair_overlap(paths[0], other_shapes)
    assert cli_main(["overlap", str(paths[0]), str(other_shapes), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "different models" in captured.err.replace("\n", "")
    with pytest.raises(MaskFileError):
        pair_overlap(paths[0], tmp_path / "missing.safetensors")
    with pytest.raises(OverlapError, match="at least two"):
        overlap_matrix([paths[0]])


def test_empty_masks_give_none_not_division_errors(tmp_path):
    empty = {name: torch.zeros(shape, dtype=torch.bool) for name, (shape, _, _) in PARAMS.items()}
    path = tmp_path / "empty.safetensors"
    save_masks(path, {"update": empty})
    g = pair_overlap(path, path)["global"]
    assert g["overlap"] is None and g["jaccard"] is None and g["chance"] == 0.0
