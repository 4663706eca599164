"""DeepSpeed ZeRO-1/2: each rank keeps the fragments of its own optimizer partition.

The engine, not gradtrace, decides who holds what (:mod:`gradtrace.integrations.deepspeed` hands over
each rank's spans); one all-gather tells every rank which parameters the others hold whole (their owner)
and which are cut across ranks. Fragments start anywhere, so their masks are assembled unpacked.
Parameters added later are not assigned (the engine's partitions do not grow): every rank tracks them
whole, counted on the first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from gradtrace.tracking.engines.base import Span
from gradtrace.tracking.engines.split import SplitTracking


class EnginePartitions(SplitTracking):
    """Split tracking along spans the engine chose (a collective to build: every rank, together)."""

    def __init__(self, spans: Mapping[str, Span], named: Mapping[str, torch.Tensor]):
        super().__init__()
        self.loads = []  # the engine assigns parameters added later: none are expected
        held = {name: length for name, (_, length) in spans.items() if length}
        everyone: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, held, group=self.group)
        self.spans = dict(spans)
        self.straddling = {name for part in everyone for name, length in part.items()
                           if length < named[name].numel()}
        ranks = dist.get_process_group_ranks(self.group)
        self.owners = {name: ranks[r] for r, part in enumerate(everyone) for name, length in part.items()
                       if length == named[name].numel()}
