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
Kind = Literal["bits", "sampled", "elements"]
Placement = Literal["param", "reference"]
Init = Literal["zeros", "copy"]


def sampled_length(numel: int, stride: int, start: int = 0) -> int:
    """Elements ``start, start + stride, ...`` of a flattened (local) parameter: those with gradient sums."""
    return max(0, math.ceil((numel - start) / stride))


@dataclass(frozen=True)
class Accumulator:
    """One per-parameter state tensor, and everything that handles it reads from here.

    ``kind`` says how it is laid out over the part of a parameter a rank keeps: ``"bits"``, one bit per
    element, bit-packed; ``"sampled"``, one value per sampled element (global flat index a multiple of the
    stride); ``"elements"``, one value per element. Allocation, checkpoint re-cutting
    (:mod:`gradtrace.tracking.reshard`) and :meth:`GradTracker.state_bytes` follow it.
    """

    name: str
    kind: Kind
    reduce: Reduce  # across data-parallel ranks: bitwise OR, SUM, or identical on every rank
    dtype: torch.dtype | None  # None: the parameter's own dtype
    enabled: Callable[[TrackerConfig], bool]
    placement: Placement = "param"  # beside the parameter, or on config.reference_device
    init: Init = "zeros"  # or a copy of the kept values
    flat: bool = True  # False: shaped like the kept values (the reference copy, as it was always saved)
    doc: str = ""

    def length(self, numel: int, config: TrackerConfig, sample_start: int = 0) -> int:
        """Elements of this accumulator for a kept run of ``numel`` elements whose first sample is at
        ``sample_start``."""
        if self.kind == "bits":
            return packed_length(numel)
        if self.kind == "sampled":
            return sampled_length(numel, config.stride, sample_start)
        return numel

    def dtype_for(self, param_dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None else param_dtype


def _always(config: TrackerConfig) -> bool:
    return True


def _sums(config: TrackerConfig) -> bool:
    return config.tracks_sums


def _ever_changed(config: TrackerConfig) -> bool:
    return config.ever_changed


ACCUMULATORS: tuple[Accumulator, ...] = (
    Accumulator("gradient_bits", "bits", "or", torch.uint8, _always,
                doc="bit i set once element i received a finite nonzero gradient"),
    Accumulator("signed_sum", "sampled", "sum", torch.float32, _sums,
                doc="sum of finite gradients, on the sampled elements"),
    Accumulator("abs_sum", "sampled", "sum", torch.float32, _sums,
                doc="sum of |finite gradients|, on the sampled elements"),
    Accumulator("ever_changed_bits", "bits", "or", torch.uint8, _ever_changed,
                doc="bit i set once an optimizer step changed element i"),
    Accumulator("last_values", "elements", "none", None, _ever_changed, init="copy",
                doc="each element's value after the last step (exact change detector)"),
    Accumulator("reference", "elements", "none", None, _always, placement="reference", init="copy", flat=False,
                doc="the element's value when tracking began"),
)
ACCUMULATOR = {acc.name: acc for acc in ACCUMULATORS}

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
            total += acc.length(n, config) * torch.empty((), dtype=acc.dtype_for(param_dtype)).element_size()
    return total / n


def allocate(accumulators: list[Accumulator], held: torch.Tensor, config: TrackerConfig, sample_start: int,
             sampled: int | None = None) -> dict[str, torch.Tensor]:
    """Fresh state for the kept values ``held`` (detached): zeros, or copies of the values, each where its
    accumulator's placement says. ``sampled``: the number of listed sampled elements of a shard that is no
    contiguous run (they replace the stride count)."""
    numel = held.numel()
    reference_device = torch.device(config.reference_device)
    state: dict[str, torch.Tensor] = {}
    for acc in accumulators:
        device = reference_device if acc.placement == "reference" else held.device
        if acc.init == "copy":
            copy = held.to(device, copy=True)
            if device.type == "cpu" and held.device.type == "cuda":
                copy = copy.pin_memory()  # lets measure() copy it back without a host sync
            state[acc.name] = copy.reshape(-1) if acc.flat else copy
            continue
        length = sampled if acc.kind == "sampled" and sampled is not None else acc.length(numel, config, sample_start)
        state[acc.name] = torch.zeros(length, dtype=acc.dtype_for(held.dtype), device=device)
    return state


def state_bytes(state: dict[str, dict[str, torch.Tensor]], counters: torch.Tensor, extra_device: int = 0
                ) -> dict[str, int]:
    """Measured bytes of tracker state, by where each accumulator's placement puts it: ``"device"`` (beside
    the parameter, with the counters and ``extra_device``) or ``"reference"``."""
    out = {"device": counters.numel() * counters.element_size() + extra_device, "reference": 0}
    for kept in state.values():
        for key, value in kept.items():
            where = "reference" if ACCUMULATOR[key].placement == "reference" else "device"
            out[where] += value.numel() * value.element_size()
    return out
