"""A tiny Qwen3-MoE (7 experts, top-1) sharded with FSDP2 ``fully_shard`` on a CPU mesh (gloo), traced
with ``gradtrace.trace``: per-expert counts under sharding.

    torchrun --nproc_per_node 2 tests/engines/workers/moe_fsdp2.py OUT   # sharded: experts 0-3 | 4-6
    python tests/engines/workers/moe_fsdp2.py OUT                        # single-process reference
    torchrun --nproc_per_node 2 tests/engines/workers/moe_fsdp2.py OUT ddp   # DDP: the tracking split among ranks

FSDP2 shards the fused (experts, ·, ·) tensors on dim 0, so each rank holds whole experts, unevenly.
Both runs see the same global batches (each rank its half), as in loop_fsdp2.py.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from teardown import end_process_group  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

import gradtrace  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 64, 3, 2, 3


def main(out: str, ddp: bool = False) -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
                                               intermediate_size=32, moe_intermediate_size=8, num_experts=7,
                                               num_experts_per_tok=1))
    if distributed and ddp:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if not (distributed and ddp):
        wrapped = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    tracer = gradtrace.trace(model, optimizer, out, log_every=1, wandb=False, strict=True,
                             is_main_process=rank == 0, config=gradtrace.TrackerConfig(sample_stride=3))
    generator = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator)
        mine = batch.chunk(world)[rank]
        wrapped(input_ids=mine, labels=mine).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    fused = dict(tracer.tracker.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    local = fused.to_local() if hasattr(fused, "to_local") else fused
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"sharded": tracer.tracker.sharded, "local_experts": local.shape[0],
                   "spans": tracer.tracker.spans}, handle)


if __name__ == "__main__":
    main(sys.argv[1], ddp="ddp" in sys.argv[2:])
    end_process_group()  # after main: DDP's reducer must not be what destroys the group (teardown.py)
