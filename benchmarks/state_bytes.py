"""Bytes of tracker state per tracked parameter, for every mode, measured on a real model's tensors.

    python benchmarks/state_bytes.py

Sums the sizes of the tensors the tracker actually allocated (device state: beside the parameters;
reference: the copy of the initial weights, on the CPU by default), divided by the number of elements.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from gradtrace import GradTracker, TrackerConfig

MODES = {
    "masks only (cancellation off)": TrackerConfig(cancellation="off"),
    "default (sums on 1/64 of elements)": TrackerConfig(),
    "sums on every element (full)": TrackerConfig(cancellation="full"),
    "default + per-step ever-changed": TrackerConfig(ever_changed=True),
}


def main() -> None:
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    table = Table(title="gradtrace state, bytes per tracked parameter (measured)")
    for column in ("mode", "weights", "device state", "reference copy (CPU)"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for dtype in (torch.bfloat16, torch.float32):
        model = LlamaForCausalLM(config).to(dtype)
        numel = sum(p.numel() for p in model.parameters())
        for name, mode in MODES.items():
            measured = GradTracker(model, mode).state_bytes()
            table.add_row(name, str(dtype).removeprefix("torch."), f"{measured['device'] / numel:.4f}",
                          f"{measured['reference'] / numel:.2f}")
    Console().print(table)
    print(f"model: Llama config, {numel / 1e6:.1f}M parameters; floor for two 1-bit masks: 0.25 B/param")


if __name__ == "__main__":
    main()
