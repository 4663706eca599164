"""Reading the state: per-parameter counts (:meth:`Measuring.measure`) and masks for export
(:meth:`Measuring.packed_masks`), one host sync per call, summed or gathered across ranks.

:class:`Measuring` is the read half of :class:`~gradtrace.tracking.tracker.GradTracker`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.anatomy.experts import ExpertLayout
from gradtrace.formats.bitpack import pack_bits, popcount, unpack_bits
from gradtrace.formats.masks_file import PackedMask
from gradtrace.tracking import sharding, slices
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.kernels import numpy_measure, torch_path
from gradtrace.tracking.state import COUNTER_INDEX, COUNTER_REDUCE, COUNTERS

_local = sharding.local
_to = torch_path.to_device

# Per-parameter counts produced by measure(); fractions are derived in gradtrace.tracking.summary.
COUNT_FIELDS: tuple[str, ...] = (
    "numel",
    "gradient",  # elements that ever received a finite nonzero gradient
    "updated",  # stored value differs bitwise from the reference
    "updated_abs",  # |θ - θ0| > abs_tolerance (delta in the storage dtype, as the paper's script)
    "updated_rel",  # |θ - θ0| > rel_tolerance * max(|θ|, |θ0|) (Zhu et al.)
    "gradient_and_updated",
    "ever_changed",  # ever changed by some step (ever_changed mode; else 0)
    "sampled",  # elements with gradient sums
    "sampled_gradient",
    "sampled_gradient_unchanged",
    "sampled_cancelled",  # sampled, gradient, unchanged, |Σg| <= ε Σ|g|
)

_local = sharding.local
_to = torch_path.to_device


@dataclass
class Measurement:
    """Counts at one moment: per parameter, plus tracker-wide counters and a ratio histogram."""

    step: int
    per_param: dict[str, dict[str, int]]
    counters: dict[str, int]
    cancellation_histogram: list[int]  # counts of |Σg|/Σ|g| in equal bins over [0, 1], sampled elements
    config: TrackerConfig = field(default_factory=TrackerConfig)
    # fused expert tensors: one count dict per expert (its slice along dim 0), same fields as per_param
    per_slice: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    experts: ExpertLayout = field(default_factory=ExpertLayout)


class Measuring:
    """Measuring the state (a part of GradTracker, which sets up what it reads)."""

    @torch.no_grad()
    def _update_masks(self, name: str, param: nn.Parameter, state: Mapping[str, torch.Tensor]):
        current = self._held(name, param).detach().reshape(-1)
        return torch_path.update_masks(current, _to(state["reference"], current.device).reshape(-1), self.config)

    @torch.no_grad()
    def measure(self) -> Measurement:
        """Per-parameter counts of every category, with a single device-to-host transfer."""
        self._engine.check_group()
        cfg = self.config
        bins = cfg.histogram_bins
        histogram = torch.zeros(bins, dtype=torch.int64, device=self._primary)
        count = torch.count_nonzero  # on a bool mask: no int64 copy, unlike .sum()
        rows, slice_blocks = [], []
        # CPU parameters: chunked NumPy passes, host counts (gradtrace.tracking.kernels.numpy_measure), identical results.
        fast = self._backend.measurer(bins)
        for name, param in self._params:
            placement = self._placements[name]
            state = self.state[name]
            local = placement.held(param).detach()
            self._check_dtype(name, local)
            if not placement.weight or not placement.keeps:  # another rank counts this part: nothing to add
                rows.append(torch.zeros(len(COUNT_FIELDS), dtype=torch.int64, device=self._primary))
                if name in self._expert_slices:  # the same layout of the summed vector on every rank
                    slice_blocks.append(torch.zeros(self._expert_slices[name], len(COUNT_FIELDS),
                                                    dtype=torch.int64, device=self._primary))
                continue
            listed = placement.sample_index is not None  # sampled elements by index: the torch path
            experts = self._expert_slices.get(name)
            if fast is not None and not listed and numpy_measure.supports(local, state["reference"]):
                if experts is None:
                    row = fast.row(local, state["reference"], state, cfg, sample_start=placement.sample_start)
                else:
                    row, packed = fast.row_and_masks(local, state["reference"], state, cfg,
                                                     sample_start=placement.sample_start)
                    slice_blocks.append(self._slice_rows(name, param, packed))
                rows.append(torch.tensor(row, dtype=torch.int64, device=self._primary))
                continue
            numel = local.numel()
            gradient = unpack_bits(state["gradient_bits"], numel)
            updated, updated_abs, updated_rel = self._update_masks(name, param, state)
            zero = torch.zeros((), dtype=torch.int64, device=gradient.device)
            ever = popcount(state["ever_changed_bits"]) if cfg.ever_changed else zero
            if cfg.tracks_sums:
                sampled_gradient = self._sampled(placement, gradient)
                signed, absolute = state["signed_sum"].abs(), state["abs_sum"]
                unchanged = sampled_gradient & self._sampled(placement, updated).logical_not()
                cancelled = unchanged & signed.le(absolute * cfg.cancel_epsilon)
                ratio = (signed / absolute.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(0, 1)
                ratio.nan_to_num_(nan=1.0)  # inf / inf (both sums overflowed): the last bin, not a bad index
                bucket = (ratio * bins).long().clamp_(max=bins - 1)
                histogram.index_add_(0, bucket.to(self._primary), sampled_gradient.long().to(self._primary))
                sampled = (torch.tensor(sampled_gradient.numel(), device=gradient.device),
                           count(sampled_gradient), count(unchanged), count(cancelled))
            else:
                sampled = (zero, zero, zero, zero)
            row = torch.stack([
                torch.tensor(numel, device=gradient.device), count(gradient), count(updated), count(updated_abs),
                count(updated_rel), count(gradient & updated), ever, *sampled,
            ]).to(self._primary)
            rows.append(row)
            if experts is not None:
                slice_blocks.append(self._slice_rows(name, param, [pack_bits(m) for m in
                                                                   (updated, updated_abs, updated_rel)]))
        if fast is not None:
            histogram += torch.from_numpy(fast.histogram).to(self._primary)
        local_counters = self.counters.clone()
        if self._group is not None:
            # Counts of local shards add up to the full parameters' counts; already-global counters are
            # zeroed on all ranks but one so the same all-reduce leaves them as they are.
            for name, reduce in COUNTER_REDUCE.items():
                if reduce == "none" and dist.get_rank(self._group) != 0:
                    local_counters[COUNTER_INDEX[name]] = 0
        flat = torch.cat([torch.stack(rows).reshape(-1), histogram, local_counters,
                          *(block.reshape(-1) for block in slice_blocks)])
        if self._group is not None:
            flat = _to(flat, self._collective_device)
            dist.all_reduce(flat, group=self._group)
        table = flat.tolist()  # the one device-to-host sync
        width = len(COUNT_FIELDS)
        per_param = {
            name: dict(zip(COUNT_FIELDS, table[i * width:(i + 1) * width], strict=True))
            for i, (name, _) in enumerate(self._params)
        }
        offset = len(self._params) * width
        end = offset + bins + len(COUNTERS)
        per_slice = {}
        for name, experts in self._expert_slices.items():
            per_slice[name] = [dict(zip(COUNT_FIELDS, table[end + e * width:end + (e + 1) * width], strict=True))
                               for e in range(experts)]
            end += experts * width
        return Measurement(
            step=self.steps,
            per_param=per_param,
            cancellation_histogram=table[offset:offset + bins],
            counters=dict(zip(COUNTERS, table[offset + bins:offset + bins + len(COUNTERS)], strict=True)),
            config=cfg,
            per_slice=per_slice,
            experts=self.experts,
        )

    def _slice_rows(self, name: str, param: nn.Parameter, update_bits) -> torch.Tensor:
        """Per-expert counts of a fused expert tensor's local shard (gradtrace.tracking.slices), as an
        ``(experts, len(COUNT_FIELDS))`` tensor on the primary device, ready to be summed across ranks."""
        state = self.state[name]
        placement = self._placements[name]
        experts = self._expert_slices[name]
        device = state["gradient_bits"].device
        masks = {"gradient": state["gradient_bits"]}
        masks.update(zip(("updated", "updated_abs", "updated_rel"), (b.to(device) for b in update_bits), strict=True))
        if self.config.ever_changed:
            masks["ever_changed"] = state["ever_changed_bits"]
        sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
        full = math.prod(sharding.full_shape(param))
        return slices.slice_rows(masks, sums, config=self.config, slices=experts, slice_numel=full // experts,
                                 offset=placement.offset, local_numel=placement.numel,
                                 sample_start=placement.sample_start).to(self._primary)

    @torch.no_grad()
    def packed_masks(self) -> dict[str, dict[str, PackedMask]]:
        """The masks for export, bit-packed on the CPU: ``{kind: {name: PackedMask}}``, full shapes.

        Kinds: ``gradient``, ``update`` (bitwise), ``update_abs_<tol>``, ``update_rel_<tol>`` and, in
        ``ever_changed`` mode, ``ever_changed``. Sharded parameters are gathered (a collective).
        """
        self._engine.check_group()
        cfg = self.config
        kinds = ["gradient", "update", f"update_abs_{cfg.abs_tolerance:g}", f"update_rel_{cfg.rel_tolerance:g}"]
        if cfg.ever_changed:
            kinds.append("ever_changed")
        out: dict[str, dict[str, PackedMask]] = {kind: {} for kind in kinds}
        fast = self._backend.measurer(cfg.histogram_bins)
        for name, param in self._params:
            state = self.state[name]
            placement = self._placements[name]
            held = placement.held(param)
            numel = held.numel()
            self._check_dtype(name, held)
            if placement.packs_its_span:  # split: packed here as if unsplit, then assembled
                mine = self._packed_held(name, param, held, fast) if placement.keeps else [None] * len(kinds)
                packed = [self._engine.gather_packed(name, bits, param.numel(), self._collective_device)
                          for bits in mine]
            elif placement.sharded or placement.span is not None:
                masks = [unpack_bits(state["gradient_bits"], numel), *self._update_masks(name, param, state)]
                if cfg.ever_changed:
                    masks.append(unpack_bits(state["ever_changed_bits"], numel))
                if placement.span is not None:
                    packed = [self._engine.gather(name, m, param.numel(), self._collective_device) for m in masks]
                else:
                    packed = [pack_bits(sharding.gather_full(m, param)) for m in masks]
            else:
                packed = self._packed_held(name, param, _local(param), fast)
            for kind, bits in zip(kinds, packed, strict=True):
                out[kind][name] = PackedMask(bits.to("cpu", copy=True), sharding.full_shape(param))
        return out

    def _packed_held(self, name: str, param: nn.Parameter, held: torch.Tensor,
                     fast: numpy_measure.CpuMeasurer | None) -> list[torch.Tensor]:
        """The packed masks of the part of a parameter this rank keeps (``held``: its data): the gradient
        bits as kept, the update masks from the CPU scan where it applies (packed as it goes, no boolean
        masks), and the ever-changed bits."""
        state = self.state[name]
        local = held.detach()
        if fast is not None and numpy_measure.supports(local, state["reference"]):
            update = fast.update_masks(local, state["reference"], state, self.config)
        else:
            update = [pack_bits(m) for m in self._update_masks(name, param, state)]
        packed = [state["gradient_bits"], *update]
        if self.config.ever_changed:
            packed.append(state["ever_changed_bits"])
        return packed
