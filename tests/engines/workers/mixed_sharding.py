"""Mixed shardings on 4 CPU processes (gloo), each against a single-process tracker run in the same script.

    torchrun --nproc_per_node 4 tests/engines/workers/mixed_sharding.py OUT

Every rank also runs, on its own, the single-process reference: the same model or tensors, unsharded,
with the same (global) gradients. Each case writes, per rank, ``OUT/{case}-rank{r}.json`` with both
measurements, and rank 0 writes both mask sets (``OUT/{case}-sharded.safetensors``, ``-single``):

- ``ignored``: FSDP2 ``fully_shard`` with ``ignored_params`` (plain tensors every rank holds whole; their
  gradients all-reduced by the script, as whatever manages them would do);
- ``replicate``: ``replicate()`` (FSDP2-style: ``Replicate`` DTensors) on one block, ``fully_shard`` on the
  rest;
- ``meshes``: hand-made DTensors: ``[Shard(0), Shard(1)]`` and HSDP ``[Replicate(), Shard(0)]`` on a 2x2
  mesh, ``Shard(1)`` on a 1-D mesh of 4, a replicated one and a plain one, with uneven shards, a sampled
  stride that divides nothing, and at step 2 a NaN in one element of one rank's shard of two parameters
  and in one element of an HSDP shard (held by two replicas);
- ``strided``: FSDP + TP's ``[_StridedShard(0), Shard(0)]`` on the 2x2 mesh, with a NaN in one shard.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from teardown import end_process_group
from torch import nn

from gradtrace import GradTracker, TrackerConfig, save_masks

CONFIG = TrackerConfig(sample_stride=3, ever_changed=True)
VOCAB, HIDDEN, SEQ, GLOBAL_BATCH, STEPS = 35, 16, 6, 8, 3


def record(tracker: GradTracker) -> dict:
    measured = tracker.measure()
    return {"per_param": measured.per_param, "counters": measured.counters,
            "histogram": measured.cancellation_histogram}


def write(out: str, case: str, sharded: GradTracker, single: GradTracker, facts: dict) -> None:
    rank = dist.get_rank()
    masks = sharded.packed_masks()  # a collective: every rank
    with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as handle:
        json.dump({"sharded": record(sharded), "single": record(single), "is_sharded": sharded.sharded,
                   **facts}, handle)
    if rank == 0:
        save_masks(os.path.join(out, f"{case}-sharded.safetensors"), masks)
        save_masks(os.path.join(out, f"{case}-single.safetensors"), single.packed_masks())


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.block = nn.Sequential(nn.Linear(HIDDEN, 24), nn.Tanh(), nn.Linear(24, HIDDEN))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.embed(ids) + self.block(self.embed(ids)))
        logits = self.head(hidden)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(model: nn.Module, tracker: GradTracker, rank: int, world: int, *, sync: list[nn.Parameter]) -> set[str]:
    """STEPS AdamW steps on this rank's share of the global batches (all of them when ``world`` is 1)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1234)
    kinds = set()
    for _ in range(STEPS):
        batch = torch.randint(0, 20, (GLOBAL_BATCH, SEQ), generator=generator)  # rows >= 20: no gradient
        model(batch.chunk(world)[rank]).backward()
        for param in sync:  # ignored by FSDP: averaged here, as the code that manages them would
            dist.all_reduce(param.grad)
            param.grad.div_(world)
        kinds |= {type(p.grad).__name__ + ("" if not hasattr(p.grad, "placements") else str(list(p.grad.placements)))
                  for p in model.parameters()}
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
    return kinds


def model_case(out: str, case: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = Tiny()
    model = Tiny()
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    sync: list[nn.Parameter] = []
    if case == "ignored":
        sync = [model.norm.weight, model.norm.bias, model.head.bias]
        fully_shard(model, mesh=mesh, ignored_params=set(sync))
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    single = GradTracker(reference, CONFIG, split=False)  # on its own: no collectives
    single_kinds = train(reference, single, 0, 1, sync=[])
    tracker = GradTracker(model, CONFIG)
    kinds = train(model, tracker, rank, world, sync=sync)
    write(out, case, tracker, single, {"grad_kinds": sorted(kinds), "single_grad_kinds": sorted(single_kinds)})


def meshes_case(out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh2d = init_device_mesh("cpu", (2, 2))
    mesh1d = init_device_mesh("cpu", (4,))
    layouts = {  # name: (full shape, mesh, placements); None: a plain tensor
        "w2d": ((7, 9), mesh2d, [Shard(0), Shard(1)]),
        "hsdp": ((6, 5), mesh2d, [Replicate(), Shard(0)]),
        "columns": ((5, 10), mesh1d, [Shard(1)]),
        "replicated": ((4,), mesh2d, [Replicate(), Replicate()]),
        "plain": ((3,), None, None),
    }
    # step 2: a NaN in the last element of w2d (rank 3's shard), in column 9 of "columns" (rank 3's), and
    # in row 4 of "hsdp" (its second row-shard, which ranks 1 and 3 both hold: two replicas of one NaN)
    tensors_case(out, "meshes", layouts, {"w2d": (6, 8), "columns": (2, 9), "hsdp": (4, 2)}, CONFIG)
    # FSDP + TP's layout (rows split by TP, then each TP shard's rows by FSDP; even: distribute_tensor
    # needs it): counts without sums
    strided = {"fsdp_tp": ((8, 3), mesh2d, [_StridedShard(0, split_factor=2), Shard(0)])}
    tensors_case(out, "strided", strided, {"fsdp_tp": (7, 2)},
                 TrackerConfig(cancellation="off", ever_changed=True))


def tensors_case(out: str, case: str, layouts: dict, nan_at: dict, config: TrackerConfig) -> None:
    """Hand-made parameters and gradients, ``layouts[name] = (full shape, mesh, placements)``."""
    from torch.distributed.tensor import distribute_tensor

    generator = torch.Generator().manual_seed(7)
    values = {name: torch.randn(shape, generator=generator) for name, (shape, _, _) in layouts.items()}

    def place(name: str, full: torch.Tensor) -> torch.Tensor:
        _, mesh, placements = layouts[name]
        return full.clone() if mesh is None else distribute_tensor(full, mesh, placements)

    sharded = {name: nn.Parameter(place(name, values[name])) for name in layouts}
    plain = {name: nn.Parameter(values[name].clone()) for name in layouts}
    tracker = GradTracker(list(sharded.items()), config)
    single = GradTracker(list(plain.items()), config, split=False)  # on its own: no collectives
    for step in range(STEPS):
        for name, (shape, _, _) in layouts.items():
            keep = torch.rand(shape, generator=generator) < 0.6
            grad = torch.randn(shape, generator=generator) * keep
            if step == 1 and name in nan_at:
                grad[nan_at[name]] = float("nan")
            sharded[name].grad, plain[name].grad = place(name, grad), grad.clone()
        tracker.observe_gradients()
        single.observe_gradients()
        with torch.no_grad():
            for name in layouts:
                grad = torch.nan_to_num(plain[name].grad, nan=0.0)
                new = plain[name] - 0.01 * grad.sign()  # elements without a gradient stay unchanged
                plain[name].copy_(new)
                local = sharded[name].to_local() if hasattr(sharded[name], "to_local") else sharded[name]
                placed = place(name, new)
                local.copy_(placed.to_local() if hasattr(placed, "to_local") else placed)
        tracker.observe_update()
        single.observe_update()
    write(out, case, tracker, single, {"listed_samples": sorted(name for name, placement in tracker.placements.items()
                                                          if placement.sample_index is not None)})


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 4, "run with --nproc_per_node 4"
    os.makedirs(out, exist_ok=True)
    for case in sys.argv[2:] or ["ignored", "replicate", "meshes"]:
        if case == "meshes":
            meshes_case(out)
        else:
            model_case(out, case)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # after main: replicate()'s reducer must not be what destroys the group (teardown.py)
