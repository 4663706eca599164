"""Real tiny traced runs on disk, in a plain loop or a Trainer, for the tests of what reads a run (report,
browser, CLI) and of what a run leaves behind."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gradtrace
from gradtrace import GradTraceCallback, TrackerConfig
from gradtrace.demo import runs


def traced_run(run_dir: Path, *, dtype: torch.dtype, lr: float, tokens: int, steps: int = 8, cancellation: str = "full",
               layers: int = 2, log_every: int = 2, **info) -> Path:
    """A tiny Llama (``layers`` blocks) trained in a plain loop with gradtrace (no W&B), logging every
    ``log_every`` steps; gradient sums kept on every element unless ``cancellation="sampled"``."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = LlamaForCausalLM(config).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    tracer = gradtrace.trace(model, optimizer, run_dir, log_every=log_every, wandb=False, strict=True,
                             config=TrackerConfig(cancellation=cancellation), **info)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, tokens, (4, 8), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    return run_dir


def traced_trainer(base_path, output_dir, **kwargs):
    """A run of the demo's tiny model in a real Trainer, with a strict callback (no W&B), in fp32, logging
    every 2 steps; returns the callback."""
    callback = GradTraceCallback(strict=True, wandb=False)
    common = dict(logging_steps=2, per_device_train_batch_size=4, dtype=torch.float32)
    runs.run_trainer(base_path, output_dir, callbacks=[callback], **{**common, **kwargs})
    return callback
