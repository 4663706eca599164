"""The core tracker: per-parameter gradient and update state, kept beside each parameter.

Call :meth:`GradTracker.observe_gradients` once per optimizer step while ``.grad`` holds the gradient
the optimizer is about to apply (after accumulation and clipping), and :meth:`observe_update` right
after ``optimizer.step()``. Both only queue tensor ops on the parameters' devices: no host sync.
:meth:`measure` (at logging steps) turns the state into per-parameter counts with one host sync.

This module knows nothing of transformers, TRL or W&B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.anatomy.experts import ExpertLayout, expert_layout
from gradtrace.anatomy.parameter_names import tracked_name
from gradtrace.formats.bitpack import or_pack_into, pack_bits, popcount, unpack_bits
from gradtrace.formats.masks_file import PackedMask
from gradtrace.tracking import parameter_set, persistence, reshard, sharding, slices
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.engines.base import Engine, Placement, Span
from gradtrace.tracking.engines.local import LocalShards
from gradtrace.tracking.engines.partitions import EnginePartitions
from gradtrace.tracking.engines.split import SplitTracking, should_split
from gradtrace.tracking.kernels import Backend, numpy_measure, torch_path
from gradtrace.tracking.parameter_set import ParameterChanges, named_for_tracking
from gradtrace.tracking.state import (
    COUNTER_INDEX,
    COUNTER_REDUCE,
    COUNTERS,
    allocate,
    enabled_accumulators,
    state_bytes,
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

_local = sharding.local
_to = torch_path.to_device

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
        layout_model: the whole model, when ``model`` is a selection of its parameters: the expert layout
            of MoE layers is read from all of its parameters (a frozen router still says how many experts).

        split: under torch.distributed with replicated parameters (DDP, DeepSpeed ZeRO-0/1/2), divide the
            tracking among the ranks (:mod:`gradtrace.tracking.split`): each keeps state for, and does the
            per-step work of, a share of the parameters only. ``None`` (default): when the world has more
            than one rank, no parameter is sharded and every rank holds the same parameters (checked with
            one small all-gather, so every rank must build the tracker). ``False``: every rank tracks
            everything, alone (no collectives).
        backend: the kernels (:class:`gradtrace.tracking.kernels.Backend`): ``"auto"`` (default) and
            ``"numpy"`` take NumPy for the CPU tensors it supports, the torch path elsewhere; ``"torch"``
            the torch path everywhere. Results are identical; only the speed differs.

    Under FSDP2 (parameters sharded as DTensors) each rank keeps state for its local shard only; then, as
    when tracking is split, :meth:`observe_gradients`, :meth:`measure` and :meth:`packed_masks` are
    collectives that every rank must call together.
    """

    def __init__(self, model: nn.Module | Iterable[tuple[str, nn.Parameter]], config: TrackerConfig | None = None,
                 *, layout_model: nn.Module | None = None, split: bool | None = None,
                 backend: str | Backend = "auto"):
        self.config = config or TrackerConfig()
        named = model.named_parameters() if isinstance(model, nn.Module) else model
        self._params: list[tuple[str, nn.Parameter]] = named_for_tracking(named)
        if not self._params:
            raise ValueError("GradTracker found no trainable parameters (requires_grad=True) to track")
        self._named = dict(self._params)
        self._check_trackable()
        self._accumulators = enabled_accumulators(self.config)
        self._primary = _local(self._params[0][1]).device
        # Who keeps which part of each parameter (gradtrace.tracking.engines): sharded parameters are kept
        # as their local shards; replicated ones, under torch.distributed, divided among the ranks.
        sharded = [p for _, p in self._params if sharding.is_sharded(p)]
        if sharded:
            self._engine: Engine = LocalShards(sharding.reduction_group(sharded))
        elif should_split(split, self._params):
            self._engine = SplitTracking(self._params)
        else:
            self._engine = LocalShards()
        self._group = self._engine.group
        # Where collectives run (NCCL needs CUDA tensors even when the state is offloaded to the CPU).
        self._collective_device = (sharding.collective_device(self._group, self._primary)
                                   if self._group is not None else self._primary)
        self._placements: dict[str, Placement] = {}
        self._place(self._params)
        self.steps = 0
        # Which kernels fold and measure each parameter (gradtrace.tracking.kernels): NumPy for CPU tensors,
        # torch for the rest, unless told otherwise.
        self._backend = Backend.of(backend)
        # Parameters whose gradient bitmap is all ones, so the CPU path stops rebuilding it. Derived from
        # the state (bits are only ever set), so it is forgotten when state is loaded.
        self._full_bitmaps: set[str] = set()
        self._numel_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=self._primary)
        self.state: dict[str, dict[str, torch.Tensor]] = {name: self._allocate(name, p) for name, p in self._params}
        # Shapes at allocation: a parameter resized in place is recognised by them (compare_parameters).
        self._tracked_shapes = {name: sharding.full_shape(p) for name, p in self._params}
        # Fused MoE expert tensors (gradtrace.anatomy.experts) get per-expert counts from measure(). The
        # layout is read from every parameter of a module, frozen ones included: a frozen router (common
        # when fine-tuning a MoE) still says how many experts its layer's fused tensors hold.
        shapes = self.shapes()
        whole = layout_model if layout_model is not None else model if isinstance(model, nn.Module) else None
        if whole is not None:
            shapes = {**{tracked_name(n): sharding.full_shape(p) for n, p in whole.named_parameters()},
                      **shapes}
        self.experts: ExpertLayout = expert_layout(shapes).restricted_to(shapes.keys() & self.state.keys())
        self._expert_slices: dict[str, int] = {
            name: count for name, count in self.experts.fused.items() if self._placements[name].contiguous
        }

    # ------------------------------------------------------------------ the parameter set
    def compare_parameters(self, named: Iterable[tuple[str, nn.Parameter]]) -> ParameterChanges:
        """What differs between ``named`` (the parameters that should be tracked now, as given to the
        constructor) and the tracked ones; nothing is changed (see :meth:`apply_parameter_changes`)."""
        references = {name: state["reference"] for name, state in self.state.items()}
        return parameter_set.compare(named, self._named, self._placements, references, self._tracked_shapes)

    @torch.no_grad()
    def apply_parameter_changes(self, changes: ParameterChanges) -> dict[str, PackedMask]:
        """Track ``changes``; returns the gradient masks gathered until now of the restarted parameters
        (in their former shapes), the part of their state that cannot carry over. Restarted sharded
        parameters are not supported (``ValueError``)."""
        before: dict[str, PackedMask] = {}
        index = {name: i for i, (name, _) in enumerate(self._params)}
        for name, param in changes.restarted:  # refused up front, before any state changes
            self._engine.check_restart(name, param, self._params[index[name]][1])
        for name, param in changes.rebound:
            self._params[index[name]] = (name, param)
        for name, param in changes.restarted:
            bits = self.state[name]["gradient_bits"]
            former = math.prod(self._tracked_shapes[name])
            if self._placements[name].span is not None:  # a collective: every rank restarts the same ones, in order
                bits = self._engine.gather_packed(name, bits, former, self._collective_device)
            before[name] = PackedMask(bits.to("cpu", copy=True), self._tracked_shapes[name])
            self._params[index[name]] = (name, param)
            self._engine.restart(name, former, param)
        for name, param in changes.added:
            self._params.append((name, param))
        self._engine.add(changes.added)  # every rank adds the same parameters: the same division everywhere
        self._named = dict(self._params)
        self._check_trackable()
        self._place([*changes.rebound, *changes.restarted, *changes.added])
        for name, param in [*changes.restarted, *changes.added]:
            self._tracked_shapes[name] = sharding.full_shape(param)
            self.state[name] = self._allocate(name, param)
            self._full_bitmaps.discard(name)
            if (name, param) in changes.restarted:
                self._expert_slices.pop(name, None)  # its expert layout is no longer known
        return before

    def _place(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Where each of ``named`` is kept (gradtrace.tracking.engines), and what the per-step path derives."""
        for name, param in named:
            self._placements[name] = self._engine.place(name, param, self.config)
        self._sample_indices = [pl.sample_index for pl in self._placements.values() if pl.sample_index is not None]
        # Sharded and cut parameters, in the same order on every rank: their ranks agree on finiteness.
        self._agreeing = ([name for name, _ in self._params if self._placements[name].sharded]
                          + sorted(name for name, pl in self._placements.items() if pl.straddling))

    def use_spans(self, spans: Mapping[str, Span]) -> None:
        """Track, on this rank, only ``spans`` (``{name: (start, length)}`` in each flattened parameter) of
        split-tracked parameters: DeepSpeed ZeRO-1/2 hands each rank the fragments of its own optimizer
        partition (gradtrace.tracking.engines.partitions). Every rank calls it (one all-gather), before the
        first step; state restarts empty."""
        if not isinstance(self._engine, SplitTracking) or set(spans) != set(self._engine.spans):
            raise ValueError("use_spans needs split tracking and a span for every tracked parameter")
        if self.steps:
            raise ValueError("use_spans must be called before the first observed step")
        self._engine = EnginePartitions(spans, self._named)
        self._place(self._params)
        for name, param in self._params:
            self.state[name] = self._allocate(name, param)
        self._full_bitmaps.clear()

    @property
    def spans(self) -> dict[str, Span]:
        """This rank's span of each parameter when tracking is split (empty otherwise)."""
        return {name: pl.span for name, pl in self._placements.items() if pl.span is not None}

    def _held(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The part of ``param`` (or of a tensor laid out like it) whose state this rank keeps."""
        return self._placements[name].held(param)

    def _check_trackable(self) -> None:
        """Refuse, up front and naming them, parameters the tracker cannot measure."""
        float8 = [f"{name} ({p.dtype})" for name, p in self._params if torch_path.is_float8(p.dtype)]
        if float8:
            raise ValueError(f"gradtrace cannot track float8/float4 parameters: {', '.join(float8[:5])}"
                             f"{' ...' if len(float8) > 5 else ''}. Track the higher-precision master weights "
                             "(the parameters the optimizer updates) instead, or leave these untracked "
                             "(pass the other (name, parameter) pairs)")
        for name, p in self._params:
            sharding.check_placements(name, p)

    def _numel_vector(self, numels: list[int]) -> torch.Tensor:
        """``numels`` as a tensor on the primary device, cached: built once per set of parameters with
        gradients, so the per-step path never copies from the host."""
        key = tuple(numels)
        cached = self._numel_cache.get(key)
        if cached is None:
            cached = self._numel_cache[key] = torch.tensor(numels, dtype=torch.int64, device=self._primary)
        return cached

    # ------------------------------------------------------------------ set-up
    def _allocate(self, name: str, param: nn.Parameter) -> dict[str, torch.Tensor]:
        placement = self._placements[name]
        index = placement.sample_index
        return allocate(self._accumulators, placement.held(param).detach(), self.config, placement.sample_start,
                        None if index is None else index.numel())

    def _sampled(self, placement: Placement, flat: torch.Tensor) -> torch.Tensor:
        """The elements of a parameter's flattened local data (or of a mask of it) that carry gradient sums."""
        if placement.sample_index is not None:
            return flat[_to(placement.sample_index, flat.device)]
        return flat[placement.sample_start:: self.config.stride]

    @property
    def backend(self) -> str:
        """The kernels in use: ``"auto"``, ``"torch"`` or ``"numpy"`` (settable, also to a ``Backend``)."""
        return self._backend.name

    @backend.setter
    def backend(self, choice: str | Backend) -> None:
        self._backend = Backend.of(choice)

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
        the steps that will be logged. In a sharded run a NaN/inf in any rank's shard of a parameter drops
        the whole parameter on every rank, as in a single process (one more small all-reduce per step).
        """
        stride = self.config.stride
        device = self._primary
        # Per-parameter flags are gathered and combined once after the loop: a few ops per step rather
        # than a few per parameter, which is what a small model's step time is made of. The CPU path
        # gives host values, the torch path 0-d tensors on the parameters' devices (no host sync).
        host = _StepFlags()
        any_nonzero, all_finite, numels, counts = [], [], [], []
        shard_finite = self._shard_finite(grads)
        host_shard_finite: list[int] | None = None
        placements = self._placements
        for name, param in self._params:
            placement = placements[name]
            grad = self._local_gradient(name, placement, param, grads)  # asked for every one, in order (DeepSpeed)
            if grad is None or not placement.keeps:
                continue
            weight = placement.weight
            state = self.state[name]
            sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
            listed = placement.sample_index is not None
            if self._backend.scans(grad):
                if name in shard_finite:
                    if host_shard_finite is None:
                        host_shard_finite = shard_finite["*"].tolist()
                    if not host_shard_finite[shard_finite[name]]:  # dropped whole, as in one process
                        host.add(False, False, grad.numel() * weight, None)
                        continue
                folded = self._backend.scanner.fold(grad, state["gradient_bits"], full=name in self._full_bitmaps,
                                                count=detail, sums=None if listed else sums, stride=stride,
                                                sample_start=placement.sample_start)
                if folded.full:
                    self._full_bitmaps.add(name)
                if listed and sums is not None and folded.finite:
                    torch_path.add_sums(self._sampled(placement, grad.reshape(-1)), sums, None)
                host.add(folded.any_nonzero, folded.finite, grad.numel() * weight, (folded.nonzero or 0) * weight)
                continue
            nonzero, has_nonzero, finite = torch_path.scan_gradient(grad)
            if name in shard_finite:  # a NaN/inf in any rank's shard drops the whole parameter
                finite = _to(shard_finite["*"][shard_finite[name]], grad.device).bool()
            state["gradient_bits"].bitwise_or_(pack_bits(nonzero).mul_(finite))  # NaN/inf: no bit at all
            if sums is not None:
                torch_path.add_sums(self._sampled(placement, grad.reshape(-1)), sums, finite)
            nonzero_count = torch.count_nonzero(nonzero) if detail else None
            if detail and not weight:  # another rank counts this part
                nonzero_count = nonzero_count.mul(0)
            if grad.device != device:  # model spread over several devices: the flags meet on one
                has_nonzero, finite = _to(has_nonzero, device), _to(finite, device)
                if detail:
                    nonzero_count = _to(nonzero_count, device)
            any_nonzero.append(has_nonzero)
            all_finite.append(finite)
            numels.append(grad.numel() * weight)
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
            flags = _to(flags, self._collective_device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            flags = _to(flags, device)
        self.steps += 1
        counters = self.counters
        # all-zero: no finite nonzero element and no NaN/inf (an all-NaN step is a non-finite step, not a zero one)
        counters[COUNTER_INDEX["zero_gradient_steps"]] += (1 - flags[0]) * (1 - flags[1])
        counters[COUNTER_INDEX["nonfinite_gradient_steps"]] += flags[1]
        counters[COUNTER_INDEX["discarded_gradient_elements"]] += totals[2]
        if detail:
            counters[COUNTER_INDEX["density_nonzero"]] = totals[3]
            counters[COUNTER_INDEX["density_step"]] = self.steps

    @torch.no_grad()
    def skip_step(self, *, observed: bool = False, detail: bool = True) -> None:
        """Count one optimizer step that the optimizer skipped for an overflow (DeepSpeed's fp16 loss
        scaler, or its bf16 overflow check): it applied nothing, so it sets no mask bit and adds no sum.

        Call it instead of :meth:`observe_gradients` when the skip is known before the gradient is read.
        ``observed=True`` counts a step whose gradient :meth:`observe_gradients` has already folded in
        (the skip became known only afterwards): it is counted as skipped but not as a second step. With
        ``detail`` the step's gradient density is recorded as 0 (nothing was applied). Every rank calls
        it for the same steps (the counter is replicated, not summed).
        """
        counters = self.counters
        counters[COUNTER_INDEX["skipped_overflow_steps"]] += 1
        if observed:
            return
        self.steps += 1
        if detail:
            counters[COUNTER_INDEX["density_nonzero"]] = 0
            counters[COUNTER_INDEX["density_step"]] = self.steps

    def _local_gradient(self, name: str, placement: Placement, param: nn.Parameter,
                        grads: Mapping[str, torch.Tensor | None] | None) -> torch.Tensor | None:
        """The gradient of ``param``'s local data, dense, where its state lives and in a dtype that can
        be scanned (float8 gradients are widened exactly: no ``isfinite`` for float8)."""
        grad = param.grad if grads is None else grads.get(name)
        if grad is None:
            return None
        if grad.is_sparse:
            grad = grad.to_dense()
        grad = placement.held(grad)
        bits = self.state[name]["gradient_bits"]
        if grad.device != bits.device:  # ZeRO-3 offload_optimizer: gradient partitions on the CPU, state not
            grad = _to(grad, bits.device)
        if torch_path.is_float8(grad.dtype):
            grad = grad.float()
        return grad

    def _shard_finite(self, grads: Mapping[str, torch.Tensor | None] | None) -> dict[str, Any]:
        """Whether each sharded parameter's gradient is finite on every rank: ``{name: position, "*": flags}``
        (``flags`` an int tensor, 1 = finite everywhere), empty outside sharded runs.

        A single process drops a parameter's whole gradient for the step when any element is NaN/inf; a
        rank sees only its shard, so the ranks agree first: one all-reduce of one flag per sharded
        parameter, at the price of reading each sharded gradient once more. Replicas (HSDP) hold the same
        gradient, so the minimum over the whole reduction group is the minimum over the shards.
        """
        agreeing = self._agreeing
        if not agreeing:
            return {}
        flags = []
        for name in agreeing:
            grad = self._local_gradient(name, self._placements[name], self._named[name], grads)
            if grad is None or grad.numel() == 0:
                flags.append(torch.ones((), dtype=torch.bool, device=self._collective_device))
            elif self._backend.scans(grad):  # NumPy on the raw bits
                flags.append(torch.tensor(self._backend.scanner.finite(grad), device=self._collective_device))
            else:
                flags.append(_to(torch_path.scan_gradient(grad)[2], self._collective_device))
        reduced = torch.stack(flags).to(torch.int32)
        dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=self._group)
        return {"*": reduced, **{name: i for i, name in enumerate(agreeing)}}

    @torch.no_grad()
    def observe_update(self) -> None:
        """After ``optimizer.step()``: record which elements that step changed (``ever_changed`` mode).

        A no-op unless ``config.ever_changed``; the update mask against the start needs no per-step work.
        """
        if not self.config.ever_changed:
            return
        step_changed = torch.zeros((), dtype=torch.int64, device=self._primary)
        changed_on_host = 0
        placements = self._placements
        for name, param in self._params:
            placement = placements[name]
            if not placement.keeps:
                continue
            state = self.state[name]
            values = placement.held(param).detach()
            self._check_dtype(name, values)
            weight = placement.weight  # counted on one rank only where several hold the same part
            last = state["last_values"]
            if self._backend.scans(values) and last.device == values.device:
                changed_on_host += weight * self._backend.scanner.fold_changes(values, last, state["ever_changed_bits"])
                continue
            flat = values.reshape(-1)
            changed = torch_path.raw_bits(flat).ne(torch_path.raw_bits(last))  # bitwise: every change, a sign flip of 0 included
            or_pack_into(state["ever_changed_bits"], changed)
            last.copy_(flat)
            if weight:
                step_changed += _to(changed.sum(), self._primary)
        step_changed += changed_on_host
        self.counters[COUNTER_INDEX["last_step_changed"]] = step_changed
        self.counters[COUNTER_INDEX["changed_elements_total"]] += step_changed

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def _update_masks(self, name: str, param: nn.Parameter, state: Mapping[str, torch.Tensor]):
        current = self._held(name, param).detach().reshape(-1)
        return torch_path.update_masks(current, _to(state["reference"], current.device).reshape(-1), self.config)

    @torch.no_grad()
    def measure(self) -> Measurement:
        """Per-parameter counts of every category, with a single device-to-host transfer."""
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

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as flat CPU tensors (``"{accumulator}/{parameter}"``)."""
        return persistence.snapshot(self.state, self.counters, self.steps)

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], *, source: str = "tracker state") -> None:
        """Restore from :meth:`state_tensors`; refuses state of another model or another config.

        Everything is checked before anything is overwritten: a refused state leaves the tracker as it was.
        """
        tensors, kept_as_is = persistence.check_saved(tensors, self.state, self.counters, source=source)
        self._restore({name: {key: tensors[f"{key}/{name}"] for key in state if (key, name) not in kept_as_is}
                       for name, state in self.state.items()}, tensors["counters"], int(tensors["steps"][0]))

    def _restore(self, state: Mapping[str, Mapping[str, torch.Tensor]], counters: torch.Tensor, steps: int) -> None:
        for name, saved in state.items():
            for key, value in saved.items():
                self.state[name][key].copy_(value)
        self._full_bitmaps.clear()  # derived from the state
        self.counters.copy_(counters)
        self.steps = steps

    def layout(self) -> dict[str, tuple[int, int]] | None:
        """``{name: (start, length)}``: the run of each flattened parameter whose state this rank keeps, or
        ``None`` if some local shard is no contiguous run (``Shard(1)``, 2-D meshes): its state can then
        be loaded only by the same layout (see :meth:`load_resharded`)."""
        placements = self._placements
        if not all(pl.contiguous and pl.sample_index is None for pl in placements.values()):
            return None
        return {name: (placements[name].offset, placements[name].numel) for name, _ in self._params}

    @property
    def counts_summed(self) -> bool:
        """Whether this rank's counts are its share of sums across ranks: parameters sharded across ranks
        (FSDP2, ZeRO-3) or their tracking split among the ranks (DDP, ZeRO-0/1/2), so counts are reduced
        and masks gathered."""
        return self._group is not None

    sharded = counts_summed  # the name integrations and reports use

    @torch.no_grad()
    def load_resharded(self, parts: list[reshard.SavedPart]) -> None:
        """Restore state saved by ranks of another layout (another number of processes, or split tracking
        switched on or off): each parameter's state for this rank's run is cut out of the saved runs
        (:mod:`gradtrace.tracking.reshard`). Everything is checked before anything is overwritten."""
        layout = self.layout()
        if layout is None:
            raise ValueError("this rank's shards are not contiguous runs of the parameters (Shard(1), 2-D "
                             "meshes): tracker state saved with another layout cannot be re-cut for them")
        numels = {name: math.prod(shape) for name, shape in self._tracked_shapes.items()}
        keep_here = self._group is None or dist.get_rank(self._group) == 0
        self._restore(*persistence.recut(parts, self.state, layout, numels, self.config.stride, keep_here=keep_here))

    def state_bytes(self) -> dict[str, int]:
        """Measured bytes of tracker state, split by where it lives (parameter device vs reference)."""
        extra = sum(index.numel() * index.element_size() for index in self._sample_indices)
        return state_bytes(self.state, self.counters, extra)

    @property
    def numel(self) -> int:
        return sum(pl.numel for pl in self._placements.values())
