"""The weight-sync budget under DDP or FSDP2 (gloo, CPU): a tiny Llama traced with ``sync_dtype="bfloat16"``,
and after every step the full weights cast to bf16 (gathered under FSDP2) saved by rank 0 as the reference.

    torchrun --nproc_per_node 2 tests/engines/workers/loop_sync.py ddp|fsdp2 OUT
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

SEQ, GLOBAL_BATCH, STEPS, EVERY = 12, 8, 6, 2


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # 35 rows: FSDP2's shards of the embedding are uneven
    model = LlamaForCausalLM(LlamaConfig(vocab_size=35, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    traced = model
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        traced = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(traced.parameters(), lr=3e-3, weight_decay=0.0)
    tracer = gradtrace.trace(traced, optimizer, out, log_every=1, wandb=False, strict=True,
                             is_main_process=rank == 0, sync_dtype="bfloat16", sync_every=EVERY)
    named = tracer.tracker.named_parameters()

    def cast() -> dict[str, torch.Tensor]:
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to(torch.bfloat16).clone()
                for n, p in named}

    weights, sections = [cast()], []
    generator = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        batch = torch.randint(0, 30, (GLOBAL_BATCH, SEQ), generator=generator)
        mine = batch.chunk(world)[rank]
        traced(input_ids=mine, labels=mine).loss.backward()
        optimizer.step()  # the post-hook observes the step and logs (log_every=1)
        optimizer.zero_grad()
        weights.append(cast())
        sections.append(tracer.session.last_summary["sync"])
    tracer.finish()
    if rank == 0:
        torch.save(weights, os.path.join(out, "weights.pt"))
        with open(os.path.join(out, "sections.json"), "w") as handle:
            json.dump({"sections": sections, "sharded": tracer.session.sync.sharded}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_process_group()  # after main: DDP's reducer must not be what destroys the group (teardown.py)
