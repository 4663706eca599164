"""Replicated parameters (DDP, DeepSpeed ZeRO-0/1/2): divide the tracking among the ranks.

Under data parallelism every rank holds the same parameters and, at the optimizer step, the same reduced
gradient; tracking all of them on every rank keeps N copies of the state and does the per-step work N
times. Instead each rank tracks a *span* of each parameter, a contiguous run ``[start, start + length)``
of the flattened parameter (maybe empty, maybe the whole of it), the spans of one parameter being disjoint
across ranks. The tracker then handles a span exactly as a shard of a sharded parameter whose local data
is that run: counts are summed across ranks at measuring time and masks assembled at export.

:func:`assign` gives whole parameters to ranks, greedily by size over sorted names, so every rank computes
the same assignment without communicating, and a parameter added mid-run (which every rank adds alike)
goes to the least loaded rank. Masks of a parameter one rank holds whole are computed there as without
splitting and broadcast from it at export. DeepSpeed ZeRO-1/2 supplies its own spans, the fragment of each
parameter in the rank's optimizer partition (:mod:`gradtrace.integrations.deepspeed`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from gradtrace.formats.bitpack import pack_bits, packed_length

Span = tuple[int, int]  # (start in the flattened parameter, length)


def assign(sizes: Iterable[tuple[str, int]], world: int, loads: list[int] | None = None) -> dict[str, int]:
    """The rank that tracks each parameter (whole), largest first (ties by name), each to the least loaded
    rank (ties: the lowest). ``loads`` (elements per rank so far) is updated in place, so later calls
    continue the same balance."""
    loads = loads if loads is not None else [0] * world
    owners = {}
    for name, numel in sorted(sizes, key=lambda item: (-item[1], item[0])):
        owner = min(range(world), key=lambda r: (loads[r], r))
        loads[owner] += numel
        owners[name] = owner
    return owners


def replicated_everywhere(named: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup) -> bool:
    """Whether every rank of ``group`` holds the same parameters (names, shapes, dtypes) with the same
    values, as DDP makes them at wrapping: then their tracking can be divided. One small all-gather; a
    few hundred values of each parameter stand for it (a checksum, not a proof, but ranks that train
    different models differ in them)."""
    sums = []
    for _, param in named:
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].double()
        sums.append(torch.stack([sample.sum(), sample.abs().sum()]).cpu())  # once, at construction
    values = torch.stack(sums).tolist() if sums else []
    fingerprint = [(name, tuple(p.shape), str(p.dtype), *v) for (name, p), v in zip(named, values, strict=True)]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, fingerprint, group=group)
    return all(other == gathered[0] for other in gathered)


def broadcast_packed(bits: torch.Tensor | None, numel: int, owner: int, group: dist.ProcessGroup,
                     device: torch.device) -> torch.Tensor:
    """The bit-packed mask of a parameter of ``numel`` elements that one rank (global rank ``owner``)
    holds whole: ``bits`` there (``None`` elsewhere), broadcast to every rank of ``group`` (a collective)."""
    packed = (bits.to(device) if dist.get_rank() == owner
              else torch.empty(packed_length(numel), dtype=torch.uint8, device=device))
    dist.broadcast(packed, src=owner, group=group)
    return packed


def gather(local_mask: torch.Tensor, span: Span, numel: int, group: dist.ProcessGroup,
           device: torch.device) -> torch.Tensor:
    """The full bit-packed mask of a parameter of ``numel`` elements cut between ranks, from each rank's
    boolean mask of its span (a collective: every rank calls it for the same parameters in the same order).

    The spans are disjoint, so the ranks' packed masks have no bit in common and their bytewise sum is
    their OR: one all-reduce of ``numel / 8`` bytes."""
    full = torch.zeros(numel, dtype=torch.bool, device=local_mask.device)
    start, length = span
    full[start:start + length] = local_mask.reshape(-1)
    packed = pack_bits(full).to(device)
    dist.all_reduce(packed, group=group)
    return packed
