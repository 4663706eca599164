"""A tiny model through a real transformers.Trainer under DeepSpeed (ZeRO-0/1/2/3), with gradtrace.

Run under torchrun (DeepSpeed's CPU accelerator, gloo), or as one plain process without DeepSpeed (the
reference, on the same global batches):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/engines/workers/trainer_deepspeed.py OUT STAGE PER_DEVICE_BATCH GA [lenient] [offload] [bf16-overflow]
    python tests/engines/workers/trainer_deepspeed.py OUT none GLOBAL_BATCH 1

STAGE is the ZeRO stage, or ``none`` for no DeepSpeed at all (the reference). Every optimizer step is
logged, so per-step counts (e.g. the step's gradient density) can be compared as well as the final masks.
``lenient`` runs the callback with ``strict=False`` (its warnings are recorded); ``offload`` (ZeRO-3)
offloads optimizer state and parameters to the CPU (``offload_optimizer`` / ``offload_param``); ``nosplit``
makes every rank track every parameter (``GradTraceCallback(split=False)``); ``bf16-overflow`` trains in
bf16 and multiplies the loss by inf at optimizer step ``OVERFLOW_STEP``, so that DeepSpeed skips that step.
The collectives the tracker's gradient reading issues are counted per step.
Each rank writes ``OUT/rank{r}.json``: what was attached, the tracker's state bytes and whether it
tracked partitions (ZeRO-3), and a digest of its gradient mask bits (replicated state under ZeRO-0/1/2).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from teardown import end_process_group  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradtrace import GradTraceCallback, GradTraceWarning  # noqa: E402
from gradtrace.integrations import deepspeed as deepspeed_support  # noqa: E402

VOCAB, SEQ, USED, STEPS, OVERFLOW_STEP = 95, 12, 48, 4, 3


class OverflowingTrainer(Trainer):
    """A loss of inf at optimizer step ``OVERFLOW_STEP``: every gradient non-finite, the step skipped."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("inf") if self.state.global_step + 1 == OVERFLOW_STEP else loss


class Recorder(TrainerCallback):
    """Placed after gradtrace's callback: what it attached, and whether ``.grad`` was there to read."""

    def __init__(self, traced: GradTraceCallback):
        self.traced = traced
        self.handle = None
        self.grad_was_none_at_pre_step: list[bool] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.handle = getattr(self.traced.gradient_source, "handle", None)  # the DeepSpeed step hook
        self.model = model
        self.collectives_per_step: list[int] = []
        if self.handle is None:
            return
        # every all-reduce / all-gather gradtrace's step hook issues before DeepSpeed's own step: while it
        # foresees the step with DeepSpeed's checks (_StepPlan: the overflow check, the clipping norm) and
        # while the tracker reads and folds the gradient
        tracker = self.traced.tracker
        observe, calls = tracker.observe_gradients, []
        plan = deepspeed_support._StepPlan

        def planning(*a, **k):
            calls.clear()
            return plan(*a, **k)

        deepspeed_support._StepPlan = planning
        for op in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
            real = getattr(dist, op)

            def counted(*a, _real=real, **k):
                calls.append(1)
                return _real(*a, **k)

            setattr(dist, op, counted)

        def counting(*a, **k):
            observe(*a, **k)
            self.collectives_per_step.append(len(calls))

        tracker.observe_gradients = counting

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grad_was_none_at_pre_step.append(all(p.grad is None for p in self.model.parameters()))


def dataset(n: int) -> Dataset:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, USED, (n, SEQ), generator=generator)  # rows >= USED never appear
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def deepspeed_config(stage: int, offload: bool = False, bf16: bool = False) -> dict:
    zero = {"stage": stage}
    if offload:
        zero |= {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    extra = {"zero_force_ds_cpu_optimizer": False} if offload else {}  # the Trainer's torch AdamW, no CPU Adam build
    return {
        **extra,
        "zero_optimization": zero,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW as DeepSpeed's client optimizer
        "steps_per_print": 10_000,
        **({"bf16": {"enabled": True}} if bf16 else {}),
    }


def main(out: str, stage: int | None, batch: int, accumulation: int, strict: bool = True,
         offload: bool = False, overflow: bool = False, extra: tuple[str, ...] = ()) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # odd sizes (hidden 33, vocab 95): ZeRO-3 partitions are uneven and the last one padded, as in real models
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=33, intermediate_size=63, head_dim=8,
                                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1))
    distributed = "WORLD_SIZE" in os.environ
    args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0, data_seed=0, lr_scheduler_type="constant",
                             deepspeed=None if stage is None else deepspeed_config(stage, offload, overflow),
                             bf16=overflow,
                             ddp_backend="gloo" if distributed else None)
    # a sampled subset with a stride that does not divide the partitions: under ZeRO-3 it must still be
    # chosen by global element index, as in the single process
    callback = GradTraceCallback(strict=strict, wandb=False, cancellation="sampled", sample_stride=3,
                                 split=False if "nosplit" in extra else None)
    recorder = Recorder(callback)
    trainer = (OverflowingTrainer if overflow else Trainer)(model=model, args=args, train_dataset=dataset(64), callbacks=[callback, recorder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradTraceWarning)
        trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    tracker = callback.tracker
    digest = hashlib.sha256()
    for name in tracker.parameter_names if tracker else []:  # this rank's gradient mask bits: ranks must agree
        digest.update(tracker.state[name]["gradient_bits"].cpu().numpy().tobytes())
    handle = recorder.handle
    record = {
        "deepspeed_skipped_steps": getattr(getattr(trainer, "deepspeed", None), "skipped_steps", None),
        "world_size": world,
        "optimizer_steps": tracker.steps if tracker else None,
        "trainer_steps": trainer.state.global_step,
        "stage": handle.stage if handle else None,
        "zero_optimizer": type(handle.optimizer).__name__ if handle else None,
        "hook_removed": handle is not None and not handle.active and "step" not in vars(handle.optimizer),
        "grad_was_none_at_pre_step": recorder.grad_was_none_at_pre_step,
        "gradient_digest": digest.hexdigest(),
        "collectives_per_step": getattr(recorder, "collectives_per_step", []),
        "parameter_groups": len(getattr(handle.optimizer, "bit16_groups", [])) if handle else None,
        "tracked_parameters": len(tracker.parameter_names) if tracker else None,
        "spans": tracker.spans if tracker else None,
        "sharded": tracker.sharded if tracker else None,
        "state_bytes": tracker.state_bytes() if tracker else None,
        "tracked_numel": tracker.numel if tracker else None,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)],
        "offload": {attr: bool(getattr(handle.optimizer, attr, False)) for attr in ("offload_optimizer", "offload_param")}
        if handle else None,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as stream:
        json.dump(record, stream)


if __name__ == "__main__":
    main(sys.argv[1], None if sys.argv[2] == "none" else int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
         strict="lenient" not in sys.argv[5:], offload="offload" in sys.argv[5:],
         overflow="bf16-overflow" in sys.argv[5:], extra=tuple(sys.argv[5:]))
    end_process_group()  # after main: its trainer, model and tracker are gone
