"""Counts per slice of one parameter: the routed experts of a fused 3-D expert tensor.

Expert ``e`` of a tensor with ``E`` experts along dim 0 is the run ``[e·S, (e+1)·S)`` of the flattened
full tensor (``S = numel / E``). A rank may hold only part of it (FSDP2 shards dim 0, ZeRO-3 flat
partitions cross expert boundaries), so the runs are placed relative to the local shard's offset in the
flattened full tensor and clipped to it: every rank fills the rows of the experts it holds (partially),
and the rows add up across ranks like the per-parameter counts do.

Everything is a few whole-tensor ops at measuring time, no Python loop per expert: the bits set in
``[a, b)`` of a bit-packed mask are ``prefix(b) - prefix(a)``, where ``prefix`` comes from a cumulative
popcount of the bytes plus the low bits of the byte a boundary falls in (expert runs need not start on a
byte boundary), and the sampled elements (gradient sums) are binned by the expert their index falls in.
"""

from __future__ import annotations

import torch

from gradtrace.tracking.config import TrackerConfig

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def slice_bounds(slices: int, slice_numel: int, offset: int, local_numel: int, device: torch.device) -> torch.Tensor:
    """``slices + 1`` local element indices: slice ``e`` is local ``[bounds[e], bounds[e + 1])`` (maybe empty)."""
    starts = torch.arange(slices + 1, dtype=torch.int64, device=device) * slice_numel - offset
    return starts.clamp_(0, local_numel)


def bits_in_runs(packed: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Set bits of a bit-packed mask (``bitpack`` layout) in each run ``[bounds[e], bounds[e + 1])``."""
    packed = packed.reshape(-1)
    table = _POPCOUNT.to(packed.device)
    bytes_before = torch.zeros(packed.numel() + 1, dtype=torch.int64, device=packed.device)
    torch.cumsum(table[packed.long()], 0, out=bytes_before[1:])
    whole, partial = bounds // 8, bounds % 8
    # the low `partial` bits of the byte the boundary falls in (none when it is on a byte boundary)
    byte = packed.long().index_select(0, whole.clamp(max=max(packed.numel() - 1, 0))) if packed.numel() else whole
    low = table[byte & (torch.ones_like(partial).bitwise_left_shift_(partial) - 1)]  # partial 0: mask 0
    prefix = bytes_before.index_select(0, whole) + low
    return prefix[1:] - prefix[:-1]


def _bits_at(packed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The bits at ``positions`` of a bit-packed mask, as booleans."""
    return ((packed.reshape(-1).index_select(0, positions // 8) >> (positions % 8).to(torch.uint8)) & 1).bool()


def slice_rows(masks: dict[str, torch.Tensor], sums: tuple[torch.Tensor, torch.Tensor] | None, *,
               config: TrackerConfig, slices: int, slice_numel: int, offset: int, local_numel: int,
               sample_start: int) -> torch.Tensor:
    """``(slices, len(COUNT_FIELDS))`` int64 counts, in ``COUNT_FIELDS`` order, of this rank's share of
    each slice.

    ``masks``: bit-packed ``gradient``, ``updated``, ``updated_abs``, ``updated_rel`` (and ``ever_changed``
    in that mode) of the local shard, all on one device; ``sums``: the sampled signed / absolute sums.
    """
    gradient = masks["gradient"]
    device = gradient.device
    bounds = slice_bounds(slices, slice_numel, offset, local_numel, device)
    both = gradient.reshape(-1)[: masks["updated"].numel()] & masks["updated"].reshape(-1)
    zero = torch.zeros(slices, dtype=torch.int64, device=device)
    columns = [bounds[1:] - bounds[:-1], bits_in_runs(gradient, bounds), bits_in_runs(masks["updated"], bounds),
               bits_in_runs(masks["updated_abs"], bounds), bits_in_runs(masks["updated_rel"], bounds),
               bits_in_runs(both, bounds),
               bits_in_runs(masks["ever_changed"], bounds) if "ever_changed" in masks else zero]
    if sums is not None and sums[0].numel():
        signed, absolute = sums[0].to(device).abs(), sums[1].to(device)
        positions = sample_start + torch.arange(signed.numel(), dtype=torch.int64, device=device) * config.stride
        expert = torch.div(positions + offset, slice_numel, rounding_mode="floor").clamp_(max=slices - 1)
        sampled_gradient = _bits_at(gradient, positions)
        unchanged = sampled_gradient & _bits_at(masks["updated"], positions).logical_not()
        cancelled = unchanged & signed.le(absolute * config.cancel_epsilon)  # as GradTracker.measure
        columns += [zero.index_add(0, expert, torch.ones_like(positions))]
        columns += [zero.index_add(0, expert, m.long()) for m in (sampled_gradient, unchanged, cancelled)]
    else:
        columns += [zero] * 4
    return torch.stack(columns, dim=1)
