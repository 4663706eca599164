"""Which experts does a fine-tuning run touch? A tiny Qwen3-MoE, SFT on the demo's addition task.

    python examples/moe_experts.py [OUTPUT_DIR] [--png docs/moe-experts.png]

Builds a Qwen3-MoE config locally (4 layers, 16 routed experts, top-1 routing, random weights, the
demo's character tokenizer), trains it with a plain ``transformers.Trainer`` and ``GradTraceCallback``,
prints the per-expert headline numbers from ``summary.json["per_expert"]`` and draws the layer x expert
heatmap of gradient and update sparsity (the same figure ``gradtrace report`` puts in its report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Trainer, TrainingArguments

from gradtrace import GradTraceCallback
from gradtrace.demo.runs import CausalLMCollator
from gradtrace.demo.tiny import build_tokenizer, text_dataset
from gradtrace.views.figures import expert_heatmap_figure, figure_png


def main(output_dir: str = "runs/moe-experts", *, steps: int = 20, png: str | None = None) -> dict:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=16, num_experts=16,
        num_experts_per_tok=1, pad_token_id=tokenizer.pad_token_id))
    data = text_dataset("add", n=steps * 8, seed=0, eos_token=tokenizer.eos_token)
    data = data.map(lambda ex: {"input_ids": tokenizer(ex["text"])["input_ids"]}, remove_columns=["text"])
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=max(1, steps // 4), report_to="none", use_cpu=True,
                             save_strategy="no", lr_scheduler_type="constant", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=CausalLMCollator(tokenizer.pad_token_id),
            callbacks=[GradTraceCallback(wandb=False)]).train()
    summary = json.loads((Path(output_dir) / "gradtrace" / "summary.json").read_text())
    g = summary["global"]
    print(f"{g['experts']} routed experts ({len(summary['per_layer'])} layers x 16), "
          f"never received a gradient: {g['experts_without_gradient']}")
    print(f"per-expert gradient density: min {g['expert_gradient_density_min']:.4f}, "
          f"median {g['expert_gradient_density_median']:.4f}, max {g['expert_gradient_density_max']:.4f}")
    updates = sorted(v["update_sparsity"] for v in summary["per_expert"].values())
    print(f"per-expert update sparsity: min {updates[0]:.4f}, max {updates[-1]:.4f}; "
          f"router update sparsity {summary['per_kind']['router']['update_sparsity']:.4f}")
    if png:
        Path(png).write_bytes(figure_png(expert_heatmap_figure(summary, label=f"Qwen3-MoE SFT, {steps} steps")))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="runs/moe-experts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--png", default=None, help="write the layer x expert heatmap here")
    cli = parser.parse_args()
    main(cli.output_dir, steps=cli.steps, png=cli.png)
