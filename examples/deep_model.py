"""What the live dashboard shows for a deep model: all layers in one layer x step picture, not 5 charts each.

    python examples/deep_model.py [OUTPUT_DIR] [--layers 32] [--steps 30] [--png docs/deep-layer-step.png]

Builds a deep, narrow Llama config locally (random weights, bf16, the demo's character tokenizer), trains
it with a plain ``transformers.Trainer`` and ``GradTraceCallback`` on the demo's addition task, and then
replays the run log through the charts every tracker gets (:class:`gradtrace.sinks.payload.LiveCharts`):
it prints how many distinct chart keys a tracker receives by default and with ``per_layer_curves=True``,
and writes the last layer x step image of update sparsity (what ``gradtrace_heatmap/update.layer_x_step``
shows at the end of the run, in W&B, TensorBoard, MLflow or trackio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from gradtrace import GradTraceCallback, read_run_log
from gradtrace.demo.runs import CausalLMCollator
from gradtrace.demo.tiny import build_tokenizer, text_dataset
from gradtrace.sinks.payload import HISTOGRAM_KEY, LiveCharts


def chart_keys(records: list[dict], charts: LiveCharts) -> set[str]:
    """Every distinct key a tracker gets over the run: scalars, images and the histogram."""
    keys: set[str] = set()
    for record in records:
        frame = charts.frame(record)
        keys |= set(frame.scalars) | set(frame.images) | ({HISTOGRAM_KEY} if frame.histogram else set())
    return keys


def main(output_dir: str = "runs/deep-model", *, layers: int = 32, steps: int = 30, png: str | None = None) -> dict:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)).to(torch.bfloat16)
    data = text_dataset("add", n=steps * 8, seed=0, eos_token=tokenizer.eos_token)
    data = data.map(lambda ex: {"input_ids": tokenizer(ex["text"])["input_ids"]}, remove_columns=["text"])
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-5, logging_steps=2, report_to="none", use_cpu=True, save_strategy="no",
                             lr_scheduler_type="constant", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=CausalLMCollator(tokenizer.pad_token_id),
            callbacks=[GradTraceCallback(wandb=False)]).train()
    records = read_run_log(Path(output_dir) / "gradtrace")["logs"]
    default = chart_keys(records, LiveCharts())
    per_layer = chart_keys(records, LiveCharts(per_layer_curves=True, heatmaps=False))
    print(f"{layers} layers, {len(records)} logging steps: {len(default)} chart keys by default "
          f"(with per_layer_curves=True: {len(per_layer | default)})")
    charts = LiveCharts()
    for record in records:
        charts.history.add(record)
    image = charts.history.render("update_sparsity", title=f"update sparsity per layer, {layers}-layer bf16 Llama, "
                                                           f"steps {records[0]['step']} to {records[-1]['step']}")
    if png:
        Path(png).write_bytes(image.png)
    return {"records": records, "default_keys": sorted(default), "per_layer_keys": sorted(per_layer),
            "image": image}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="runs/deep-model")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--png", default=None, help="write the layer x step image of update sparsity here")
    cli = parser.parse_args()
    main(cli.output_dir, layers=cli.layers, steps=cli.steps, png=cli.png)
