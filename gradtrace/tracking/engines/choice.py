"""Which engine places a tracker's parameters, read from the parameters and the world they live in.

The order is the rule: parameters sharded by a training engine are kept as their shards (ZeRO-3's flat
partitions, or DTensor / FSDP2 / HSDP local shards, reduced over the group that shards them); replicated
parameters under torch.distributed are divided among the ranks (DDP, ZeRO-0; ZeRO-1/2 then hands each rank
its partition, :meth:`GradTracker.use_spans`); anything else is tracked whole, locally.
"""

from __future__ import annotations

import torch

from gradtrace.tracking import sharding
from gradtrace.tracking.engines.base import Engine
from gradtrace.tracking.engines.local import LocalShards
from gradtrace.tracking.engines.split import SplitTracking, should_split
from gradtrace.tracking.engines.zero3 import Zero3Partitions


def choose_engine(named: list[tuple[str, torch.Tensor]], split: bool | None) -> Engine:
    """The engine for ``named`` (the tracked parameters); ``split`` as the tracker's argument."""
    sharded = [p for _, p in named if sharding.is_sharded(p)]
    if sharded:
        group = sharding.reduction_group(sharded)
        return Zero3Partitions(group) if any(sharding.is_zero3(p) for p in sharded) else LocalShards(group)
    if should_split(split, named):
        return SplitTracking(named)
    return LocalShards()
