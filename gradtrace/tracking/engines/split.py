"""Replicated parameters (DDP, ZeRO-0): the tracking divided among the ranks.

Every rank holds the same parameters; each keeps state for a span of each (:mod:`gradtrace.tracking.split`
says how they are cut and assigned): whole on one rank, or, larger than a rank's share, cut into one span
per rank on byte boundaries. Every rank computes the same division without communicating, so parameters
added or resized mid-run (which every rank sees alike) are divided the same way everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gradtrace.tracking import split as splitting
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.engines.base import Engine, Placement, Span
from gradtrace.tracking.engines.local import place_local


def should_split(requested: bool | None, named: list[tuple[str, torch.Tensor]]) -> bool:
    """Whether to divide the tracking of ``named`` among the ranks (``split=`` of the tracker: ``None`` asks
    the ranks, with one small all-gather, whether they hold the same parameters)."""
    if requested is False or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        if requested:
            raise ValueError("split=True needs an initialised torch.distributed world of more than one rank")
        return False
    if any(getattr(p, "placements", None) is not None for _, p in named):
        return False  # Replicate-only DTensors: each rank's tensor is already its own part
    replicated = splitting.replicated_everywhere(named, dist.group.WORLD)
    if requested and not replicated:
        raise ValueError("split=True: the ranks do not hold the same parameters (names, shapes, dtypes, "
                         "values), so no rank can track another's")
    return replicated


class SplitTracking(Engine):
    """Spans of replicated parameters, one per rank. ``loads``: elements assigned to each rank so far (empty
    when an engine assigned the spans and nothing is assigned later)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]] = ()):
        self.group = dist.group.WORLD
        self.rank = dist.get_rank()
        self.spans: dict[str, Span] = {}
        self.owners: dict[str, int] = {}  # the rank keeping a parameter whole, where one does
        self.straddling: set[str] = set()  # parameters whose spans cut them across ranks
        self.loads = [0] * dist.get_world_size()
        self.add(list(named))

    def add(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Divide ``named`` among the ranks (gradtrace.tracking.split.divide), the same on every rank."""
        if not self.loads:
            return
        owners, cuts = splitting.divide([(name, p.numel()) for name, p in named], len(self.loads), self.loads)
        for name, param in named:
            if name in cuts:
                self.spans[name] = cuts[name][self.rank]
                self.straddling.add(name)
            else:
                self.owners[name] = owners[name]
                self.spans[name] = (0, param.numel()) if owners[name] == self.rank else (0, 0)

    def place(self, name: str, param: torch.Tensor, config: TrackerConfig) -> Placement:
        span = self.spans.get(name)
        if span is None:  # added after the engine assigned the spans: every rank tracks it whole
            return place_local(param, self.group, config)
        return Placement(offset=span[0], numel=span[1], weight=1, sample_start=(-span[0]) % config.stride,
                         span=span, owner=self.owners.get(name), straddling=name in self.straddling)

    def check_restart(self, name: str, param: torch.Tensor, former: torch.Tensor) -> None:
        super().check_restart(name, param, former)
        if name in self.straddling and not self.loads:
            raise ValueError(f"parameter {name!r} changed shape or dtype while its tracking is cut along "
                             "the engine's partitions (DeepSpeed ZeRO-1/2): not supported")

    def restart(self, name: str, former_numel: int, param: torch.Tensor) -> None:
        if name in self.straddling:  # cut anew, the same way on every rank
            world = len(self.loads)
            spans = splitting.cut(param.numel(), world)
            for rank, (old, new) in enumerate(zip(splitting.cut(former_numel, world), spans, strict=True)):
                self.loads[rank] += new[1] - old[1]  # parameters added later balance on true sizes
            self.spans[name] = spans[self.rank]
        elif name in self.spans:  # the same owner tracks it on, whole
            if self.loads:
                self.loads[self.owners[name]] += param.numel() - former_numel
            self.spans[name] = (0, param.numel()) if self.spans[name][1] else (0, 0)

    def gather_packed(self, name: str, bits: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
        """The full bit-packed mask of a split parameter of ``numel`` elements from this rank's packed mask of
        its span (a collective; spans on byte boundaries, see :attr:`Placement.packs_its_span`)."""
        owner = self.owners.get(name)
        if owner is not None:
            return splitting.broadcast_packed(bits, numel, owner, self.group, device)
        return splitting.gather_packed(bits, self.spans[name], numel, self.group, device)

    def gather(self, name: str, mask: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
        """The full packed mask from this rank's boolean mask of its span, spans starting anywhere."""
        return splitting.gather(mask, self.spans[name], numel, self.group, device)
