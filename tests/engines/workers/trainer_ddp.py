"""A tiny model through a real transformers.Trainer with GradTraceCallback.

Run under torchrun (DDP, gloo, CPU) or as one plain process (the reference):

    torchrun --nproc_per_node 2 tests/engines/workers/trainer_ddp.py OUT PER_DEVICE_BATCH
    python tests/engines/workers/trainer_ddp.py OUT GLOBAL_BATCH
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from teardown import end_process_group  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from gradtrace import GradTraceCallback  # noqa: E402

VOCAB, SEQ, USED = 96, 12, 48


def dataset(n: int) -> Dataset:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, USED, (n, SEQ), generator=generator)  # rows >= USED never appear
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def main(out: str, batch: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=batch, learning_rate=1e-2,
                             logging_steps=2, report_to="wandb", run_name="ddp", save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0,
                             lr_scheduler_type="constant", ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    callback = GradTraceCallback(strict=True, cancellation="full")
    trainer = Trainer(model=model, args=args, train_dataset=dataset(64), callbacks=[callback])
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "optimizer_steps": callback.tracker.steps}, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    end_process_group()  # after main: its trainer, model and tracker are gone
