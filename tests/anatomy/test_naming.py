"""Layer index and module kind from parameter names of real architectures."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradtrace.anatomy.naming import kind_of, layer_key, layer_of, layer_sort_key


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
    # issue 24's smaller cases, names from the real tiny models of transformers 5.24
    ("model.layers.0.mlp.gate.wg.weight", 0, "router"),  # Hunyuan-MoE
    ("model.layers.0.mlp.shared_mlp.gate_proj.weight", 0, "shared_expert.gate_up"),  # Hunyuan-MoE
    ("transformer.blocks.0.ffn.router.layer.weight", 0, "router"),  # DBRX
    ("transformer.blocks.0.ffn.experts.mlp.w2", 0, "expert.down"),  # DBRX, stacked (E·I, H)
    ("model.layers.0.self_attention.experts.router.layer.weight", 0, "router"),  # JetMoE attention experts
    ("encoder.block.1.layer.1.mlp.router.classifier.weight", 1, "encoder.router"),  # Switch
    ("decoder.block.1.layer.1.mlp.experts.expert_2.wi.weight", 1, "decoder.expert.gate_up"),  # Switch
    ("model.decoder.layers.0.cross_attention.out_proj.weight", 0, "decoder.o"),  # NLLB-MoE
    ("model.layers.0.shared_mlp.input_linear.weight", 0, "shared_expert.gate_up"),  # Granite-MoE-Shared
    ("model.layers.0.block_sparse_moe.input_linear.weight", 0, "gate_up"),  # "expert." from the structure
    ("model.visual.deepstack_merger_list.0.linear_fc1.weight", None, "projector.linear_fc1"),  # Qwen3-VL
    ("model.vision_model.vision_adapter.mlp.fc1.weight", None, "projector.up"),  # Llama 4
    ("model.layers.0.mlp.moe_statics.e_score_correction_bias", 0, "router.score_bias"),  # Ernie 4.5
    ("model.image_newline", None, "projector.image_newline"),  # LLaVA-OneVision
])
def test_layer_and_kind(name, layer, kind):
    assert layer_of(name) == layer
    assert kind_of(name) == kind


def test_switch_encoder_and_decoder_blocks_are_apart():
    # the same block index in both stacks: two layer keys, encoder first
    names = [f"{stack}.block.1.layer.1.mlp.wo.weight" for stack in ("decoder", "encoder")]
    assert [layer_key(n) for n in names] == ["decoder.1", "encoder.1"]
    assert sorted(["decoder.1", "encoder.0", "1", "encoder.1"], key=layer_sort_key) == [
        "1", "encoder.0", "encoder.1", "decoder.1"]


def test_every_llama_and_gpt2_parameter_gets_a_known_kind():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    kinds = {kind_of(n) for n, _ in llama.named_parameters()}
    assert kinds == {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"}
    assert {layer_of(n) for n, _ in llama.named_parameters()} == {None, 0, 1}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16))
    gpt2_kinds = {kind_of(n) for n, _ in gpt2.named_parameters()}
    assert {"qkv", "o", "up", "down", "embed", "pos_embed", "norm"} <= gpt2_kinds
