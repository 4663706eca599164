"""Saving and restoring the tracker's state: flat CPU tensors ``"{accumulator}/{parameter}"``, checked
before anything is overwritten, whether loaded as saved (:func:`check_saved`) or re-cut from the runs that
ranks of another layout saved (:func:`recut`, :mod:`gradtrace.tracking.reshard`).

The tracker owns its state; these functions only read it, and return what to copy in, so a refused
state leaves the tracker as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradtrace.tracking import reshard
from gradtrace.tracking.state import COUNTERS, EARLIER_COUNTER_COUNTS, RETIRED_ACCUMULATORS

State = Mapping[str, Mapping[str, torch.Tensor]]


def snapshot(state: State, counters: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Everything needed to resume, as flat CPU tensors (``"{accumulator}/{parameter}"``)."""
    tensors = {f"{key}/{name}": value.to("cpu", copy=True).contiguous()
               for name, kept in state.items() for key, value in kept.items()}
    tensors["counters"] = counters.to("cpu", copy=True)  # a snapshot, also when counters live on the CPU
    tensors["steps"] = torch.tensor([steps], dtype=torch.int64)
    return tensors


def drop_retired(tensors: dict[str, torch.Tensor], state: State) -> set[tuple[str, str]]:
    """Remove from a saved state (in place) the accumulators an older gradtrace kept and this one does not
    (:data:`~gradtrace.tracking.state.RETIRED_ACCUMULATORS`); return the ``(accumulator, parameter)`` pairs
    that then keep their freshly allocated value: the exact change detector's ``last_values`` (the
    parameter's current values, which after a resume are the values after the saved step)."""
    kept = set()
    for key in [k for k in tensors if k.split("/", 1)[0] in RETIRED_ACCUMULATORS]:
        name = key.split("/", 1)[1]
        del tensors[key]
        if name in state and "last_values" in state[name] and f"last_values/{name}" not in tensors:
            kept.add(("last_values", name))
    return kept


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    return "missing" if value is None else type(value).__name__


def check_tensor(source: str, what: str, saved, like: torch.Tensor, *, hint: str) -> None:
    """Refuse ``saved`` unless it is a tensor of ``like``'s shape and dtype, naming ``what`` and ``source``."""
    if not isinstance(saved, torch.Tensor) or saved.shape != like.shape or saved.dtype != like.dtype:
        raise ValueError(f"{source}: {what} is {_describe(saved)}, expected {tuple(like.shape)} {like.dtype} "
                         f"({hint})")


def _widen_counters(tensors: dict[str, torch.Tensor]) -> None:
    """Counters saved by an older gradtrace: they are only ever appended (state.COUNTERS), and those that did
    not exist then have counted nothing yet."""
    saved = tensors.get("counters")
    if (isinstance(saved, torch.Tensor) and saved.dtype == torch.int64 and saved.dim() == 1
            and saved.numel() in EARLIER_COUNTER_COUNTS):
        tensors["counters"] = torch.cat([saved, saved.new_zeros(len(COUNTERS) - saved.numel())])


def check_saved(tensors: Mapping[str, torch.Tensor], state: State, counters: torch.Tensor, *,
                source: str) -> tuple[dict[str, torch.Tensor], set[tuple[str, str]]]:
    """``(tensors, kept_as_is)``: a saved state checked against the tracker's ``state`` and ``counters``
    (every accumulator of every parameter, nothing more), older versions' layouts brought up to date;
    ``kept_as_is`` the ``(accumulator, parameter)`` pairs that keep their current value."""
    tensors = dict(tensors)
    kept_as_is = drop_retired(tensors, state)
    _widen_counters(tensors)
    for key, like in (("counters", counters), ("steps", torch.zeros(1, dtype=torch.int64))):
        check_tensor(source, repr(key), tensors.get(key), like, hint="saved by another gradtrace version, or damaged?")
    for name, kept in state.items():
        for key, value in kept.items():
            if (key, name) in kept_as_is:
                continue
            saved = tensors.get(f"{key}/{name}")
            if saved is None:
                raise ValueError(f"{source}: no {key!r} for parameter {name!r}; was it saved for another "
                                 "model or with another TrackerConfig?")
            check_tensor(source, f"{key!r} of {name!r}", saved, value, hint="another model or TrackerConfig?")
    expected = ({f"{key}/{name}" for name, kept in state.items() for key in kept if (key, name) not in kept_as_is}
                | {"counters", "steps"})
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{source}: holds state for parameters this model does not track: {unexpected[:3]}")
    return tensors, kept_as_is


def recut(parts: list[reshard.SavedPart], state: State, layout: Mapping[str, tuple[int, int]],
          numels: Mapping[str, int], stride: int, *, keep_here: bool
          ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, int]:
    """``(state, counters, steps)`` for this rank's ``layout`` cut out of the runs other ranks saved
    (``numels``: each parameter's full size); everything checked, nothing of the tracker changed."""
    steps = {int(p.tensors["steps"][0]) for p in parts}
    if len(steps) != 1:
        raise ValueError(f"the saved ranks' tracker states are of different steps {sorted(steps)}")
    names = set().union(*(p.layout for p in parts))
    if names != set(state):
        extra, missing = sorted(names - set(state)), sorted(set(state) - names)
        raise ValueError(f"saved tracker state is for other parameters (not tracked here: {extra[:3]}; "
                         f"not saved: {missing[:3]})")
    kept_as_is = set()
    for part in parts:
        part.tensors = dict(part.tensors)
        kept_as_is |= drop_retired(part.tensors, state)
    new: dict[str, dict[str, torch.Tensor]] = {}
    for name, kept in state.items():
        start, length = layout[name]
        new[name] = {}
        for key, value in kept.items():
            if (key, name) in kept_as_is:
                new[name][key] = value
                continue
            got = reshard.cut(parts, name, key, numels[name], start, length, stride)
            if got.numel() != value.numel() or got.dtype != value.dtype:
                raise ValueError(f"saved {key!r} of {name!r} does not fit this tracker: {got.numel()} "
                                 f"{got.dtype}, expected {value.numel()} {value.dtype} (another TrackerConfig "
                                 "or dtype?)")
            new[name][key] = got.reshape(value.shape)
    return new, reshard.counters(parts, keep_here=keep_here), steps.pop()
