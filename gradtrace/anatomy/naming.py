"""Where a parameter sits in a model, derived from its name alone: tower, layer, module kind, expert.

- ``tower_of``: ``"language"`` (the decoder), ``"vision"``, ``"audio"``, or ``"projector"`` (the merger
  / projector between a tower and the decoder: a group of its own).
- ``layer_of``: the block index inside its tower (``model.layers.3.mlp.up_proj.weight`` -> 3,
  ``model.visual.blocks.1.attn.qkv.weight`` -> 1); ``layer_key`` the group key that keeps towers apart:
  plain ``"3"`` for the language decoder, ``"vision.3"`` for other towers, ``"projector"`` for the merger.
- ``kind_of``: a module kind shared across architectures (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``,
  ``down``, ``embed``, ``norm``, ``lm_head``...). MoE blocks: ``router`` (never ``gate``), routed expert
  projections ``expert.gate_up`` / ``expert.down`` (fused 3-D tensors and per-expert module lists
  alike; gate and up are one kind, fused or not), shared experts ``shared_expert.gate_up`` ...;
  attention variants: DeepSeek MLA's ``q_a`` / ``q_b`` / ``kv_a`` / ``kv_b``, gpt-oss ``sinks``, ``q_norm`` / ``k_norm`` apart from the layer norms. Kinds of
  other towers carry the tower (``vision.gate``), so a VLM's vision MLP is never mixed with the text MLP.
- ``expert_of``: the expert index of a per-expert module list (``experts.7.w1.weight`` -> 7); fused 3-D
  expert tensors are found with their shapes, in :mod:`gradtrace.anatomy.experts`.

Names the tables do not know fall back to the owning module's attribute name, so an unknown
architecture still gets a usable, if less uniform, grouping.
"""

from __future__ import annotations

import functools
import re

# Wrappers that add a prefix or an indirection without changing what the parameter is.
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}
_PEFT_ADAPTERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)(?:\.|$)")

# Module names that open a tower other than the language decoder. The projector is checked first: a
# Qwen2.5-VL merger lives inside ``model.visual`` but belongs to neither tower.
# Qwen3-VL's deepstack mergers, Llama 4's vision adapter and LLaVA-OneVision's image_newline feed the
# decoder too: projectors, not blocks of the vision tower.
_PROJECTOR_PARTS = {"merger", "multi_modal_projector", "mm_projector", "connector", "visual_projection",
                    "deepstack_merger_list", "vision_adapter", "image_newline"}
# An encoder-decoder's two stacks are towers too (``encoder.3`` / ``decoder.3``, like ``vision.3``): their
# blocks with the same index are different blocks. Checked in name order, so a vision tower's own
# ``vision_model.encoder`` stays in the vision tower.
_TOWER_PARTS = {
    "visual": "vision", "vision_tower": "vision", "vision_model": "vision", "vision_encoder": "vision",
    "audio_tower": "audio", "audio_model": "audio", "audio_encoder": "audio",
    "encoder": "encoder", "decoder": "decoder",
}
# Towers in the order their blocks are listed after the language decoder's.
_TOWER_ORDER = {"encoder": 0, "decoder": 1}
LANGUAGE = "language"
PROJECTOR = "projector"

# Module attribute name -> kind. Llama/Qwen/Mistral first, then GPT-2/NeoX/Falcon/BERT spellings,
# DeepSeek MLA, vision towers.
_KIND_BY_MODULE = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "query": "q", "key": "k", "value": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "qkv": "qkv",
    "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down", "v1": "up",  # Mixtral / DBRX (w1, v1, w2)
    "wi": "up", "wo": "down", "wi_0": "gate", "wi_1": "up",  # T5 / Switch-Transformers
    "input_linear": "gate_up", "output_linear": "down",  # JetMoE / Granite-MoE
    "linear_gate": "gate",  # HY-V4 checkpoints' shared experts (gate_proj live)
    "w13": "gate_up",  # Inkling checkpoints' fused routed experts
    "gate_up_proj": "gate_up", "c_fc": "up", "fc1": "up", "dense_h_to_4h": "up",
    "fc2": "down", "dense_4h_to_h": "down",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "tok_embeddings": "embed",
    "patch_embed": "patch_embed",
    "wpe": "pos_embed", "position_embeddings": "pos_embed", "embed_positions": "pos_embed",
    "lm_head": "lm_head", "output": "lm_head", "embed_out": "lm_head",
    "router": "router",
}
# Norms that are not a block's layer norms: they normalise queries / keys (Qwen3, OLMo 2) or MLA's
# low-rank latents, and move differently from the residual-stream norms.
_SPECIAL_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm", "q_a_layernorm": "q_a_norm",
                  "kv_a_layernorm": "kv_a_norm"}
# Attention modules, cross-attention included: their output projection is ``o`` whatever it is called.
ATTENTION_PARENTS = {"attn", "self_attn", "attention", "self_attention", "cross_attention", "encoder_attn",
                     "crossattention", "EncDecAttention", "SelfAttention"}
_MLP_PARENTS = {"mlp", "feed_forward", "ffn"}
# The MoE block's scoring layer: Mixtral/Qwen-MoE/DeepSeek ``mlp.gate`` (a Linear named "gate"),
# gpt-oss ``mlp.router``, older Mixtral ``block_sparse_moe.gate``.
_MOE_PARENTS = _MLP_PARENTS | {"block_sparse_moe", "moe"}
ROUTED_EXPERTS = "experts"
ROUTER = "router"
_SHARED_EXPERTS = {"shared_expert", "shared_experts", "shared_mlp"}  # Hunyuan / Granite: shared_mlp
# Experts' (routed and shared) gate and up projections are one kind: fused live (``gate_up_proj``),
# separate in a checkpoint saved per expert (``gate_proj`` / ``up_proj``), and the views must match.
_EXPERT_KINDS = {"gate": "gate_up", "up": "gate_up"}
# The router's score-correction bias (DeepSeek-V3 ``gate.e_score_correction_bias``, Ernie 4.5
# ``moe_statics.e_score_correction_bias``): part of the router, not a module of its own.
_ROUTER_BIASES = {"e_score_correction_bias"}


def _parts(name: str) -> list[str]:
    return [p for p in name.split(".") if p not in _WRAPPER_PARTS]


def tower_of(name: str) -> str:
    """``"language"``, ``"vision"``, ``"audio"`` or ``"projector"``: which part of the model holds it."""
    parts = _parts(name)
    if any(p in _PROJECTOR_PARTS for p in parts):
        return PROJECTOR
    return next((_TOWER_PARTS[p] for p in parts if p in _TOWER_PARTS), LANGUAGE)


def layer_of(name: str) -> int | None:
    """Index of the block holding the parameter inside its tower, or ``None`` outside the blocks."""
    match = _LAYER_RE.search(".".join(_parts(name)))
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=65536)  # the live images ask again for every name at every logging step
def layer_key(name: str) -> str | None:
    """Group key of the parameter's block: ``"3"`` (language decoder), ``"vision.3"`` (other towers),
    ``"projector"`` (merger / projector, one group); ``None`` outside the blocks (embeddings, head)."""
    tower = tower_of(name)
    if tower == PROJECTOR:
        return PROJECTOR
    layer = layer_of(name)
    if layer is None:
        return None
    return str(layer) if tower == LANGUAGE else f"{tower}.{layer}"


def inside_block(path: str) -> bool:
    """Whether a module path lies strictly inside one block (``model.layers.3.mlp``, not ``model.layers.3``)."""
    match = _LAYER_RE.search(".".join(_parts(path)))
    return match is not None and match.end() < len(".".join(_parts(path)))


def layer_sort_key(key: str) -> tuple[int, int, str, int, str]:
    """Order layer keys: the language decoder's blocks by index, then other towers' blocks (encoder,
    decoder, then by name), then the projector; a suffix (``"3.attn"``) after its block."""
    parts = key.split(".")
    if parts[0].isdigit():
        return 0, 0, "", int(parts[0]), ".".join(parts[1:])
    if len(parts) > 1 and parts[1].isdigit():
        return 1, _TOWER_ORDER.get(parts[0], 2), parts[0], int(parts[1]), ".".join(parts[2:])
    return 2, 0, key, 0, ""


def expert_of(name: str) -> int | None:
    """Expert index of a parameter in a per-expert module list (``mlp.experts.7.w1.weight`` -> 7).

    ``None`` for everything else, fused expert tensors included (their experts are slices of one
    tensor: see :func:`gradtrace.anatomy.experts.fused_expert_tensors`).
    """
    parts = _parts(name)
    for i, part in enumerate(parts[:-1]):
        if part == ROUTED_EXPERTS and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def is_routed_expert(name: str) -> bool:
    """Whether the parameter belongs to a MoE block's routed experts (fused or a module list)."""
    parts = _parts(name)
    return (ROUTED_EXPERTS in parts[:-1] and ROUTER not in parts[:-1]
            and not any(p in _SHARED_EXPERTS for p in parts))


@functools.lru_cache(maxsize=65536)  # as layer_key: a pure function of the name, asked at every logging step
def kind_of(name: str) -> str:
    """Module kind of a parameter, e.g. ``"q"``, ``"down"``, ``"norm"``, ``"router"``, ``"expert.down"``;
    LoRA adds a suffix (``"q.lora_A"``), towers other than the decoder a prefix (``"vision.q"``)."""
    return with_tower(name, _block_kind(_parts(name)))


def with_tower(name: str, kind: str) -> str:
    """``kind`` as the parameter's tower names it: prefixed unless it is in the language decoder."""
    tower = tower_of(name)
    return kind if tower == LANGUAGE else f"{tower}.{kind}"


def expert_kind(name: str) -> str:
    """The kind of a routed expert's tensor, known to be one (from the structure):
    ``expert.gate_up``, ``expert.down``, ``...bias``. A fused tensor is named by its own name
    (``experts.down_proj``, DBRX ``experts.mlp.w2``) or, as a Linear's weight, by its module's
    (``input_linear.weight``)."""
    parts = _parts(name)
    leaf = parts[-1]
    if leaf in ("weight", "bias") and len(parts) >= 2:
        base, bias = parts[-2], leaf == "bias"
    else:
        # gpt-oss ``gate_up_proj_bias``; vLLM-style checkpoints ``w13_weight`` / ``w2_weight`` (Inkling)
        base, bias = leaf.removesuffix("_bias").removesuffix("_weight"), leaf.endswith("_bias")
    kind = _KIND_BY_MODULE.get(base, base)
    kind = f"expert.{_EXPERT_KINDS.get(kind, kind)}"
    return f"{kind}.bias" if bias else kind


def _block_kind(parts: list[str]) -> str:
    adapter = next((p for p in parts if p in _PEFT_ADAPTERS), None)
    if adapter is not None:
        # model.layers.0.self_attn.q_proj.lora_A.default.weight -> "q.lora_A"
        index = parts.index(adapter)
        owner = parts[index - 1] if index > 0 else adapter
        return f"{_module_kind(owner, parts[:index])}.{adapter}"
    if len(parts) < 2:
        return parts[0] if parts else ""
    leaf, owner = parts[-1], parts[-2]
    if leaf in _ROUTER_BIASES:
        return "router.score_bias"
    if is_routed_expert(".".join(parts)) and ROUTER not in parts and (
            owner == ROUTED_EXPERTS or leaf not in ("weight", "bias")):
        # fused expert tensors are a module's own parameters: experts.gate_up_proj, ..._bias, DBRX experts.mlp.w1
        return expert_kind(".".join(parts))
    if leaf == "sinks":  # gpt-oss: a learned per-head attention sink logit
        return "sinks"
    if leaf not in ("weight", "bias") and (len(parts) == 2 or owner in _PROJECTOR_PARTS | {"model"}):
        return leaf  # a bare parameter of the model (LLaVA-OneVision image_newline)
    if owner in _SPECIAL_NORMS:
        return _SPECIAL_NORMS[owner]
    if "norm" in owner.lower() or owner.startswith("ln"):
        return "norm"
    kind = _module_kind(owner, parts)
    if ROUTER in parts[:-1] or (owner == "wg" and len(parts) > 2 and parts[-3] == "gate"):
        kind = "router"  # DBRX / JetMoE router.layer, Switch / NLLB-MoE router.classifier, Hunyuan gate.wg
    elif is_routed_expert(".".join(parts)):
        kind = f"expert.{_EXPERT_KINDS.get(kind, kind)}"
    elif any(p in _SHARED_EXPERTS for p in parts[:-2]):
        kind = f"shared_expert.{_EXPERT_KINDS.get(kind, kind)}"
    elif owner == "shared_expert_gate":  # Qwen2-MoE: sigmoid gate of the shared expert's output
        kind = "shared_expert.router"
    return f"{kind}.bias" if leaf == "bias" else kind


def _module_kind(owner: str, parts: list[str]) -> str:
    index = len(parts) - 1 - parts[::-1].index(owner) if owner in parts else 0
    parent = parts[index - 1] if index > 0 else ""
    if owner == "gate" and parent in _MOE_PARENTS:  # the router, not a gate projection
        return "router"
    if owner in _KIND_BY_MODULE:
        return _KIND_BY_MODULE[owner]
    if parent == "patch_embed":  # a vision tower's patch embedding: patch_embed.proj
        return "patch_embed"
    # GPT-2 uses c_proj for both attention output and MLP down projection: the parent decides.
    if owner in {"c_proj", "dense", "out_proj", "proj"}:
        if parent in ATTENTION_PARENTS:
            return "o"
        if parent in _MLP_PARENTS:
            return "down"
    if owner.isdigit() and parent:  # nn.Sequential inside a projector: merger.mlp.0 -> "mlp.0"
        return f"{parent}.{owner}"
    return owner
