"""gradtrace in a plain PyTorch loop: a tiny Llama-config model, AdamW, bf16 weights.

    python examples/plain_loop.py [OUTPUT_DIR]

Writes OUTPUT_DIR/log.jsonl while training and masks.safetensors + summary.json at the end.
"""

from __future__ import annotations

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gradtrace


def main(output_dir: str = "runs/plain-loop") -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    # The whole integration: one call before the loop, one after.
    tracer = gradtrace.trace(model, optimizer, output_dir, log_every=10, max_grad_norm=1.0)

    for _step in range(40):
        tokens = torch.randint(0, 64, (8, 16))  # only half of the vocabulary ever appears
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # gradtrace reads the clipped gradient right before this step applies it
        optimizer.zero_grad()

    masks_path = tracer.finish()
    summary = tracer.session.last_summary
    masks = gradtrace.load_masks(masks_path)
    unused_rows = ~masks["gradient"]["model.embed_tokens.weight"].any(dim=1)
    print(f"masks: {masks_path}")
    print(f"gradient sparsity {summary['global']['gradient_sparsity']:.4f}, "
          f"update sparsity {summary['global']['update_sparsity']:.4f}, "
          f"absorbed {summary['global']['absorbed']:.4f}")
    print(f"embedding rows that never received a gradient: {int(unused_rows.sum())} of {len(unused_rows)}")
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:])
