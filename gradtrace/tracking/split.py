"""Replicated parameters (DDP, DeepSpeed ZeRO-0/1/2): divide the tracking among the ranks.

Under data parallelism every rank holds the same parameters and, at the optimizer step, the same reduced
gradient; tracking all of them on every rank keeps N copies of the state and does the per-step work N
times. Instead each rank tracks a *span* of each parameter, a contiguous run ``[start, start + length)``
of the flattened parameter (maybe empty, maybe the whole of it), the spans of one parameter being disjoint
across ranks. The tracker then handles a span exactly as a shard of a sharded parameter whose local data
is that run: counts are summed across ranks at measuring time and masks assembled at export.

:func:`divide` cuts a parameter larger than one rank's even share of the model (a tied embedding is 28%
of Qwen2-0.5B) into one span per rank, and :func:`assign` gives the others whole to ranks, greedily
by size over sorted names: every rank computes the same division without communicating, and a parameter
added mid-run (which every rank adds alike) goes to the least loaded rank. Whole parameters alone would
leave the busiest rank at least the largest parameter: 2.2x its share at 8 ranks on Qwen2-0.5B. Masks of a parameter one rank holds whole are computed there as without
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


def cut(numel: int, world: int) -> list[Span]:
    """``world`` contiguous spans covering ``numel`` elements, as even as possible with every nonempty one
    starting on a multiple of 8: the spans' bit-packed masks then share no byte (:func:`gather_packed`)."""
    chunk = -(-max(1, -(-numel // world)) // 8) * 8  # ceil(numel / world), rounded up to a multiple of 8
    starts = [min(r * chunk, numel) for r in range(world)]
    return [(start, min(chunk, numel - start)) for start in starts]


def divide(sizes: Iterable[tuple[str, int]], world: int,
           loads: list[int] | None = None) -> tuple[dict[str, int], dict[str, list[Span]]]:
    """``(owners, cuts)``: the parameters larger than one rank's even share of everything (``loads`` so far
    and ``sizes``) cut into one span per rank (``cuts[name][rank]``, :func:`cut`), the others given whole
    by :func:`assign` (``owners[name]``). ``loads`` is updated in place, as by :func:`assign`."""
    sizes = list(sizes)
    loads = loads if loads is not None else [0] * world
    share = (sum(loads) + sum(numel for _, numel in sizes)) / world
    cuts = {name: cut(numel, world) for name, numel in sizes if numel > share}
    for spans in cuts.values():
        for rank, (_, length) in enumerate(spans):
            loads[rank] += length
    owners = assign([(name, numel) for name, numel in sizes if name not in cuts], world, loads)
    return owners, cuts


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
    packed = (bits.to(device, copy=True) if dist.get_rank() == owner  # the caller's state stays its own
              else torch.empty(packed_length(numel), dtype=torch.uint8, device=device))
    dist.broadcast(packed, src=owner, group=group)
    return packed


def gather_packed(bits: torch.Tensor | None, span: Span, numel: int, group: dist.ProcessGroup,
                  device: torch.device) -> torch.Tensor:
    """The full bit-packed mask of a parameter of ``numel`` elements cut between ranks, from this rank's
    packed mask ``bits`` of its span, which starts on a byte (every span :func:`cut` makes; ``None``: an
    empty span). A collective: every rank calls it, or :func:`gather` for a span that starts elsewhere,
    for the same parameters in the same order.

    Each rank places its bytes in a zeroed full-length buffer; the spans share no byte, so the bytewise
    sum of the buffers is their OR: one all-reduce of ``numel / 8`` bytes."""
    start, length = span
    if start % 8 and length:
        raise ValueError(f"span {span} does not start on a byte: use gather()")
    packed = torch.zeros(packed_length(numel), dtype=torch.uint8, device=device)
    if bits is not None:
        packed[start // 8:start // 8 + bits.numel()] = bits.to(device)
    dist.all_reduce(packed, group=group)
    return packed


def gather(local_mask: torch.Tensor, span: Span, numel: int, group: dist.ProcessGroup,
           device: torch.device) -> torch.Tensor:
    """As :func:`gather_packed`, from this rank's boolean mask of a span that may start anywhere
    (DeepSpeed ZeRO-1/2's partition fragments): placed in a full-length boolean mask, packed, one
    all-reduce of the same size (disjoint spans: no bit in common, the bytewise sum is the OR)."""
    full = torch.zeros(numel, dtype=torch.bool, device=local_mask.device)
    start, length = span
    full[start:start + length] = local_mask.reshape(-1)
    packed = pack_bits(full).to(device)
    dist.all_reduce(packed, group=group)
    return packed
