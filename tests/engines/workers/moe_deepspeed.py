"""A tiny Qwen3-MoE through a real transformers.Trainer under DeepSpeed ZeRO-3, with gradtrace: per-expert
counts when flat partitions cross expert boundaries.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/engines/workers/moe_deepspeed.py OUT 3 1
    python tests/engines/workers/moe_deepspeed.py OUT none 2                       # reference, no DeepSpeed

7 experts of 256 (gate_up) / 128 (down) elements: each rank's partition of a fused expert tensor is half
of the flattened tensor, so the boundary falls inside expert 3. Each rank writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from teardown import end_process_group  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Trainer, TrainingArguments  # noqa: E402

from gradtrace import GradTraceCallback  # noqa: E402

VOCAB, SEQ, STEPS = 64, 3, 3


def main(out: str, stage: int | None, batch: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
                                               intermediate_size=32, moe_intermediate_size=8, num_experts=7,
                                               num_experts_per_tok=1))
    distributed = "WORLD_SIZE" in os.environ
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (STEPS * 2, SEQ), generator=generator).tolist()
    config = None if stage is None else {
        "zero_optimization": {"stage": stage}, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "steps_per_print": 10_000}
    args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=batch, learning_rate=1e-2,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, lr_scheduler_type="constant", deepspeed=config,
                             ddp_backend="gloo" if distributed else None)
    callback = GradTraceCallback(strict=True, wandb=False, sample_stride=3)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            callbacks=[callback]).train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(out, f"rank{rank}.json"), "w") as stream:
        json.dump({"sharded": callback.tracker.sharded, "fused": sorted(callback.tracker.experts.fused)}, stream)


if __name__ == "__main__":
    main(sys.argv[1], None if sys.argv[2] == "none" else int(sys.argv[2]), int(sys.argv[3]))
    end_process_group()  # after main: its trainer, model and tracker are gone
