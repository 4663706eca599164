"""Every rank keeps the state of what it holds: one process, or parameters sharded by the engine.

A plain parameter is kept whole. A DTensor (FSDP2, HSDP, tensor parallelism) is kept as its local shard (:mod:`gradtrace.tracking.sharding`): its offset in the full parameter, its first
sampled element, and whether its counts enter the sums (once per distinct local part) follow from it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gradtrace.tracking import sharding
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.engines.base import Engine, Placement


def _contiguous(param: torch.Tensor) -> bool:
    """Whether the local shard is a contiguous run of the flattened full tensor: true unsharded, under
    ZeRO-3 and FSDP2's ``Shard(0)``; not for a DTensor sharded on another dim."""
    placements = getattr(param, "placements", None) if not sharding.is_zero3(param) else None
    return not placements or all(not p.is_shard() or p.dim == 0 for p in placements)


def place_local(param: torch.Tensor, group: dist.ProcessGroup | None, config: TrackerConfig) -> Placement:
    """The placement of a parameter whose local data (whole, or its shard) this rank keeps."""
    return Placement(
        offset=sharding.flat_offset(param),
        numel=sharding.local(param).numel(),
        weight=1 if group is None or sharding.counts_here(param, group) else 0,
        sample_start=sharding.sample_start(param, config.stride),
        sample_index=sharding.sample_index(param, config.stride) if config.tracks_sums else None,
        sharded=sharding.is_sharded(param),
        contiguous=_contiguous(param),
    )


class LocalShards(Engine):
    """One process, or sharded parameters (``group``: the ranks their counts are summed over)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def place(self, name: str, param: torch.Tensor, config: TrackerConfig) -> Placement:
        return place_local(param, self.group, config)
