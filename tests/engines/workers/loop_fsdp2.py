"""A tiny Llama sharded with FSDP2 ``fully_shard`` on a CPU mesh (gloo), traced with ``gradtrace.trace``.

    torchrun --nproc_per_node 2 tests/engines/workers/loop_fsdp2.py OUT   # sharded
    python tests/engines/workers/loop_fsdp2.py OUT                        # single-process reference

Both see the same global batches: each rank takes its half of every global batch; FSDP2 averages the
gradients across ranks, which equals the single process's mean over the whole (equal-length) batch.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from teardown import end_process_group  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradtrace  # noqa: E402

VOCAB, SEQ, USED, GLOBAL_BATCH, STEPS = 96, 12, 48, 8, 4


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    torch.manual_seed(0)
    # 35 rows: not divisible by 2, so FSDP2's shards are uneven, as in real vocabularies
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB - 61, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    tracer = gradtrace.trace(model, optimizer, out, log_every=2, wandb=False, strict=True,
                             is_main_process=rank == 0, config=gradtrace.TrackerConfig(sample_stride=3))
    generator = torch.Generator().manual_seed(1234)
    grad_types = set()
    for _ in range(STEPS):
        batch = torch.randint(0, min(USED, VOCAB - 61 - 5), (GLOBAL_BATCH, SEQ), generator=generator)
        mine = batch.chunk(world)[rank]
        model(input_ids=mine, labels=mine).loss.backward()
        grad_types |= {type(p.grad).__name__ for p in model.parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "grad_types": sorted(grad_types), "sharded": tracer.tracker.sharded,
                   "state_bytes": tracer.tracker.state_bytes()}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # after main: DDP's reducer must not be what destroys the group (teardown.py)
