"""The core tracker: per-parameter gradient and update state, kept beside each parameter.

Call :meth:`GradTracker.observe_gradients` once per optimizer step while ``.grad`` holds the gradient
the optimizer is about to apply (after accumulation and clipping), and :meth:`observe_update` right
after ``optimizer.step()``. Both only queue tensor ops on the parameters' devices: no host sync.
:meth:`measure` (at logging steps) turns the state into per-parameter counts with one host sync.

This module knows nothing of transformers, TRL or W&B.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.anatomy.experts import ExpertLayout, expert_layout
from gradtrace.formats.bitpack import or_pack_into, pack_bits, popcount, unpack_bits
from gradtrace.formats.masks_file import PackedMask
from gradtrace.tracking import cpu_measure, cpu_scan, sharding, slices
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.state import (
    COUNTER_INDEX,
    COUNTER_REDUCE,
    COUNTERS,
    enabled_accumulators,
    lowbits_dtype,
)

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

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_local = sharding.local


def _raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of equal width, for bitwise comparison."""
    return tensor.view(_INT_VIEW[tensor.element_size()])


def _change_signature(tensor: torch.Tensor) -> torch.Tensor:
    """Per element, the XOR of its bytes (2-byte dtypes) or of its 16-bit halves (wider dtypes).

    Any change of fewer than 256 (resp. 65536) units in the last place alters it, and so does a sign
    flip, which a plain low-byte snapshot misses when a weight crosses zero symmetrically.
    """
    low = lowbits_dtype(tensor.dtype)
    width = tensor.element_size() // torch.empty((), dtype=low).element_size()
    parts = tensor.reshape(-1).view(low).reshape(-1, width)
    if width == 1:  # 1-byte dtypes: the value itself
        return parts[:, 0].clone()
    signature = parts[:, 0] ^ parts[:, 1]
    for i in range(2, width):
        signature ^= parts[:, i]
    return signature


@functools.cache
def _inf_bits(dtype: torch.dtype) -> int:
    """The bit pattern of +inf in ``dtype``, as an integer of the same width."""
    return int(torch.tensor(float("inf"), dtype=dtype).view(_INT_VIEW[dtype.itemsize]).item())


def _scan_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's gradient in three facts: ``(nonzero, any_nonzero, all_finite)``.

    ``nonzero`` is the elementwise mask ``grad != 0`` and ``any_nonzero`` its ``any()``, NaN/inf counted
    as nonzero (the caller drops a gradient that is not ``all_finite``); the flags are 0-d booleans on
    its device. For IEEE floats it works on the raw bits: with the sign cleared, a value is zero iff its
    bits are 0 and finite iff they are below those of +inf, so one integer mask, one compare and one
    max-reduction do it, several times cheaper than ``isfinite``/``ne`` on bf16, whose float ops
    convert every element.
    """
    width = grad.element_size()
    if not grad.is_floating_point() or width not in (2, 4, 8) or grad.dtype == torch.float8_e4m3fn:
        nonzero = grad.ne(0)
        return nonzero, nonzero.any(), torch.isfinite(grad).all()
    bits = grad.view(_INT_VIEW[width])
    magnitude = bits & torch.iinfo(bits.dtype).max  # clears the sign bit: -0.0 -> 0, -x -> x
    if magnitude.numel() == 0:
        nothing = magnitude.ne(0)
        return nothing, nothing.any(), nothing.all()
    peak = magnitude.amax()
    return magnitude.ne(0), peak.ne(0), peak.lt(_inf_bits(grad.dtype))


class _StepFlags:
    """One step's per-parameter facts from the CPU path, combined on the host as they come."""

    def __init__(self):
        self.seen = self.some_nonzero = self.some_nonfinite = False
        self.discarded = self.nonzero = 0

    def add(self, any_nonzero: bool, finite: bool, numel: int, nonzero: int | None) -> None:
        self.seen = True
        if finite:
            self.some_nonzero |= any_nonzero
            self.nonzero += nonzero or 0
        else:  # dropped whole for this step
            self.some_nonfinite = True
            self.discarded += numel


def strip_wrapper_prefix(name: str) -> str:
    """Parameter name as the unwrapped model reports it (no DDP ``module.`` / compile prefixes)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


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


class GradTracker:
    """Tracks, for every trainable parameter, which elements received a gradient and which changed.

    Args:
        model: a module (its ``requires_grad`` parameters are tracked) or ``(name, parameter)`` pairs.
        config: what to track; see :class:`TrackerConfig` for the bytes per parameter of each mode.

    Under FSDP2 (parameters sharded as DTensors) each rank keeps state for its local shard only; then
    :meth:`measure` and :meth:`packed_masks` are collectives that every rank must call together.
    """

    def __init__(self, model: nn.Module | Iterable[tuple[str, nn.Parameter]], config: TrackerConfig | None = None):
        self.config = config or TrackerConfig()
        named = model.named_parameters() if isinstance(model, nn.Module) else model
        self._params: list[tuple[str, nn.Parameter]] = [
            (strip_wrapper_prefix(name), p) for name, p in named if p.requires_grad
        ]
        if not self._params:
            raise ValueError("GradTracker found no trainable parameters (requires_grad=True) to track")
        names = [name for name, _ in self._params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names are not unique after removing wrapper prefixes")
        self._accumulators = enabled_accumulators(self.config)
        self._primary = _local(self._params[0][1]).device
        sharded = [p for _, p in self._params if sharding.is_sharded(p)]
        self._group = sharding.shard_group(sharded[0]) if sharded else None
        self._sample_start = {name: sharding.sample_start(p, self.config.stride) for name, p in self._params}
        self.steps = 0
        # CPU gradients go through NumPy (gradtrace.tracking.cpu_scan); None forces the torch path everywhere.
        self._cpu_scanner: cpu_scan.CpuScanner | None = cpu_scan.CpuScanner()
        # CPU parameters are measured through NumPy (gradtrace.tracking.cpu_measure); False forces the torch path.
        self._cpu_measure: bool = True
        # Parameters whose gradient bitmap is all ones, so the CPU path stops rebuilding it. Derived from
        # the state (bits are only ever set), so it is forgotten when state is loaded.
        self._full_bitmaps: set[str] = set()
        self._numel_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=self._primary)
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: self._allocate(p, self._sample_start[name]) for name, p in self._params
        }
        # Fused MoE expert tensors (gradtrace.anatomy.experts) get per-expert counts from measure(). The
        # layout is read from every parameter of a module, frozen ones included: a frozen router (common
        # when fine-tuning a MoE) still says how many experts its layer's fused tensors hold.
        shapes = self.shapes()
        if isinstance(model, nn.Module):
            shapes = {**{strip_wrapper_prefix(n): sharding.full_shape(p) for n, p in model.named_parameters()},
                      **shapes}
        self.experts: ExpertLayout = expert_layout(shapes).restricted_to(shapes.keys() & self.state.keys())
        self._expert_slices: dict[str, int] = {
            name: count for name, count in self.experts.fused.items() if self._slices_measurable(name)
        }

    def _numel_vector(self, numels: list[int]) -> torch.Tensor:
        """``numels`` as a tensor on the primary device, cached: built once per set of parameters with
        gradients, so the per-step path never copies from the host."""
        key = tuple(numels)
        cached = self._numel_cache.get(key)
        if cached is None:
            cached = self._numel_cache[key] = torch.tensor(numels, dtype=torch.int64, device=self._primary)
        return cached

    def _slices_measurable(self, name: str) -> bool:
        """Per-expert slices need the local shard to be a contiguous run of the flattened full tensor:
        true unsharded, under ZeRO-3 and FSDP2's ``Shard(0)``; not for a DTensor sharded on another dim."""
        param = dict(self._params)[name]
        placements = getattr(param, "placements", None) if not sharding.is_zero3(param) else None
        return not placements or all(not p.is_shard() or p.dim == 0 for p in placements)

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across ranks (FSDP2), so counts are reduced and masks gathered."""
        return self._group is not None

    # ------------------------------------------------------------------ set-up
    def _allocate(self, param: nn.Parameter, sample_start: int) -> dict[str, torch.Tensor]:
        local = _local(param).detach()
        numel = local.numel()
        state: dict[str, torch.Tensor] = {}
        for acc in self._accumulators:
            if acc.name == "reference":
                state[acc.name] = self._reference_copy(local)
            elif acc.name == "last_lowbits":
                state[acc.name] = _change_signature(local).clone()
            else:
                state[acc.name] = torch.zeros(acc.length(numel, self.config, sample_start), dtype=acc.dtype(local.dtype),
                                              device=local.device)
        return state

    def _reference_copy(self, local: torch.Tensor) -> torch.Tensor:
        device = torch.device(self.config.reference_device)
        copy = local.to(device, copy=True)
        if device.type == "cpu" and local.device.type == "cuda":
            copy = copy.pin_memory()  # lets measure() copy it back without a host sync
        return copy

    @property
    def parameter_names(self) -> list[str]:
        return [name for name, _ in self._params]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self._params)

    def dtypes(self) -> dict[str, str]:
        return {name: str(p.dtype).removeprefix("torch.") for name, p in self._params}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: sharding.full_shape(p) for name, p in self._params}

    def _check_dtype(self, name: str, values: torch.Tensor) -> None:
        """The update state (reference copy, change signatures) is laid out for the dtype the parameter had
        when tracking began; a parameter cast since (``model.half()`` after the tracker was built) would be
        compared bit for bit against the wrong layout, so it is refused with a clear error."""
        expected = self.state[name]["reference"].dtype
        if values.dtype != expected:
            raise ValueError(f"parameter {name!r} is {values.dtype} now but was {expected} when tracking began: "
                             "cast the model before building the GradTracker (or starting the traced run)")

    # ------------------------------------------------------------------ hot path
    @torch.no_grad()
    def observe_gradients(self, grads: Mapping[str, torch.Tensor | None] | None = None, *,
                          detail: bool = True) -> None:
        """Fold one optimizer step's gradients into the state.

        By default reads each tracked parameter's ``.grad``. Engines that keep gradients elsewhere
        (DeepSpeed's partitioned buffers) pass ``grads``: ``{parameter name: gradient}``, each laid out
        like the parameter's local data. A missing or ``None`` gradient means the parameter received no
        gradient this step.

        A parameter whose gradient holds any NaN/inf at this step contributes nothing from it (no mask
        bit, no sum): such a step is skipped by a loss scaler, or the run has diverged. Those steps and
        the discarded elements are counted. ``detail=False`` skips counting this step's nonzero
        elements (the gradient-density curve), a full pass over the mask; integrations ask for it on
        the steps that will be logged.
        """
        stride = self.config.stride
        device = self._primary
        # Per-parameter flags are gathered and combined once after the loop: a few ops per step rather
        # than a few per parameter, which is what a small model's step time is made of. The CPU path
        # gives host values, the torch path 0-d tensors on the parameters' devices (no host sync).
        host = _StepFlags()
        any_nonzero, all_finite, numels, counts = [], [], [], []
        for name, param in self._params:
            grad = param.grad if grads is None else grads.get(name)
            if grad is None:
                continue
            grad = _local(grad)
            if grad.is_sparse:
                grad = grad.to_dense()
            state = self.state[name]
            sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
            if self._cpu_scanner is not None and cpu_scan.supports(grad):
                folded = self._cpu_scanner.fold(grad, state["gradient_bits"], full=name in self._full_bitmaps,
                                                count=detail, sums=sums, stride=stride,
                                                sample_start=self._sample_start[name])
                if folded.full:
                    self._full_bitmaps.add(name)
                host.add(folded.any_nonzero, folded.finite, grad.numel(), folded.nonzero)
                continue
            nonzero, has_nonzero, finite = _scan_gradient(grad)
            state["gradient_bits"].bitwise_or_(pack_bits(nonzero).mul_(finite))  # NaN/inf: no bit at all
            if sums is not None:
                sampled = grad.reshape(-1)[self._sample_start[name]::stride].float()
                sampled = torch.nan_to_num(sampled, nan=0.0, posinf=0.0, neginf=0.0).mul_(finite)
                sums[0].add_(sampled)
                sums[1].add_(sampled.abs_())
            nonzero_count = torch.count_nonzero(nonzero) if detail else None
            if grad.device != device:  # model spread over several devices: the flags meet on one
                has_nonzero, finite = has_nonzero.to(device, non_blocking=True), finite.to(device, non_blocking=True)
                if detail:
                    nonzero_count = nonzero_count.to(device, non_blocking=True)
            any_nonzero.append(has_nonzero)
            all_finite.append(finite)
            numels.append(grad.numel())
            if detail:
                counts.append(nonzero_count)
        # [some nonzero gradient, some NaN/inf, discarded elements, nonzero elements this step]
        if host.seen:
            totals = torch.tensor([host.some_nonzero, host.some_nonfinite, host.discarded, host.nonzero],
                                  dtype=torch.int64, device=device)
        else:  # no host-to-device copy when every gradient took the torch path (GPU)
            totals = torch.zeros(4, dtype=torch.int64, device=device)
        if numels:
            finite = torch.stack(all_finite)
            on_device = torch.stack([
                (torch.stack(any_nonzero) & finite).any(),
                finite.logical_not().any(),
                (finite.logical_not() * self._numel_vector(numels)).sum(),
                (torch.stack(counts) * finite).sum() if detail else torch.zeros((), dtype=torch.int64, device=device),
            ])
            totals[:2] = torch.maximum(totals[:2], on_device[:2])
            totals[2:] += on_device[2:]
        flags = totals[:2]
        if self._group is not None:
            # Whether the step was all-zero, or held a NaN, is a question about every shard together:
            # one 2-element all-reduce, no host sync on GPU.
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        self.steps += 1
        counters = self.counters
        counters[COUNTER_INDEX["zero_gradient_steps"]] += 1 - flags[0]
        counters[COUNTER_INDEX["nonfinite_gradient_steps"]] += flags[1]
        counters[COUNTER_INDEX["discarded_gradient_elements"]] += totals[2]
        if detail:
            counters[COUNTER_INDEX["density_nonzero"]] = totals[3]
            counters[COUNTER_INDEX["density_step"]] = self.steps

    @torch.no_grad()
    def observe_update(self) -> None:
        """After ``optimizer.step()``: record which elements that step changed (``ever_changed`` mode).

        A no-op unless ``config.ever_changed``; the update mask against the start needs no per-step work.
        """
        if not self.config.ever_changed:
            return
        step_changed = torch.zeros((), dtype=torch.int64, device=self._primary)
        changed_on_host = 0
        for name, param in self._params:
            state = self.state[name]
            values = _local(param).detach()
            self._check_dtype(name, values)
            if self._cpu_scanner is not None and cpu_scan.supports(values):
                changed_on_host += self._cpu_scanner.fold_changes(values, state["last_lowbits"],
                                                                  state["ever_changed_bits"])
                continue
            low = _change_signature(values)
            changed = low.ne(state["last_lowbits"])
            or_pack_into(state["ever_changed_bits"], changed)
            state["last_lowbits"].copy_(low)
            step_changed += changed.sum().to(self._primary, non_blocking=True)
        step_changed += changed_on_host
        self.counters[COUNTER_INDEX["last_step_changed"]] = step_changed
        self.counters[COUNTER_INDEX["changed_elements_total"]] += step_changed

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def _update_masks(self, param: nn.Parameter, state: Mapping[str, torch.Tensor]):
        current = _local(param).detach().reshape(-1)
        reference = state["reference"].to(current.device, non_blocking=True).reshape(-1)
        updated = _raw_bits(current).ne(_raw_bits(reference))
        delta = current - reference  # in the storage dtype, like the paper's script
        updated_abs = delta.abs().le(self.config.abs_tolerance).logical_not_()
        cur32, ref32 = current.float(), reference.float()
        bound = torch.maximum(cur32.abs(), ref32.abs()).mul_(self.config.rel_tolerance)
        updated_rel = (cur32 - ref32).abs().le(bound).logical_not_()
        return updated, updated_abs, updated_rel

    @torch.no_grad()
    def measure(self) -> Measurement:
        """Per-parameter counts of every category, with a single device-to-host transfer."""
        cfg = self.config
        bins = cfg.histogram_bins
        histogram = torch.zeros(bins, dtype=torch.int64, device=self._primary)
        count = torch.count_nonzero  # on a bool mask: no int64 copy, unlike .sum()
        rows, slice_blocks = [], []
        # CPU parameters: chunked NumPy passes, host counts (gradtrace.tracking.cpu_measure), identical results.
        fast = cpu_measure.CpuMeasurer(bins) if self._cpu_measure else None
        for name, param in self._params:
            state = self.state[name]
            local = _local(param).detach()
            self._check_dtype(name, local)
            experts = self._expert_slices.get(name)
            if fast is not None and cpu_measure.supports(local, state["reference"]):
                if experts is None:
                    row = fast.row(local, state["reference"], state, cfg, sample_start=self._sample_start[name])
                else:
                    row, packed = fast.row_and_masks(local, state["reference"], state, cfg,
                                                     sample_start=self._sample_start[name])
                    slice_blocks.append(self._slice_rows(name, param, packed))
                rows.append(torch.tensor(row, dtype=torch.int64, device=self._primary))
                continue
            numel = local.numel()
            gradient = unpack_bits(state["gradient_bits"], numel)
            updated, updated_abs, updated_rel = self._update_masks(param, state)
            zero = torch.zeros((), dtype=torch.int64, device=gradient.device)
            ever = popcount(state["ever_changed_bits"]) if cfg.ever_changed else zero
            if cfg.tracks_sums:
                start = self._sample_start[name]
                sampled_gradient = gradient[start:: cfg.stride]
                signed, absolute = state["signed_sum"].abs(), state["abs_sum"]
                unchanged = sampled_gradient & updated[start:: cfg.stride].logical_not()
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
        experts = self._expert_slices[name]
        device = state["gradient_bits"].device
        masks = {"gradient": state["gradient_bits"]}
        masks.update(zip(("updated", "updated_abs", "updated_rel"), (b.to(device) for b in update_bits), strict=True))
        if self.config.ever_changed:
            masks["ever_changed"] = state["ever_changed_bits"]
        sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
        full = math.prod(sharding.full_shape(param))
        return slices.slice_rows(masks, sums, config=self.config, slices=experts, slice_numel=full // experts,
                                 offset=sharding.flat_offset(param), local_numel=_local(param).numel(),
                                 sample_start=self._sample_start[name]).to(self._primary)

    @torch.no_grad()
    def packed_masks(self) -> dict[str, dict[str, PackedMask]]:
        """The masks for export, bit-packed on the CPU: ``{kind: {name: PackedMask}}``, full shapes.

        Kinds: ``gradient``, ``update`` (bitwise), ``update_abs_<tol>``, ``update_rel_<tol>`` and, in
        ``ever_changed`` mode, ``ever_changed``. Sharded parameters are gathered (a collective).
        """
        cfg = self.config
        kinds = ["gradient", "update", f"update_abs_{cfg.abs_tolerance:g}", f"update_rel_{cfg.rel_tolerance:g}"]
        if cfg.ever_changed:
            kinds.append("ever_changed")
        out: dict[str, dict[str, PackedMask]] = {kind: {} for kind in kinds}
        fast = cpu_measure.CpuMeasurer(cfg.histogram_bins) if self._cpu_measure else None
        for name, param in self._params:
            state = self.state[name]
            numel = _local(param).numel()
            self._check_dtype(name, _local(param))
            if sharding.is_sharded(param):
                masks = [unpack_bits(state["gradient_bits"], numel), *self._update_masks(param, state)]
                if cfg.ever_changed:
                    masks.append(unpack_bits(state["ever_changed_bits"], numel))
                packed = [pack_bits(sharding.gather_full(m, param)) for m in masks]
            else:
                local = _local(param).detach()
                if fast is not None and cpu_measure.supports(local, state["reference"]):
                    update = fast.update_masks(local, state["reference"], state, cfg)  # packed as it goes
                else:
                    update = [pack_bits(m) for m in self._update_masks(param, state)]
                packed = [state["gradient_bits"], *update]
                if cfg.ever_changed:
                    packed.append(state["ever_changed_bits"])
            for kind, bits in zip(kinds, packed, strict=True):
                out[kind][name] = PackedMask(bits.to("cpu", copy=True), sharding.full_shape(param))
        return out

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as flat CPU tensors (``"{accumulator}/{parameter}"``)."""
        tensors = {f"{key}/{name}": value.to("cpu", copy=True).contiguous()
                   for name, state in self.state.items() for key, value in state.items()}
        tensors["counters"] = self.counters.cpu()
        tensors["steps"] = torch.tensor([self.steps], dtype=torch.int64)
        return tensors

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], *, source: str = "tracker state") -> None:
        """Restore from :meth:`state_tensors`; refuses state of another model or another config."""
        for name, state in self.state.items():
            for key, value in state.items():
                saved = tensors.get(f"{key}/{name}")
                if saved is None:
                    raise ValueError(f"{source}: no {key!r} for parameter {name!r}; was it saved for another "
                                     "model or with another TrackerConfig?")
                if saved.shape != value.shape or saved.dtype != value.dtype:
                    raise ValueError(f"{source}: {key!r} of {name!r} is {tuple(saved.shape)} {saved.dtype}, "
                                     f"expected {tuple(value.shape)} {value.dtype}")
        expected = {f"{key}/{name}" for name, state in self.state.items() for key in state} | {"counters", "steps"}
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise ValueError(f"{source}: holds state for parameters this model does not track: {unexpected[:3]}")
        for name, state in self.state.items():
            for key, value in state.items():
                value.copy_(tensors[f"{key}/{name}"])
        self._full_bitmaps.clear()
        self.counters.copy_(tensors["counters"])
        self.steps = int(tensors["steps"][0])

    def state_bytes(self) -> dict[str, int]:
        """Measured bytes of tracker state, split by where it lives (parameter device vs reference)."""
        out = {"device": self.counters.numel() * self.counters.element_size(), "reference": 0}
        for state in self.state.values():
            for key, value in state.items():
                out["reference" if key == "reference" else "device"] += value.numel() * value.element_size()
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(_local(p).shape) for _, p in self._params)
