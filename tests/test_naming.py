"""Layer index and module kind from parameter names of real architectures."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradtrace.anatomy.naming import kind_of, layer_of


@pytest.mark.parametrize(("name", "layer", "kind"), [
    ("model.layers.3.self_attn.q_proj.weight", 3, "q"),
    ("model.layers.3.self_attn.k_proj.bias", 3, "k.bias"),
    ("model.layers.11.mlp.down_proj.weight", 11, "down"),
    ("model.layers.0.input_layernorm.weight", 0, "norm"),
    ("model.embed_tokens.weight", None, "embed"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "lm_head"),
    ("module.model.layers.2.mlp.gate_proj.weight", 2, "gate"),
    ("base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight", 1, "v.lora_A"),
    ("base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight", 1, "v"),
    ("transformer.h.5.attn.c_attn.weight", 5, "qkv"),
    ("transformer.h.5.attn.c_proj.weight", 5, "o"),
    ("transformer.h.5.mlp.c_proj.weight", 5, "down"),
    ("transformer.h.5.ln_1.weight", 5, "norm"),
    ("transformer.wte.weight", None, "embed"),
    ("encoder.blocks.4.weird_thing.weight", 4, "encoder.weird_thing"),  # an encoder stack is a tower
])
def test_layer_and_kind(name, layer, kind):
    assert layer_of(name) == layer
    assert kind_of(name) == kind


def test_every_llama_and_gpt2_parameter_gets_a_known_kind():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    kinds = {kind_of(n) for n, _ in llama.named_parameters()}
    assert kinds == {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"}
    assert {layer_of(n) for n, _ in llama.named_parameters()} == {None, 0, 1}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16))
    gpt2_kinds = {kind_of(n) for n, _ in gpt2.named_parameters()}
    assert {"qkv", "o", "up", "down", "embed", "pos_embed", "norm"} <= gpt2_kinds
