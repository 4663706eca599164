"""A DeepSpeed engine loop in bf16 or fp16 with one forced overflow, gradtrace attached, and a reference
recorded from DeepSpeed's own gradients in the same loop.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/engines/workers/engine_precision.py OUT STAGE DTYPE [force-fp16]

At optimizer step ``OVERFLOW_STEP`` one parameter (``gate``) gets an infinite gradient and the batch uses
tokens seen at no other step, so their embedding rows receive a finite gradient only in a step that
DeepSpeed skips: any bit set from that step shows in the masks. Between ``engine.backward`` and
``engine.step`` every rank reads each parameter's gradient with DeepSpeed's public
``safe_get_full_grad`` (not through gradtrace); after the step it reads whether DeepSpeed skipped it
(``engine.skipped_steps``) and the loss scale it divided by (``optimizer.loss_scale``, updated inside
``step`` before unscaling). Rank 0 saves, with ``torch.save``, gradtrace's masks, sums and summary, and
the reference: per step the gradients (as DeepSpeed's fp32 copies), the scale and the skip.

``force-fp16``: DeepSpeed's CPU accelerator reports fp16 as supported only with mkldnn fp16 kernels
(``torch.ops.mkldnn._is_mkldnn_fp16_supported()``); without them ``deepspeed.initialize`` refuses with
"Type fp16 is not supported on your device.". The flag overrides that capability check, so DeepSpeed's
fp16 path (loss scaler, overflow skip) runs on torch's CPU half kernels.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from teardown import end_process_group  # noqa: E402
from torch import nn  # noqa: E402

from gradtrace import GradTracker, TrackerConfig  # noqa: E402
from gradtrace.integrations.deepspeed import attach_to_deepspeed  # noqa: E402
from gradtrace.tracking.summary import summarize  # noqa: E402

VOCAB, DIM, SEQ, USED, STEPS, OVERFLOW_STEP, BATCH = 64, 12, 6, 40, 6, 3, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, 2 * DIM - 1)  # odd sizes: uneven ZeRO partitions
        self.head = nn.Linear(2 * DIM - 1, VOCAB)
        # its gradient is 0 at every step but the overflow step, where it is inf. (A parameter left out of
        # the graph keeps its last gradient partition under ZeRO-3: the inf would skip every later step.)
        self.gate = nn.Parameter(torch.zeros(3))

    def forward(self, ids: torch.Tensor, blow_up: float) -> torch.Tensor:
        logits = self.head(torch.tanh(self.hidden(self.embed(ids))))
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids.reshape(-1))
        return loss + self.gate.float().sum() * blow_up


def batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + rank)
    if step == OVERFLOW_STEP:  # tokens no other step uses: their rows get a gradient only here
        return torch.randint(USED, VOCAB, (BATCH, SEQ), generator=generator)
    return torch.randint(0, USED, (BATCH, SEQ), generator=generator)


def config(stage: int, dtype: str) -> dict:
    precision = {"bf16": {"enabled": True}} if dtype == "bf16" else {
        # a dynamic scale that grows every 2 clean steps and halves at the overflow
        "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 1,
                 "min_loss_scale": 1}}
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10_000, **precision}


def main(out: str, stage: int, dtype: str, force_fp16: bool) -> None:
    torch.set_num_threads(1)
    if force_fp16:
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: True
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(stage, dtype))
    module = engine.module
    tracker = GradTracker(module, TrackerConfig(cancellation="full"))
    handle = attach_to_deepspeed(tracker, engine)
    names = [name for name, _ in module.named_parameters()]
    reference = []
    for step in range(1, STEPS + 1):
        ids = batch(step, rank).to(engine.device)
        loss = engine(ids, float("inf") if step == OVERFLOW_STEP else 0.0)
        engine.backward(loss)
        grads = {}
        for name, param in module.named_parameters():  # a collective: every rank, same order
            grad = safe_get_full_grad(param)
            grads[name] = None if grad is None else grad.detach().float().cpu().clone()
        skipped_before = engine.skipped_steps
        engine.step()
        reference.append({"grads": grads, "skipped": engine.skipped_steps > skipped_before,
                          "scale": float(getattr(engine.optimizer, "loss_scale", 1.0))})
    masks = tracker.packed_masks()  # all-gathers partitions under ZeRO-3: every rank
    summary = summarize(tracker.measure())
    # Each rank's signed sums, with the run of each flattened parameter they cover (ZeRO-3 partitions,
    # ZeRO-1/2 partition fragments, whole parameters at stage 0: the tracking is split across ranks).
    layout = tracker.layout()
    sums = {name: tracker.state[name]["signed_sum"].cpu().clone() for name in layout if name in tracker.state}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"layout": layout, "sums": sums})
    if rank == 0:
        torch.save({
            "stage": handle.stage, "optimizer": type(handle.optimizer).__name__, "names": names,
            "shapes": {name: tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                       for name, p in module.named_parameters()},
            "masks": {kind: {name: mask.to_bool() for name, mask in by_name.items()} for kind, by_name in masks.items()},
            "summary": summary, "steps": tracker.steps, "sharded": tracker.sharded,
            "signed_sums": gathered, "reference": reference, "skipped_steps": engine.skipped_steps,
        }, os.path.join(out, "result.pt"))
    handle.remove()


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], "force-fp16" in sys.argv[4:])
    end_process_group()  # after main: its trainer, model and tracker are gone
