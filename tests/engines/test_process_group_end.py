"""After ``dist.destroy_process_group()`` a tracker whose state is divided among processes refuses to gather it,
with a message, rather than sending a collective over a group object something else still holds (FSDP2's
mesh here; DDP's reducer, DeepSpeed's parameters elsewhere). One process, gloo, a real ``fully_shard``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gradtrace import GradTracker


def test_a_divided_state_is_not_gathered_after_the_group_is_destroyed(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        tracker = GradTracker(model)
        model(torch.randn(3, 4)).sum().backward()
        tracker.observe_gradients()
        tracker.observe_update()
        counts = tracker.measure().per_param  # while the group lives, it measures
        assert sum(c["numel"] for c in counts.values()) == 30
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="before dist.destroy_process_group"):
        tracker.measure()
    with pytest.raises(RuntimeError, match="before dist.destroy_process_group"):
        tracker.packed_masks()
