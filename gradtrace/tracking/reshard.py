"""Tracker state saved by N processes, loaded by M: the state of each parameter cut anew.

Every rank keeps the state of a contiguous run of each flattened parameter (the whole of it; an FSDP2
``Shard(0)`` shard; a ZeRO-3 partition; a span of split tracking), so what a rank saved is described by
its *layout*, ``{name: (start, length)}``. Whatever the layouts, the saved runs of one parameter cover
it, and the state of any run can be cut out of them:

- per-element accumulators (the reference copy, the change signatures): the elements of the run;
- bit-packed masks: unpacked, the run's bits, packed again (runs need not start on a byte);
- sampled sums: the sampled elements are those whose global index is a multiple of the stride, so the
  ``k``-th sum of a run starting at ``s`` is global sample ``ceil(s / stride) + k``, whoever held it.

Counters that a run sums across ranks (:data:`gradtrace.tracking.state.COUNTER_REDUCE`) are added up
over the saved ranks when those summed them (a sharded or split run), else taken from one rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gradtrace.formats.bitpack import pack_bits, unpack_bits
from gradtrace.tracking.state import ACCUMULATOR, COUNTER_INDEX, COUNTER_REDUCE


@dataclass
class SavedPart:
    """One rank's saved state: its tensors and layout, and whether its counters were summed across ranks."""

    tensors: Mapping[str, torch.Tensor]
    layout: Mapping[str, tuple[int, int]]
    summed: bool
    source: str


def _samples_before(index: int, stride: int) -> int:
    """Sampled elements (global indices that are multiples of ``stride``) below ``index``."""
    return math.ceil(index / stride)


def cut(parts: list[SavedPart], name: str, key: str, numel: int, start: int, length: int,
        stride: int) -> torch.Tensor:
    """The state ``key`` of the run ``[start, start + length)`` of parameter ``name`` (``numel`` elements),
    assembled from the saved parts that hold pieces of it."""
    kind = ACCUMULATOR[key].kind  # how the accumulator is laid out over a run: the state table says
    pieces = [(p.layout[name], p.tensors.get(f"{key}/{name}"), p.source) for p in parts if name in p.layout]
    if not pieces or any(t is None for _, t, _ in pieces):
        raise ValueError(f"saved tracker state holds no {key!r} for parameter {name!r} (another model or "
                         "another TrackerConfig?)")
    total = _samples_before(numel, stride) if kind == "sampled" else numel
    like = pieces[0][1]
    full = torch.zeros(total, dtype=torch.bool if kind == "bits" else like.dtype)
    covered = torch.zeros(total, dtype=torch.bool)
    for (at, held), tensor, source in pieces:
        if at + held > numel:
            raise ValueError(f"{source}: the saved run of {name!r} ends past its {numel} elements (another model?)")
        if kind == "bits":
            values, first = unpack_bits(tensor, held), at
        elif kind == "sampled":
            values, first = tensor, _samples_before(at, stride)
        else:
            values, first = tensor.reshape(-1), at
        expected = _samples_before(at + held, stride) - first if kind == "sampled" else held
        if values.numel() != expected:
            raise ValueError(f"{source}: {key!r} of {name!r} has {values.numel()} values, expected {expected} "
                             "(saved with another sample_stride or another model?)")
        full[first:first + expected] = values.to(full.dtype)
        covered[first:first + expected] = True
    if kind == "sampled":
        first, last = _samples_before(start, stride), _samples_before(start + length, stride)
    else:
        first, last = start, start + length
    if not bool(covered[first:last].all()):
        raise ValueError(f"the saved tracker state does not cover all of {name!r} (a rank's file missing?)")
    piece = full[first:last]
    return pack_bits(piece) if kind == "bits" else piece.clone()


def counters(parts: list[SavedPart], *, keep_here: bool) -> torch.Tensor:
    """The run's counters as one rank of the loading run keeps them: the global values where ``keep_here``
    (the rank that contributes them to the sums, or a run that does not sum), zeros for the summed ones
    elsewhere."""
    first = parts[0].tensors["counters"]
    out = first.clone()
    for name, reduce in COUNTER_REDUCE.items():
        i = COUNTER_INDEX[name]
        if reduce == "sum":
            total = sum(int(p.tensors["counters"][i]) for p in parts) if parts[0].summed else int(first[i])
            out[i] = total if keep_here else 0
    return out
