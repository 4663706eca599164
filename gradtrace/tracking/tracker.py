"""The core tracker: per-parameter gradient and update state, kept beside each parameter.

Call :meth:`GradTracker.observe_gradients` once per optimizer step while ``.grad`` holds the gradient
the optimizer is about to apply (after accumulation and clipping), and :meth:`observe_update` right
after ``optimizer.step()``. Both only queue tensor ops on the parameters' devices: no host sync.
:meth:`measure` (at logging steps) turns the state into per-parameter counts with one host sync.

This module sets the tracker up and keeps its parameter set; the state is declared in :mod:`.state`,
each parameter placed by an engine (:mod:`.engines`), steps folded in by :mod:`.folding`, the state read
by :mod:`.measuring` and saved by :mod:`.persistence`.

This module knows nothing of transformers, TRL or W&B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.anatomy.experts import ExpertLayout, config_expert_counts, expert_layout
from gradtrace.anatomy.parameter_names import tracked_name
from gradtrace.formats.masks_file import PackedMask
from gradtrace.tracking import parameter_set, persistence, reshard, sharding
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.engines.base import Engine, Placement, Span
from gradtrace.tracking.engines.choice import choose_engine
from gradtrace.tracking.engines.partitions import EnginePartitions
from gradtrace.tracking.engines.split import SplitTracking
from gradtrace.tracking.folding import Folding
from gradtrace.tracking.kernels import Backend, torch_path
from gradtrace.tracking.measuring import COUNT_FIELDS, Measurement, Measuring
from gradtrace.tracking.parameter_set import ParameterChanges, named_for_tracking
from gradtrace.tracking.state import COUNTERS, allocate, enabled_accumulators, state_bytes

__all__ = ["COUNT_FIELDS", "GradTracker", "Measurement", "ParameterChanges"]

_local = sharding.local
_to = torch_path.to_device


class GradTracker(Folding, Measuring):
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
        self._engine: Engine = choose_engine(self._params, split)
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
        declared = config_expert_counts(getattr(whole if whole is not None else model, "config", None))
        self.experts: ExpertLayout = expert_layout(shapes, declared).restricted_to(shapes.keys() & self.state.keys())
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
    def placements(self) -> dict[str, Placement]:
        """Where each parameter's kept part lies on this rank (gradtrace.tracking.engines.base.Placement)."""
        return dict(self._placements)

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
