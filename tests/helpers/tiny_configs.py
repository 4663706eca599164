"""Tiny configs for any transformers architecture, from the config class's own fields.

Every size field the class declares is set small (hidden 16, 2 layers, 4 experts, vocab 128...), nested
configs (``text_config``, ``vision_config``...) alike; whatever the class does not declare keeps its
default. Built from the installed transformers, so new architectures are covered without a table here.
"""

from __future__ import annotations

import dataclasses

import transformers as T

VOCAB = 128
EXPERTS = 4

# field name -> tiny value; set only where the config class declares the field.
_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 16, "d_model": 16, "n_embd": 16, "embed_dim": 16, "emb_dim": 16,
    "intermediate_size": 32, "ffn_dim": 32, "d_ff": 32, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "ffn_hidden_size": 32, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 16,
    "expert_intermediate_size": 8, "moe_ffn_hidden_size": 8, "shared_intermediate_size": 16,
    "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2, "n_layer": 2, "depth": 2,
    "encoder_layers": 2, "decoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 2, "n_heads": 2, "n_head": 2, "num_heads": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "num_key_value_heads": 2, "kv_n_heads": 2, "head_dim": 8, "d_kv": 8,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 1, "moe_top_k": 1, "top_k": 1, "moe_k": 1, "num_selected_experts": 1,
    "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "max_position_embeddings": 64,
    "q_lora_rank": 8, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4,
    "out_hidden_size": 16, "projection_dim": 16, "patch_size": 4, "image_size": 16, "num_channels": 3,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0, "use_cache": False,
    "mamba_n_heads": 2, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
    # hybrids (Jamba): one attention layer and every layer's MLP a MoE among the 2 layers
    # every layer a MoE layer where the class lets a config choose (Doge, Gemma 4, Beam, LFM2-MoE)
    "is_moe": True, "enable_moe_block": True, "top_k_experts": 1, "mlp_layer_types": ["sparse", "sparse"],
    "num_dense_layers": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
}


def tiny_config(config_class: type[T.PreTrainedConfig], **extra) -> T.PreTrainedConfig:
    """A tiny instance of ``config_class``: its size fields small, nested configs tiny too; ``extra``
    overrides (nested dicts merged into the nested configs')."""
    return config_class(**_merged(tiny_kwargs(config_class), extra))


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_kwargs(config_class: type[T.PreTrainedConfig]) -> dict:
    fields = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    kwargs = {name: value for name, value in _SIZES.items() if name in fields}
    if "qk_rope_head_dim" in fields and "head_dim" in fields:  # MLA: rotary part of the head
        kwargs["head_dim"] = _SIZES["qk_rope_head_dim"]
    for name, sub in (getattr(config_class, "sub_configs", None) or {}).items():
        if isinstance(sub, type) and issubclass(sub, T.PreTrainedConfig) and sub is not T.AutoConfig:
            kwargs[name] = tiny_kwargs(sub)
    return kwargs
