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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.anatomy.experts import ExpertLayout, config_expert_counts, expert_layout
from gradtrace.anatomy.parameter_names import strip_wrapper_prefix, tracked_name
from gradtrace.formats.bitpack import or_pack_into, pack_bits, popcount, unpack_bits
from gradtrace.formats.masks_file import PackedMask
from gradtrace.tracking import cpu_measure, cpu_scan, reshard, sharding, slices
from gradtrace.tracking import split as splitting
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.state import (
    COUNTER_INDEX,
    COUNTER_REDUCE,
    COUNTERS,
    EARLIER_COUNTER_COUNTS,
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


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. Asynchronous only towards an accelerator: a device-to-host copy with
    ``non_blocking=True`` returns before the data has arrived, and the CPU would read it unsynchronised."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def _is_float8(dtype: torch.dtype) -> bool:
    """float8 / float4 formats: no ``isfinite``, no arithmetic, no stable meaning of "storage-dtype delta"."""
    return str(dtype).startswith(("torch.float8", "torch.float4"))


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


def _named_for_tracking(named: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters under the names gradtrace records (:func:`tracked_name`); when several
    PEFT adapters are trainable at once their names keep the adapter's name, which alone tells them apart."""
    pairs = [(name, p) for name, p in named if p.requires_grad]
    names = [tracked_name(name) for name, _ in pairs]
    if len(set(names)) != len(names):
        names = [strip_wrapper_prefix(name) for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("parameter names are not unique after removing wrapper prefixes")
    return list(zip(names, (p for _, p in pairs), strict=True))


@dataclass
class ParameterChanges:
    """How a model's trainable parameters differ from the tracked ones (see :meth:`GradTracker.compare_parameters`).

    ``added``: names not tracked yet (unfrozen, a new param group); tracked from now on.
    ``rebound``: a tracked name now holds another tensor of the same shape and dtype (``p = nn.Parameter(...)``);
    its state continues, compared against the same start. ``restarted``: a tracked name whose shape or dtype
    changed (``resize_token_embeddings``, a cast); its state restarts from the current values. A tracked
    parameter that is no longer trainable simply stops receiving gradients and stays tracked.
    """

    added: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    rebound: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    restarted: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.rebound or self.restarted)

    def describe(self) -> dict[str, list[str]]:
        return {kind: [name for name, _ in getattr(self, kind)] for kind in ("added", "rebound", "restarted")
                if getattr(self, kind)}


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

    Under FSDP2 (parameters sharded as DTensors) each rank keeps state for its local shard only; then, as
    when tracking is split, :meth:`observe_gradients`, :meth:`measure` and :meth:`packed_masks` are
    collectives that every rank must call together.
    """

    def __init__(self, model: nn.Module | Iterable[tuple[str, nn.Parameter]], config: TrackerConfig | None = None,
                 *, layout_model: nn.Module | None = None, split: bool | None = None):
        self.config = config or TrackerConfig()
        named = model.named_parameters() if isinstance(model, nn.Module) else model
        self._params: list[tuple[str, nn.Parameter]] = _named_for_tracking(named)
        if not self._params:
            raise ValueError("GradTracker found no trainable parameters (requires_grad=True) to track")
        self._named = dict(self._params)
        self._check_trackable()
        self._accumulators = enabled_accumulators(self.config)
        self._primary = _local(self._params[0][1]).device
        self._sharded_names = [name for name, p in self._params if sharding.is_sharded(p)]
        self._group = (sharding.reduction_group([p for _, p in self._params if sharding.is_sharded(p)])
                       if self._sharded_names else None)
        # Split tracking: this rank's span of each replicated parameter (gradtrace.tracking.split); empty
        # when every rank tracks everything. _straddling: parameters whose spans cut them across ranks.
        self._spans: dict[str, splitting.Span] = {}
        self._straddling: set[str] = set()
        self._split_loads: list[int] = []
        self._owners: dict[str, int] = {}  # the rank holding a split parameter whole, where one does
        if self._group is None and self._should_split(split):
            self._group = dist.group.WORLD
            self._split_loads = [0] * dist.get_world_size()
            self._assign(self._params)
        # Where collectives run (NCCL needs CUDA tensors even when the state is offloaded to the CPU).
        self._collective_device = (sharding.collective_device(self._group, self._primary)
                                   if self._group is not None else self._primary)
        # 1 where this rank's local counts of a parameter enter the sums across ranks, 0 where another rank
        # holds the same local part (a plain or replicated parameter in a sharded run, HSDP replicas).
        self._weight = {name: self._counts_here(name, p) for name, p in self._params}
        self._sample_start = {name: self._first_sample(name, p) for name, p in self._params}
        # Shards that are no contiguous run of the full parameter (Shard(1), 2-D meshes) have their sampled
        # elements listed; they take the torch path, which can gather them.
        self._sample_index: dict[str, torch.Tensor] = {}
        if self.config.tracks_sums:
            for name, p in self._params:
                index = sharding.sample_index(p, self.config.stride)
                if index is not None:
                    self._sample_index[name] = index
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
            name: self._allocate(name, p, self._sample_start[name], self._sample_index.get(name))
            for name, p in self._params
        }
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
        declared = config_expert_counts(getattr(whole if whole is not None else model, "config", None))
        self.experts: ExpertLayout = expert_layout(shapes, declared).restricted_to(shapes.keys() & self.state.keys())
        self._expert_slices: dict[str, int] = {
            name: count for name, count in self.experts.fused.items() if self._slices_measurable(name)
        }

    # ------------------------------------------------------------------ the parameter set
    def compare_parameters(self, named: Iterable[tuple[str, nn.Parameter]]) -> ParameterChanges:
        """What differs between ``named`` (the parameters that should be tracked now, as given to the
        constructor) and the tracked ones; nothing is changed (see :meth:`apply_parameter_changes`)."""
        tracked = dict(self._params)
        changes = ParameterChanges()
        for name, param in _named_for_tracking(named):
            old = tracked.get(name)
            if old is None:
                changes.added.append((name, param))
                continue
            reference = self.state[name]["reference"]
            held = _local(param) if name not in self._spans else param  # a span of the same shape is the same
            same_layout = (sharding.full_shape(param) == self._tracked_shapes[name]
                           and held.dtype == reference.dtype
                           and (name in self._spans or held.numel() == reference.numel()))
            if not same_layout:
                changes.restarted.append((name, param))
            elif param is not old:
                changes.rebound.append((name, param))
        return changes

    @torch.no_grad()
    def apply_parameter_changes(self, changes: ParameterChanges) -> dict[str, PackedMask]:
        """Track ``changes``; returns the gradient masks gathered until now of the restarted parameters
        (in their former shapes), the part of their state that cannot carry over. Restarted sharded
        parameters are not supported (``ValueError``)."""
        before: dict[str, PackedMask] = {}
        index = {name: i for i, (name, _) in enumerate(self._params)}
        for name, param in changes.restarted:  # refused up front, before any state changes
            if sharding.is_sharded(param) or sharding.is_sharded(self._params[index[name]][1]):
                raise ValueError(f"parameter {name!r} changed shape or dtype while sharded: not supported")
            if name in self._straddling and not self._split_loads:
                raise ValueError(f"parameter {name!r} changed shape or dtype while its tracking is cut along "
                                 "the engine's partitions (DeepSpeed ZeRO-1/2): not supported")
        for name, param in changes.rebound:
            self._params[index[name]] = (name, param)
        for name, param in changes.restarted:
            bits = self.state[name]["gradient_bits"]
            former = math.prod(self._tracked_shapes[name])
            if name in self._spans:  # a collective: every rank restarts the same parameters, in the same order
                bits = self._gather_held(name, bits, former)
            before[name] = PackedMask(bits.to("cpu", copy=True), self._tracked_shapes[name])
            self._params[index[name]] = (name, param)
            if name in self._straddling:  # cut anew, the same way on every rank
                world = len(self._split_loads)
                spans = splitting.cut(param.numel(), world)
                for rank, (old, new) in enumerate(zip(splitting.cut(former, world), spans, strict=True)):
                    self._split_loads[rank] += new[1] - old[1]  # parameters added later balance on true sizes
                self._spans[name] = spans[dist.get_rank()]
            elif name in self._spans:  # the same owner tracks it on, whole
                if self._split_loads:
                    self._split_loads[self._owners[name]] += param.numel() - former
                self._spans[name] = (0, param.numel()) if self._spans[name][1] else (0, 0)
        for name, param in changes.added:
            self._params.append((name, param))
        if self._split_loads:  # every rank adds the same parameters: the same assignment everywhere
            self._assign(changes.added)
        self._named = dict(self._params)
        self._sharded_names = [name for name, p in self._params if sharding.is_sharded(p)]
        self._check_trackable()
        for name, param in [*changes.restarted, *changes.added]:
            self._weight[name] = self._counts_here(name, param)
            self._sample_start[name] = self._first_sample(name, param)
            index = sharding.sample_index(param, self.config.stride) if self.config.tracks_sums else None
            self._sample_index.pop(name, None)
            if index is not None:
                self._sample_index[name] = index
            self._tracked_shapes[name] = sharding.full_shape(param)
            self.state[name] = self._allocate(name, param, self._sample_start[name], index)
            self._full_bitmaps.discard(name)
            if (name, param) in changes.restarted:
                self._expert_slices.pop(name, None)  # its expert layout is no longer known
        return before

    # ------------------------------------------------------------------ split tracking
    def _should_split(self, requested: bool | None) -> bool:
        if requested is False or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            if requested:
                raise ValueError("split=True needs an initialised torch.distributed world of more than one rank")
            return False
        if any(getattr(p, "placements", None) is not None for _, p in self._params):
            return False  # Replicate-only DTensors: each rank's tensor is already its own part
        replicated = splitting.replicated_everywhere(self._params, dist.group.WORLD)
        if requested and not replicated:
            raise ValueError("split=True: the ranks do not hold the same parameters (names, shapes, dtypes, "
                             "values), so no rank can track another's")
        return replicated

    def _assign(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Divide ``named`` among the ranks (gradtrace.tracking.split.divide), the same on every rank: each
        whole to one rank, or, larger than a rank's share, cut into one span per rank."""
        owners, cuts = splitting.divide([(name, p.numel()) for name, p in named], len(self._split_loads),
                                        self._split_loads)
        rank = dist.get_rank()
        for name, param in named:
            if name in cuts:
                self._spans[name] = cuts[name][rank]
                self._straddling.add(name)
            else:
                self._owners[name] = owners[name]
                self._spans[name] = (0, param.numel()) if owners[name] == rank else (0, 0)

    def use_spans(self, spans: Mapping[str, splitting.Span]) -> None:
        """Track, on this rank, only ``spans`` (``{name: (start, length)}`` in each flattened parameter) of
        split-tracked parameters: DeepSpeed ZeRO-1/2 hands each rank the fragments of its own optimizer
        partition. Every rank calls it (one all-gather), before the first step; state restarts empty."""
        if not self._spans or set(spans) != set(self._spans):
            raise ValueError("use_spans needs split tracking and a span for every tracked parameter")
        if self.steps:
            raise ValueError("use_spans must be called before the first observed step")
        held = {name: length for name, (_, length) in spans.items() if length}
        everyone: list = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(everyone, held, group=self._group)
        self._spans = dict(spans)
        self._split_loads = []  # the engine assigns parameters added later: none are expected
        self._straddling = {name for part in everyone for name, length in part.items()
                            if length < self._named[name].numel()}
        ranks = dist.get_process_group_ranks(self._group)
        self._owners = {name: ranks[r] for r, part in enumerate(everyone) for name, length in part.items()
                        if length == self._named[name].numel()}
        for name, param in self._params:
            self._sample_start[name] = self._first_sample(name, param)
            self.state[name] = self._allocate(name, param, self._sample_start[name])
        self._full_bitmaps.clear()

    @property
    def spans(self) -> dict[str, splitting.Span]:
        """This rank's span of each parameter when tracking is split (empty otherwise)."""
        return dict(self._spans)

    def _held(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The part of ``param`` (or of a tensor laid out like it) whose state this rank keeps: its span
        when tracking is split, else its local shard (:func:`gradtrace.tracking.sharding.local`)."""
        span = self._spans.get(name)
        if span is None:
            return _local(param)
        flat = param.reshape(-1)
        return flat.narrow(0, *span) if flat.numel() != span[1] else flat

    def _offset(self, name: str, param: torch.Tensor) -> int:
        """Index, in the flattened full parameter, of the first element this rank keeps."""
        span = self._spans.get(name)
        return span[0] if span is not None else sharding.flat_offset(param)

    def _counts_here(self, name: str, param: torch.Tensor) -> int:
        """1 where this rank's counts of ``param`` enter the sums across ranks (see sharding.counts_here)."""
        if self._group is None or name in self._spans:  # spans are disjoint: each counts its own
            return 1
        return 1 if sharding.counts_here(param, self._group) else 0

    def _first_sample(self, name: str, param: torch.Tensor) -> int:
        """First local index whose global flat index is a multiple of the stride (see sharding.sample_start)."""
        span = self._spans.get(name)
        return (-span[0]) % self.config.stride if span is not None else sharding.sample_start(param, self.config.stride)

    def _keeps(self, name: str) -> bool:
        """Whether this rank keeps any state for ``name`` (not so for another rank's split parameters)."""
        span = self._spans.get(name)
        return span is None or span[1] > 0

    def _gather_held(self, name: str, bits: torch.Tensor | None, numel: int) -> torch.Tensor:
        """The full bit-packed mask of a split parameter of ``numel`` elements from this rank's packed mask of
        its span (a collective; spans on byte boundaries, see :meth:`_packs_its_span`)."""
        owner = self._owners.get(name)
        if owner is not None:
            return splitting.broadcast_packed(bits, numel, owner, self._group, self._collective_device)
        return splitting.gather_packed(bits, self._spans[name], numel, self._group, self._collective_device)

    def _packs_its_span(self, name: str) -> bool:
        """Whether this rank's masks of a split parameter can be packed on their own and placed: held whole
        by one rank, or cut on byte boundaries (:func:`gradtrace.tracking.split.cut`), not DeepSpeed's
        partition fragments, which start anywhere."""
        start, length = self._spans[name]
        return name in self._owners or start % 8 == 0 or length == 0

    def _check_trackable(self) -> None:
        """Refuse, up front and naming them, parameters the tracker cannot measure."""
        float8 = [f"{name} ({p.dtype})" for name, p in self._params if _is_float8(p.dtype)]
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

    def _slices_measurable(self, name: str) -> bool:
        """Per-expert slices need the local shard to be a contiguous run of the flattened full tensor:
        true unsharded, under ZeRO-3 and FSDP2's ``Shard(0)``; not for a DTensor sharded on another dim."""
        param = dict(self._params)[name]
        placements = getattr(param, "placements", None) if not sharding.is_zero3(param) else None
        return not placements or all(not p.is_shard() or p.dim == 0 for p in placements)

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across ranks (FSDP2, ZeRO-3) or their tracking is split among the
        ranks (DDP, ZeRO-0/1/2), so counts are reduced and masks gathered."""
        return self._group is not None

    # ------------------------------------------------------------------ set-up
    def _allocate(self, name: str, param: nn.Parameter, sample_start: int,
                  sample_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        local = self._held(name, param).detach()
        numel = local.numel()
        state: dict[str, torch.Tensor] = {}
        for acc in self._accumulators:
            if acc.name == "reference":
                state[acc.name] = self._reference_copy(local)
            elif acc.name == "last_lowbits":
                state[acc.name] = _change_signature(local).clone()
            else:
                length = acc.length(numel, self.config, sample_start)
                if sample_index is not None and acc.name in ("signed_sum", "abs_sum"):
                    length = sample_index.numel()  # the listed elements of a non-contiguous shard
                state[acc.name] = torch.zeros(length, dtype=acc.dtype(local.dtype), device=local.device)
        return state

    def _sampled(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """The elements of a parameter's flattened local data (or of a mask of it) that carry gradient sums."""
        index = self._sample_index.get(name)
        if index is not None:
            return flat[_to(index, flat.device)]
        return flat[self._sample_start[name]:: self.config.stride]

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
        for name, param in self._params:
            grad = self._local_gradient(name, param, grads)  # asked for every parameter, in order (DeepSpeed)
            if grad is None or not self._keeps(name):
                continue
            weight = self._weight[name]
            state = self.state[name]
            sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
            listed = name in self._sample_index
            if self._cpu_scanner is not None and cpu_scan.supports(grad):
                if name in shard_finite:
                    if host_shard_finite is None:
                        host_shard_finite = shard_finite["*"].tolist()
                    if not host_shard_finite[shard_finite[name]]:  # dropped whole, as in one process
                        host.add(False, False, grad.numel() * weight, None)
                        continue
                folded = self._cpu_scanner.fold(grad, state["gradient_bits"], full=name in self._full_bitmaps,
                                                count=detail, sums=None if listed else sums, stride=stride,
                                                sample_start=self._sample_start[name])
                if folded.full:
                    self._full_bitmaps.add(name)
                if listed and sums is not None and folded.finite:
                    self._add_sums(name, grad, sums, None)
                host.add(folded.any_nonzero, folded.finite, grad.numel() * weight, (folded.nonzero or 0) * weight)
                continue
            nonzero, has_nonzero, finite = _scan_gradient(grad)
            if name in shard_finite:  # a NaN/inf in any rank's shard drops the whole parameter
                finite = _to(shard_finite["*"][shard_finite[name]], grad.device).bool()
            state["gradient_bits"].bitwise_or_(pack_bits(nonzero).mul_(finite))  # NaN/inf: no bit at all
            if sums is not None:
                self._add_sums(name, grad, sums, finite)
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
        counters[COUNTER_INDEX["zero_gradient_steps"]] += 1 - flags[0]
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

    def _local_gradient(self, name: str, param: nn.Parameter,
                        grads: Mapping[str, torch.Tensor | None] | None) -> torch.Tensor | None:
        """The gradient of ``param``'s local data, dense, where its state lives and in a dtype that can
        be scanned (float8 gradients are widened exactly: no ``isfinite`` for float8)."""
        grad = param.grad if grads is None else grads.get(name)
        if grad is None:
            return None
        if grad.is_sparse:
            grad = grad.to_dense()
        grad = self._held(name, grad)
        bits = self.state[name]["gradient_bits"]
        if grad.device != bits.device:  # ZeRO-3 offload_optimizer: gradient partitions on the CPU, state not
            grad = _to(grad, bits.device)
        if _is_float8(grad.dtype):
            grad = grad.float()
        return grad

    def _add_sums(self, name: str, grad: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor],
                  finite: torch.Tensor | None) -> None:
        """Add the sampled elements of a gradient to the sums; ``finite`` (a 0-d flag) zeroes a dropped one."""
        sampled = torch.nan_to_num(self._sampled(name, grad.reshape(-1)).float(), nan=0.0, posinf=0.0, neginf=0.0)
        if finite is not None:
            sampled.mul_(finite)
        sums[0].add_(sampled)
        sums[1].add_(sampled.abs_())

    def _shard_finite(self, grads: Mapping[str, torch.Tensor | None] | None) -> dict[str, Any]:
        """Whether each sharded parameter's gradient is finite on every rank: ``{name: position, "*": flags}``
        (``flags`` an int tensor, 1 = finite everywhere), empty outside sharded runs.

        A single process drops a parameter's whole gradient for the step when any element is NaN/inf; a
        rank sees only its shard, so the ranks agree first: one all-reduce of one flag per sharded
        parameter, at the price of reading each sharded gradient once more. Replicas (HSDP) hold the same
        gradient, so the minimum over the whole reduction group is the minimum over the shards.
        """
        agreeing = [*self._sharded_names, *sorted(self._straddling)]
        if not agreeing:
            return {}
        flags = []
        for name in agreeing:
            grad = self._local_gradient(name, self._named[name], grads)
            if grad is None or grad.numel() == 0:
                flags.append(torch.ones((), dtype=torch.bool, device=self._collective_device))
            elif self._cpu_scanner is not None and cpu_scan.supports(grad):  # NumPy on the raw bits
                flags.append(torch.tensor(self._cpu_scanner.finite(grad), device=self._collective_device))
            else:
                flags.append(_to(_scan_gradient(grad)[2], self._collective_device))
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
        for name, param in self._params:
            if not self._keeps(name):
                continue
            state = self.state[name]
            values = self._held(name, param).detach()
            self._check_dtype(name, values)
            weight = self._weight[name]  # counted on one rank only where several hold the same part
            if self._cpu_scanner is not None and cpu_scan.supports(values):
                changed_on_host += weight * self._cpu_scanner.fold_changes(values, state["last_lowbits"],
                                                                           state["ever_changed_bits"])
                continue
            low = _change_signature(values)
            changed = low.ne(state["last_lowbits"])
            or_pack_into(state["ever_changed_bits"], changed)
            state["last_lowbits"].copy_(low)
            if weight:
                step_changed += _to(changed.sum(), self._primary)
        step_changed += changed_on_host
        self.counters[COUNTER_INDEX["last_step_changed"]] = step_changed
        self.counters[COUNTER_INDEX["changed_elements_total"]] += step_changed

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def _update_masks(self, name: str, param: nn.Parameter, state: Mapping[str, torch.Tensor]):
        current = self._held(name, param).detach().reshape(-1)
        reference = _to(state["reference"], current.device).reshape(-1)
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
            local = self._held(name, param).detach()
            self._check_dtype(name, local)
            if not self._weight[name] or not self._keeps(name):  # another rank counts this part: nothing to add
                rows.append(torch.zeros(len(COUNT_FIELDS), dtype=torch.int64, device=self._primary))
                if name in self._expert_slices:  # the same layout of the summed vector on every rank
                    slice_blocks.append(torch.zeros(self._expert_slices[name], len(COUNT_FIELDS),
                                                    dtype=torch.int64, device=self._primary))
                continue
            listed = name in self._sample_index  # sampled elements by index: the torch path
            experts = self._expert_slices.get(name)
            if fast is not None and not listed and cpu_measure.supports(local, state["reference"]):
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
            updated, updated_abs, updated_rel = self._update_masks(name, param, state)
            zero = torch.zeros((), dtype=torch.int64, device=gradient.device)
            ever = popcount(state["ever_changed_bits"]) if cfg.ever_changed else zero
            if cfg.tracks_sums:
                sampled_gradient = self._sampled(name, gradient)
                signed, absolute = state["signed_sum"].abs(), state["abs_sum"]
                unchanged = sampled_gradient & self._sampled(name, updated).logical_not()
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
        experts = self._expert_slices[name]
        device = state["gradient_bits"].device
        masks = {"gradient": state["gradient_bits"]}
        masks.update(zip(("updated", "updated_abs", "updated_rel"), (b.to(device) for b in update_bits), strict=True))
        if self.config.ever_changed:
            masks["ever_changed"] = state["ever_changed_bits"]
        sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
        full = math.prod(sharding.full_shape(param))
        return slices.slice_rows(masks, sums, config=self.config, slices=experts, slice_numel=full // experts,
                                 offset=self._offset(name, param), local_numel=self._held(name, param).numel(),
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
            held = self._held(name, param)
            numel = held.numel()
            self._check_dtype(name, held)
            if name in self._spans and self._packs_its_span(name):  # split: packed here as if unsplit, then
                mine = self._packed_held(name, param, held, fast) if self._keeps(name) else [None] * len(kinds)
                packed = [self._gather_held(name, bits, param.numel()) for bits in mine]  # assembled
            elif sharding.is_sharded(param) or name in self._spans:
                masks = [unpack_bits(state["gradient_bits"], numel), *self._update_masks(name, param, state)]
                if cfg.ever_changed:
                    masks.append(unpack_bits(state["ever_changed_bits"], numel))
                if name in self._spans:
                    packed = [splitting.gather(m, self._spans[name], param.numel(), self._group,
                                               self._collective_device) for m in masks]
                else:
                    packed = [pack_bits(sharding.gather_full(m, param)) for m in masks]
            else:
                packed = self._packed_held(name, param, _local(param), fast)
            for kind, bits in zip(kinds, packed, strict=True):
                out[kind][name] = PackedMask(bits.to("cpu", copy=True), sharding.full_shape(param))
        return out

    def _packed_held(self, name: str, param: nn.Parameter, held: torch.Tensor,
                     fast: cpu_measure.CpuMeasurer | None) -> list[torch.Tensor]:
        """The packed masks of the part of a parameter this rank keeps (``held``: its data): the gradient
        bits as kept, the update masks from the CPU scan where it applies (packed as it goes, no boolean
        masks), and the ever-changed bits."""
        state = self.state[name]
        local = held.detach()
        if fast is not None and cpu_measure.supports(local, state["reference"]):
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
        tensors = {f"{key}/{name}": value.to("cpu", copy=True).contiguous()
                   for name, state in self.state.items() for key, value in state.items()}
        tensors["counters"] = self.counters.to("cpu", copy=True)  # a snapshot, also when counters live on the CPU
        tensors["steps"] = torch.tensor([self.steps], dtype=torch.int64)
        return tensors

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], *, source: str = "tracker state") -> None:
        """Restore from :meth:`state_tensors`; refuses state of another model or another config.

        Everything is checked before anything is overwritten: a refused state leaves the tracker as it was.
        """
        tensors = dict(tensors)
        saved_counters = tensors.get("counters")
        if (isinstance(saved_counters, torch.Tensor) and saved_counters.dtype == torch.int64
                and saved_counters.dim() == 1 and saved_counters.numel() in EARLIER_COUNTER_COUNTS):
            # Saved by an older gradtrace: counters are only ever appended (state.COUNTERS), and those that
            # did not exist then have counted nothing yet.
            tensors["counters"] = torch.cat([saved_counters, saved_counters.new_zeros(
                len(COUNTERS) - saved_counters.numel())])
        for key, like in (("counters", self.counters), ("steps", torch.zeros(1, dtype=torch.int64))):
            saved = tensors.get(key)
            if not isinstance(saved, torch.Tensor) or saved.shape != like.shape or saved.dtype != like.dtype:
                found = (f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor)
                         else "missing" if saved is None else type(saved).__name__)
                raise ValueError(f"{source}: {key!r} is {found}, expected {tuple(like.shape)} {like.dtype} "
                                 "(saved by another gradtrace version, or damaged?)")
        for name, state in self.state.items():
            for key, value in state.items():
                saved = tensors.get(f"{key}/{name}")
                if saved is None:
                    raise ValueError(f"{source}: no {key!r} for parameter {name!r}; was it saved for another "
                                     "model or with another TrackerConfig?")
                if not isinstance(saved, torch.Tensor) or saved.shape != value.shape or saved.dtype != value.dtype:
                    found = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor) else type(saved).__name__
                    raise ValueError(f"{source}: {key!r} of {name!r} is {found}, "
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

    def layout(self) -> dict[str, tuple[int, int]] | None:
        """``{name: (start, length)}``: the run of each flattened parameter whose state this rank keeps, or
        ``None`` if some local shard is no contiguous run (``Shard(1)``, 2-D meshes): its state can then
        be loaded only by the same layout (see :meth:`load_resharded`)."""
        if self._sample_index or not all(self._slices_measurable(name) for name in self._named):
            return None
        return {name: (self._offset(name, p), self._held(name, p).numel()) for name, p in self._params}

    @property
    def counts_summed(self) -> bool:
        """Whether this rank's counters are its share of sums across ranks (sharded or split tracking)."""
        return self._group is not None

    @torch.no_grad()
    def load_resharded(self, parts: list[reshard.SavedPart]) -> None:
        """Restore state saved by ranks of another layout (another number of processes, or split tracking
        switched on or off): each parameter's state for this rank's run is cut out of the saved runs
        (:mod:`gradtrace.tracking.reshard`). Everything is checked before anything is overwritten."""
        layout = self.layout()
        if layout is None:
            raise ValueError("this rank's shards are not contiguous runs of the parameters (Shard(1), 2-D "
                             "meshes): tracker state saved with another layout cannot be re-cut for them")
        steps = {int(p.tensors["steps"][0]) for p in parts}
        if len(steps) != 1:
            raise ValueError(f"the saved ranks' tracker states are of different steps {sorted(steps)}")
        names = set().union(*(p.layout for p in parts))
        if names != set(self.state):
            extra, missing = sorted(names - set(self.state)), sorted(set(self.state) - names)
            raise ValueError(f"saved tracker state is for other parameters (not tracked here: {extra[:3]}; "
                             f"not saved: {missing[:3]})")
        new = {}
        for name in self._named:
            start, length = layout[name]
            numel = math.prod(self._tracked_shapes[name])
            new[name] = {}
            for key, value in self.state[name].items():
                got = reshard.cut(parts, name, key, numel, start, length, self.config.stride)
                if got.numel() != value.numel() or got.dtype != value.dtype:
                    raise ValueError(f"saved {key!r} of {name!r} does not fit this tracker: {got.numel()} "
                                     f"{got.dtype}, expected {value.numel()} {value.dtype} (another TrackerConfig "
                                     "or dtype?)")
                new[name][key] = got.reshape(value.shape)
        keep_here = self._group is None or dist.get_rank(self._group) == 0
        counters = reshard.counters(parts, keep_here=keep_here)
        for name, state in self.state.items():
            for key, value in state.items():
                value.copy_(new[name][key])
        self._full_bitmaps.clear()
        self.counters.copy_(counters)
        self.steps = steps.pop()

    def state_bytes(self) -> dict[str, int]:
        """Measured bytes of tracker state, split by where it lives (parameter device vs reference)."""
        out = {"device": self.counters.numel() * self.counters.element_size(), "reference": 0}
        for state in self.state.values():
            for key, value in state.items():
                out["reference" if key == "reference" else "device"] += value.numel() * value.element_size()
        for index in self._sample_index.values():  # the sampled elements of non-contiguous shards
            out["device"] += index.numel() * index.element_size()
        return out

    @property
    def numel(self) -> int:
        return sum(self._held(name, p).numel() for name, p in self._params)
