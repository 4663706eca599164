"""Where a parameter sits in a transformer, derived from its name alone.

``layer_of`` finds the block index (``model.layers.3.mlp.up_proj.weight`` -> 3) and ``kind_of`` a
module kind shared across architectures (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``,
``embed``, ``norm``, ``lm_head``...). Names the table does not know fall back to the owning module's
attribute name, so an unknown architecture still gets a usable, if less uniform, grouping.
"""

from __future__ import annotations

import re

# Wrappers that add a prefix or an indirection without changing what the parameter is.
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}
_PEFT_ADAPTERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)(?:\.|$)")

# Module attribute name -> kind. Llama/Qwen/Mistral first, then GPT-2/NeoX/Falcon/BERT spellings.
_KIND_BY_MODULE = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "query": "q", "key": "k", "value": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down",
    "gate_up_proj": "gate_up", "c_fc": "up", "fc1": "up", "dense_h_to_4h": "up",
    "fc2": "down", "dense_4h_to_h": "down",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "tok_embeddings": "embed",
    "wpe": "pos_embed", "position_embeddings": "pos_embed", "embed_positions": "pos_embed",
    "lm_head": "lm_head", "output": "lm_head", "embed_out": "lm_head",
    "router": "router",
}
_ATTENTION_PARENTS = {"attn", "self_attn", "attention", "self_attention"}
_MLP_PARENTS = {"mlp", "feed_forward", "ffn"}


def _parts(name: str) -> list[str]:
    return [p for p in name.split(".") if p not in _WRAPPER_PARTS]


def layer_of(name: str) -> int | None:
    """Index of the transformer block holding the parameter, or ``None`` outside the blocks."""
    match = _LAYER_RE.search(".".join(_parts(name)))
    return int(match.group(1)) if match else None


def kind_of(name: str) -> str:
    """Module kind of a parameter, e.g. ``"q"``, ``"down"``, ``"norm"``, ``"embed"``; LoRA adds a suffix."""
    parts = _parts(name)
    adapter = next((p for p in parts if p in _PEFT_ADAPTERS), None)
    if adapter is not None:
        # model.layers.0.self_attn.q_proj.lora_A.default.weight -> "q.lora_A"
        owner = parts[parts.index(adapter) - 1] if parts.index(adapter) > 0 else adapter
        return f"{_module_kind(owner, parts)}.{adapter}"
    if len(parts) < 2:
        return parts[0] if parts else name
    leaf = parts[-1]
    owner = parts[-2]
    if "norm" in owner.lower() or owner.startswith("ln"):
        return "norm"
    kind = _module_kind(owner, parts)
    if leaf == "bias":
        return f"{kind}.bias"
    return kind


def _module_kind(owner: str, parts: list[str]) -> str:
    if owner in _KIND_BY_MODULE:
        return _KIND_BY_MODULE[owner]
    # GPT-2 uses c_proj for both attention output and MLP down projection: the parent decides.
    if owner in {"c_proj", "dense", "out_proj"}:
        parent = parts[parts.index(owner) - 1] if parts.index(owner) > 0 else ""
        if parent in _ATTENTION_PARENTS:
            return "o"
        if parent in _MLP_PARENTS:
            return "down"
    return owner
