"""Tiny MoE and VLM models of real architectures (transformers 5.24 configs, random weights, built locally).

Every MoE config routes top-1 of 8 experts, so a few tokens leave some experts without any token.
"""

from __future__ import annotations

import torch
import transformers as T
from datasets import Dataset
from transformers import TrainingArguments

VOCAB = 64


def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, num_hidden_layers=2, **extra)


def qwen3_moe():
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_common(num_key_value_heads=1, head_dim=8), intermediate_size=32,
                                                  moe_intermediate_size=8, num_experts=8, num_experts_per_tok=1))


def qwen2_moe():  # with a shared expert and its sigmoid gate
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**_common(num_key_value_heads=1), intermediate_size=32,
                                                  moe_intermediate_size=8, shared_expert_intermediate_size=16,
                                                  num_experts=8, num_experts_per_tok=1))


def mixtral():
    return T.MixtralForCausalLM(T.MixtralConfig(**_common(num_key_value_heads=1), intermediate_size=8,
                                                num_local_experts=8, num_experts_per_tok=1))


def deepseek_v3():  # MLA attention, a first dense layer, shared + routed experts
    return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        **_common(num_key_value_heads=2), intermediate_size=32, moe_intermediate_size=8, n_routed_experts=8,
        num_experts_per_tok=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_group=1, topk_group=1))


def gpt_oss():  # fused expert biases, attention sinks, router with a bias
    return T.GptOssForCausalLM(T.GptOssConfig(**_common(num_key_value_heads=1, head_dim=8), intermediate_size=8,
                                              num_local_experts=8, num_experts_per_tok=1,
                                              layer_types=["sliding_attention", "full_attention"]))


MOE_MODELS = {"qwen3_moe": qwen3_moe, "qwen2_moe": qwen2_moe, "mixtral": mixtral, "deepseek_v3": deepseek_v3,
              "gpt_oss": gpt_oss}

# Qwen2.5-VL: token ids of the image placeholders inside the tiny vocabulary.
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 150, 151, 152, 153


def qwen2_5_vl():
    """Qwen2.5-VL with a 2-block vision tower; mrope sections sum to head_dim / 2 (REFERENCE.md)."""
    config = T.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return T.Qwen2_5_VLForConditionalGeneration(config)


def vl_example(seed: int) -> dict[str, torch.Tensor]:
    """One synthetic 8x8 image (2 x 2 patches of 4 px, merged into one image token) and a short text."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(4, 3 * 2 * 4 * 4, generator=generator)  # patches x (C·T·P·P)
    text = torch.randint(2, 140, (6,), generator=generator)
    input_ids = torch.cat([torch.tensor([VISION_START, IMAGE_TOKEN, VISION_END]), text]).unsqueeze(0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "pixel_values": pixel_values, "image_grid_thw": torch.tensor([[1, 2, 2]])}


# ------------------------------------------------------------------------------ training them in a Trainer
def training_args(tmp_path, **extra):
    settings = dict(output_dir=str(tmp_path), max_steps=3, logging_steps=1, learning_rate=1e-2,
                    per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no",
                    lr_scheduler_type="constant", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**settings, **extra})


def token_data(seed: int, rows: int = 6, length: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class RouterlessMixture(torch.nn.Module):
    """Named like a MoE block (``mlp.experts.down_proj``) but with no router: a soft mixture whose expert
    dimension gradtrace cannot identify."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.experts = torch.nn.Module()
        self.mlp.experts.down_proj = torch.nn.Parameter(torch.randn(4, 3, 5))
        self.mlp.mix = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        weights = self.mlp.mix.softmax(0)
        return torch.einsum("e,eij,bj->bi", weights, self.mlp.experts.down_proj, x).pow(2).sum()
