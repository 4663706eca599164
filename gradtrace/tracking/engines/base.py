"""The base of the engines: a parameter's :class:`Placement`, and what every engine answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from gradtrace.tracking import sharding
from gradtrace.tracking.config import TrackerConfig

Span = tuple[int, int]  # (start in the flattened parameter, length)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the part of one parameter whose state this rank keeps lies, and how its counts combine."""

    offset: int  # index, in the flattened full parameter, of the first kept element
    numel: int  # kept elements
    weight: int  # 1 where this rank's counts enter the sums across ranks, 0 where another rank holds the same part
    sample_start: int  # first kept index whose global flat index is a multiple of the stride
    sample_index: torch.Tensor | None = None  # the sampled elements of a shard that is no contiguous run, listed
    span: Span | None = None  # split tracking: the kept run of the flattened parameter (None: its local shard)
    owner: int | None = None  # split tracking: the rank that keeps the parameter whole, where one does
    straddling: bool = False  # split tracking: cut across ranks (they agree on its gradient's finiteness)
    sharded: bool = False  # sharded across ranks by the engine itself (FSDP2, DTensor, ZeRO-3)
    contiguous: bool = True  # the kept part is one contiguous run of the flattened full parameter

    @property
    def keeps(self) -> bool:
        """Whether this rank keeps any state for the parameter (not so for another rank's split parameters)."""
        return self.span is None or self.span[1] > 0

    @property
    def agrees_on_finite(self) -> bool:
        """Whether the ranks agree whether its gradient is finite: each sees only its part."""
        return self.sharded or self.straddling

    @property
    def packs_its_span(self) -> bool:
        """Whether this rank's masks of a split parameter can be packed on their own and placed: held whole
        by one rank, or cut on byte boundaries (:func:`gradtrace.tracking.split.cut`), not ZeRO-1/2's
        partition fragments, which start anywhere."""
        return self.span is not None and (self.owner is not None or self.span[0] % 8 == 0 or self.span[1] == 0)

    def held(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept part of ``param`` (or of a tensor laid out like it: its gradient): the span when tracking
        is split, else the local shard (:func:`gradtrace.tracking.sharding.local`)."""
        if self.span is None:
            return sharding.local(tensor)
        flat = tensor.reshape(-1)
        return flat.narrow(0, *self.span) if flat.numel() != self.span[1] else flat


class Engine:
    """How the ranks divide the tracking of the parameters. ``group``: where counts are summed and masks
    gathered (``None``: one process, or every rank tracks everything alone)."""

    group: dist.ProcessGroup | None = None

    def check_group(self) -> None:
        """Before a collective: refuse one over a world that ``dist.destroy_process_group()`` ended. The group
        object may outlive it (DDP's reducer, DeepSpeed's parameters hold it), and a collective over it then
        runs, or waits forever for a rank that has gone."""
        if self.group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("gradtrace: this tracker's state is divided among processes whose process group "
                               "was destroyed; gather it (finish(), save_state(), measure()) before "
                               "dist.destroy_process_group()")

    def place(self, name: str, param: torch.Tensor, config: TrackerConfig) -> Placement:
        raise NotImplementedError

    def check_restart(self, name: str, param: torch.Tensor, former: torch.Tensor) -> None:
        """Refuse, before anything changes, a parameter that cannot restart with another shape or dtype."""
        if sharding.is_sharded(param) or sharding.is_sharded(former):
            raise ValueError(f"parameter {name!r} changed shape or dtype while sharded: not supported")

    def restart(self, name: str, former_numel: int, param: torch.Tensor) -> None:
        """A parameter now has another size: divide it anew (the same way on every rank)."""

    def add(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Parameters tracked from now on (every rank adds the same ones, in the same order)."""
