"""DeepSpeed ZeRO-3: each rank keeps the state of its own partition of every parameter.

A partitioned parameter's data lives in ``ds_tensor``, a contiguous run of the flattened parameter starting
at ``partition size * rank`` (:func:`gradtrace.tracking.sharding.flat_offset`); partitions are disjoint,
so every rank's counts enter the sums. The padding of the last partitions is not tracked: only the valid
part of ``ds_tensor`` is kept (:func:`gradtrace.tracking.sharding.local`, read afresh at every use).
"""

from __future__ import annotations

import torch

from gradtrace.tracking import sharding
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.engines.base import Placement
from gradtrace.tracking.engines.local import LocalShards


def place_partition(param: torch.Tensor, config: TrackerConfig) -> Placement:
    """The placement of this rank's ZeRO-3 partition of ``param``."""
    offset = sharding.flat_offset(param)
    return Placement(offset=offset, numel=sharding.local(param).numel(), weight=1,
                     sample_start=(-offset) % config.stride, sharded=True)


class Zero3Partitions(LocalShards):
    """ZeRO-3 partitioned parameters (others, if any, as :class:`LocalShards` keeps them)."""

    def place(self, name: str, param: torch.Tensor, config: TrackerConfig) -> Placement:
        if sharding.is_zero3(param):
            return place_partition(param, config)
        return super().place(name, param, config)
