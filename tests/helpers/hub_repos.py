"""Hub repos for the diff tests: bf16 model folders (two shards, an index, a config) built from seeded
tensors, and the counts expected between two of them, computed independently of gradtrace's comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TOLERANCES = ("0", "1e-5")
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}

# name -> shape of the bf16 test checkpoint (two shards), plus one integer buffer that is skipped
SHAPES = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 48),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.1.self_attn.q_proj.weight": (32, 32),
    "model.layers.1.mlp.down_proj.weight": (32, 48),
    "model.layers.1.input_layernorm.weight": (32,),
    "lm_head.weight": (64, 32),
}
BUFFER = "model.layers.0.self_attn.position_ids"
HUB_FLAGS = ("--retries", "2", "--backoff", "0.05")  # bounded, short: a dead server fails in well under a second


# ------------------------------------------------------------------------------------------ building repos
def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # magnitudes ~1e-3, so one bf16 ULP (~4e-6 … 8e-6) and two straddle the 1e-5 tolerance
    return {name: (torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16) for name, shape in SHAPES.items()}


def perturbed(base: dict[str, torch.Tensor], seed: int, fraction: float) -> dict[str, torch.Tensor]:
    """Each element moved by −3 … +3 bf16 ULPs (0 included) with probability ``fraction``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, a in base.items():
        bits = a.view(torch.int16).reshape(-1).clone()
        chosen = torch.rand(bits.numel(), generator=g) < fraction
        ulps = torch.randint(-3, 4, (bits.numel(),), generator=g).to(torch.int16)
        bits[chosen] += ulps[chosen]
        out[name] = bits.view(torch.bfloat16).reshape(a.shape)
    return out


def write_revision(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                   shards: int = 2) -> None:
    """An HF model folder: ``shards`` safetensors files, the index, config.json."""
    folder.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))


def with_buffer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, BUFFER: torch.arange(16, dtype=torch.int64)}


# ------------------------------------------------------------------------------------------ independent truth
def expected_counts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Per tensor: unchanged elements bitwise, and by the paper's ``isclose(delta, 0, atol=tol)``."""
    out = {}
    for name in a:
        x, y = a[name], b[name]
        if not x.is_floating_point():
            continue
        delta = y - x
        out[name] = {"0": int((x.view(INT_OF[x.dtype]) == y.view(INT_OF[y.dtype])).sum()),
                     "1e-5": int(torch.isclose(delta, torch.zeros_like(delta), rtol=0, atol=1e-5).sum()),
                     "numel": x.numel()}
    return out


def counts_of(result: dict) -> dict[str, dict[str, int]]:
    """Exact counts back from the JSON (a fraction of n < 2**53 elements rounds back exactly)."""
    return {name: {**{t: round(row["sparsity"][t] * row["numel"]) for t in TOLERANCES}, "numel": row["numel"]}
            for name, row in result["per_matrix"].items()}
