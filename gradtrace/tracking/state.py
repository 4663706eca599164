"""Per-parameter tracker state, declared once.

Each accumulator says how long it is for a parameter of ``numel`` elements, its dtype, where it lives
and how it combines across data-parallel ranks. Allocation, checkpoint save/restore and distributed
merging all iterate over these declarations instead of naming fields one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from gradtrace.formats.bitpack import packed_length
from gradtrace.tracking.config import TrackerConfig

Reduce = Literal["or", "sum", "none"]
Placement = Literal["param", "reference"]


def sampled_length(numel: int, stride: int, start: int = 0) -> int:
    """Elements ``start, start + stride, ...`` of a flattened (local) parameter: those with gradient sums."""
    return max(0, math.ceil((numel - start) / stride))


@dataclass(frozen=True)
class Accumulator:
    """One per-parameter state tensor."""

    name: str
    reduce: Reduce  # across data-parallel ranks: bitwise OR, SUM, or identical on every rank
    length: Callable[[int, TrackerConfig, int], int]  # (local numel, config, sample start) -> elements
    dtype: Callable[[torch.dtype], torch.dtype]
    enabled: Callable[[TrackerConfig], bool]
    placement: Placement = "param"
    doc: str = ""


ACCUMULATORS: tuple[Accumulator, ...] = (
    Accumulator("gradient_bits", "or", lambda n, c, s: packed_length(n), lambda d: torch.uint8,
                lambda c: True, doc="bit i set once element i received a finite nonzero gradient"),
    Accumulator("signed_sum", "sum", lambda n, c, s: sampled_length(n, c.stride, s), lambda d: torch.float32,
                lambda c: c.tracks_sums, doc="sum of finite gradients, on the sampled elements"),
    Accumulator("abs_sum", "sum", lambda n, c, s: sampled_length(n, c.stride, s), lambda d: torch.float32,
                lambda c: c.tracks_sums, doc="sum of |finite gradients|, on the sampled elements"),
    Accumulator("ever_changed_bits", "or", lambda n, c, s: packed_length(n), lambda d: torch.uint8,
                lambda c: c.ever_changed, doc="bit i set once an optimizer step changed element i"),
    Accumulator("last_values", "none", lambda n, c, s: n, lambda d: d,
                lambda c: c.ever_changed, doc="each element's value after the last step (exact change detector)"),
    Accumulator("reference", "none", lambda n, c, s: n, lambda d: d,
                lambda c: True, placement="reference", doc="the element's value when tracking began"),
)

# Tracker-wide counters, kept on the device as one int64 vector so a step adds to them without any
# host sync. "sum": local to this rank's shards, summed across ranks when measured; "none": already
# global (the per-step gradient total is reduced across shards before it is tested for zero).
COUNTER_REDUCE: dict[str, Reduce] = {
    "zero_gradient_steps": "none",  # optimizer steps whose gradient was exactly zero everywhere
    "nonfinite_gradient_steps": "none",  # optimizer steps with a NaN/inf anywhere in the gradient
    "discarded_gradient_elements": "sum",  # elements of parameters whose step gradient held NaN/inf (ignored)
    "density_nonzero": "sum",  # elements with a nonzero gradient at the latest detailed step
    "density_step": "none",  # the optimizer step that density_nonzero describes (0: none yet)
    "changed_elements_total": "sum",  # sum over steps of elements changed by that step (ever_changed mode)
    "last_step_changed": "sum",  # elements changed by the latest step (ever_changed mode)
    "skipped_overflow_steps": "none",  # steps the engine skipped for an overflow (no bit, no sum); appended last
}
COUNTERS: tuple[str, ...] = tuple(COUNTER_REDUCE)
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}
# How many counters earlier gradtrace versions saved (each list a prefix of COUNTERS): their states still
# load, the newer counters starting at 0.
EARLIER_COUNTER_COUNTS = (COUNTER_INDEX["skipped_overflow_steps"],)
# Accumulators that earlier gradtrace versions saved and this one no longer keeps: a saved state holding
# them still loads, without them. ``last_lowbits`` was a 1-byte XOR signature of each element that missed
# some changes; its exact successor ``last_values`` starts from the parameter's current values, which after
# a resume are the checkpoint's: the values after the last step, as it should.
RETIRED_ACCUMULATORS = ("last_lowbits",)


def enabled_accumulators(config: TrackerConfig) -> list[Accumulator]:
    return [acc for acc in ACCUMULATORS if acc.enabled(config)]


def bytes_per_element(config: TrackerConfig, param_dtype: torch.dtype, *, placement: Placement = "param") -> float:
    """State bytes per tracked element, asymptotically, for accumulators at ``placement``."""
    n = 1 << 20
    total = 0
    for acc in enabled_accumulators(config):
        if acc.placement == placement:
            total += acc.length(n, config, 0) * torch.empty((), dtype=acc.dtype(param_dtype)).element_size()
    return total / n
