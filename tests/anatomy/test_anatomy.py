"""Model anatomy on real tiny configs (transformers 5.24): towers, layer keys, kinds, routed experts."""

from __future__ import annotations

import pytest

from gradtrace.anatomy.experts import expert_layout
from gradtrace.anatomy.grouping import by_expert, by_kind, by_layer
from gradtrace.anatomy.naming import expert_of, kind_of, layer_key, tower_of
from tests.helpers import moe_models


def _shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", sorted(moe_models.MOE_MODELS))
def test_moe_router_and_fused_experts(arch):
    shapes = _shapes(moe_models.MOE_MODELS[arch]())
    kinds = {name: kind_of(name) for name in shapes}
    routers = sorted(n for n, k in kinds.items() if k == "router")
    # one router per MoE layer (DeepSeek-V3's first layer is dense), never mixed with a gate projection
    moe_layers = ["1"] if arch == "deepseek_v3" else ["0", "1"]
    assert [layer_key(n) for n in routers] == moe_layers
    assert all(n.endswith(("mlp.gate.weight", "mlp.router.weight")) for n in routers)
    assert "gate" not in {kinds[n] for n in shapes if ".experts." in n or n.endswith("mlp.gate.weight")}
    layout = expert_layout(shapes)
    fused = {n for n in shapes if ".mlp.experts." in n}
    assert set(layout.fused) == fused and layout.unidentified == [] and layout.note is None
    assert layout.experts == {layer: 8 for layer in moe_layers}
    assert {kinds[n] for n in fused} == ({"expert.gate_up", "expert.down", "expert.gate_up.bias", "expert.down.bias"}
                                         if arch == "gpt_oss" else {"expert.gate_up", "expert.down"})


def test_shared_experts_mla_sinks_and_qk_norms_have_their_own_kinds():
    qwen2 = {n: kind_of(n) for n in _shapes(moe_models.qwen2_moe())}
    assert qwen2["model.layers.0.mlp.shared_expert.gate_proj.weight"] == "shared_expert.gate_up"
    assert qwen2["model.layers.0.mlp.shared_expert.down_proj.weight"] == "shared_expert.down"
    assert qwen2["model.layers.0.mlp.shared_expert_gate.weight"] == "shared_expert.router"
    deepseek = {n: kind_of(n) for n in _shapes(moe_models.deepseek_v3())}
    assert deepseek["model.layers.0.mlp.gate_proj.weight"] == "gate"  # the dense first layer
    assert deepseek["model.layers.1.mlp.shared_experts.gate_proj.weight"] == "shared_expert.gate_up"
    assert [deepseek[f"model.layers.1.self_attn.{m}.weight"] for m in
            ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "q_a_layernorm", "kv_a_layernorm")] == [
        "q_a", "q_b", "kv_a", "kv_b", "q_a_norm", "kv_a_norm"]
    gpt_oss = {n: kind_of(n) for n in _shapes(moe_models.gpt_oss())}
    assert gpt_oss["model.layers.0.self_attn.sinks"] == "sinks"
    assert gpt_oss["model.layers.0.mlp.router.bias"] == "router.bias"
    qwen3 = {n: kind_of(n) for n in _shapes(moe_models.qwen3_moe())}
    assert qwen3["model.layers.0.self_attn.q_norm.weight"] == "q_norm"
    assert qwen3["model.layers.0.self_attn.k_norm.weight"] == "k_norm"
    assert qwen3["model.layers.0.input_layernorm.weight"] == "norm"
    # no parameter of these architectures falls back to a raw module name
    known = {"embed", "lm_head", "norm", "q", "k", "v", "o", "q.bias", "k.bias", "v.bias", "o.bias", "gate", "up",
             "down", "router", "router.bias", "q_norm", "k_norm", "q_a", "q_b", "kv_a", "kv_b", "q_a_norm",
             "kv_a_norm", "sinks"}
    for kinds in (qwen2, deepseek, gpt_oss, qwen3):
        assert {k for k in kinds.values() if not k.startswith(("expert.", "shared_expert."))} <= known


def test_vlm_towers_layer_keys_and_kinds():
    shapes = _shapes(moe_models.qwen2_5_vl())
    assert {tower_of(n) for n in shapes} == {"language", "vision", "projector"}
    assert {layer_key(n) for n in shapes} == {None, "0", "1", "vision.0", "vision.1", "projector"}
    counts = {n: {"numel": 1} for n in shapes}
    assert list(by_layer(counts)) == ["0", "1", "vision.0", "vision.1", "projector"]  # decoder first
    assert kind_of("model.visual.blocks.1.mlp.up_proj.weight") == "vision.up"
    assert kind_of("model.language_model.layers.1.mlp.up_proj.weight") == "up"
    assert kind_of("model.visual.blocks.0.attn.qkv.weight") == "vision.qkv"
    assert kind_of("model.visual.blocks.0.attn.proj.weight") == "vision.o"
    assert kind_of("model.visual.patch_embed.proj.weight") == "vision.patch_embed"
    assert kind_of("model.visual.merger.mlp.0.weight") == "projector.mlp.0"
    assert kind_of("model.visual.merger.mlp.2.bias") == "projector.mlp.2.bias"
    assert kind_of("model.visual.merger.ln_q.weight") == "projector.norm"
    kinds = by_kind(counts)
    # the vision MLP's 2 blocks x 3 projections stay out of the text kinds
    assert kinds["vision.gate"]["numel"] == 2 and kinds["gate"]["numel"] == 2


def test_per_expert_module_lists_map_to_the_same_view():
    # older Mixtral layout: one module per expert
    names = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
             for layer in (0, 1) for e in range(4) for w in ("w1", "w2", "w3")]
    routers = {f"model.layers.{layer}.block_sparse_moe.gate.weight": (4, 16) for layer in (0, 1)}
    shapes = {**{n: (8, 16) for n in names}, **routers}
    # gate and up are one kind, as the fused gate_up_proj of the live model
    assert kind_of(names[0]) == "expert.gate_up" and kind_of(names[1]) == "expert.down" and expert_of(names[4]) == 1
    assert kind_of("model.layers.0.block_sparse_moe.gate.weight") == "router"
    layout = expert_layout(shapes)
    assert layout.fused == {} and layout.listed == {n: expert_of(n) for n in names}
    assert layout.experts == {"0": 4, "1": 4}
    per_param = {n: {"numel": 128, "gradient": 128 if expert_of(n) == 2 else 0} for n in shapes}
    experts = by_expert(per_param, {}, layout.listed)
    assert list(experts) == [f"{layer}/{e}" for layer in (0, 1) for e in range(4)]
    assert experts["1/2"] == {"numel": 3 * 128, "gradient": 3 * 128} and experts["1/3"]["gradient"] == 0


def test_an_unidentifiable_expert_dimension_falls_back_and_says_so():
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (8, 32, 16),
              "model.layers.0.mlp.experts.down_proj": (8, 16, 16),
              "model.layers.0.mlp.gate.weight": (6, 16),  # scores 6 experts: dim 0 is not the expert dim
              "model.layers.1.mlp.experts.down_proj": (8, 16, 16)}  # no router at all
    layout = expert_layout(shapes)
    assert layout.fused == {} and len(layout.unidentified) == 3
    assert "3 routed-expert parameter(s)" in layout.note and "model.layers.0.mlp.experts.gate_up_proj" in layout.note
