"""Which parameters are tracked, under which names, and how a model's parameters differ from them.

:func:`named_for_tracking` picks and names the trainable parameters; :func:`compare` tells a model's
current ones apart from the tracked ones (:class:`ParameterChanges`); the tracker applies the changes
(:meth:`GradTracker.apply_parameter_changes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from gradtrace.anatomy.parameter_names import strip_wrapper_prefix, tracked_name
from gradtrace.tracking import sharding
from gradtrace.tracking.engines.base import Placement


def named_for_tracking(named: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
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


def compare(named: Iterable[tuple[str, nn.Parameter]], tracked: Mapping[str, nn.Parameter],
            placements: Mapping[str, Placement], references: Mapping[str, torch.Tensor],
            shapes: Mapping[str, tuple[int, ...]]) -> ParameterChanges:
    """What differs between ``named`` (the parameters that should be tracked now) and the ``tracked`` ones,
    kept as ``placements`` with these ``references`` (their start values) and full ``shapes``."""
    changes = ParameterChanges()
    for name, param in named_for_tracking(named):
        old = tracked.get(name)
        if old is None:
            changes.added.append((name, param))
            continue
        reference = references[name]
        split = placements[name].span is not None
        held = sharding.local(param) if not split else param  # a span of the same shape is the same
        same_layout = (sharding.full_shape(param) == shapes[name] and held.dtype == reference.dtype
                       and (split or held.numel() == reference.numel()))
        if not same_layout:
            changes.restarted.append((name, param))
        elif param is not old:
            changes.rebound.append((name, param))
    return changes
