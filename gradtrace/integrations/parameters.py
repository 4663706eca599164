"""Which parameters a run tracks: the ones its optimizer steps.

A parameter that requires a gradient but is in none of the optimizer's param groups receives gradients
and never changes; tracking it would report it "absorbed by rounding" even in fp32. So the tracked set is
the model's trainable parameters that the optimizer holds, found by identity in its param groups (through
wrappers such as accelerate's ``AcceleratedOptimizer``). The set is looked at again before every step, so
a parameter replaced, unfrozen or added with ``add_param_group`` mid-run is noticed
(:class:`ParameterWatch` makes that look cheap).
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that owns the param groups and the step hooks, inside wrappers that hold it as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, which subclasses ``torch.optim.Optimizer``
    without its hook registries, and similar)."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def optimizer_parameter_ids(optimizer: Any) -> set[int] | None:
    """``id`` of every tensor in the optimizer's param groups; ``None`` without an optimizer."""
    inner = unwrap_optimizer(optimizer)
    groups = getattr(inner, "param_groups", None)
    if groups is None:
        return None
    return {id(p) for group in groups for p in group.get("params", [])}


def stepped_parameters(model: nn.Module, optimizer: Any) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """``(tracked, not_stepped)``: the model's trainable ``(name, parameter)`` pairs that ``optimizer``
    steps, and the names of trainable parameters it does not hold.

    Without an optimizer, or with one that holds none of the model's parameters (master copies kept
    elsewhere), every trainable parameter is tracked.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    held = optimizer_parameter_ids(optimizer)
    if not held or not any(id(p) in held for _, p in trainable):
        return trainable, []
    tracked = [(name, p) for name, p in trainable if id(p) in held]
    return tracked, [name for name, p in trainable if id(p) not in held]


class _Registrations:
    """torch's global hooks for parameter and submodule registration (``setattr``, ``register_parameter``,
    ``add_module``: PEFT's injection, ``resize_token_embeddings``, re-tying), installed once and never
    removed, telling each live :class:`ParameterWatch` about registrations on its model's modules. Global,
    they also see the throwaway containers a forward builds (``self.layers[:n]`` is a new ``ModuleList``
    every call), hence the filter by module."""

    watches: weakref.WeakSet[ParameterWatch] = weakref.WeakSet()
    _installed = False

    @classmethod
    def watch(cls, watch: ParameterWatch) -> None:
        if not cls._installed:
            from torch.nn.modules import module

            module.register_module_parameter_registration_hook(cls._registered)
            module.register_module_module_registration_hook(cls._registered)
            cls._installed = True
        cls.watches.add(watch)

    @classmethod
    def _registered(cls, module: nn.Module, *_: Any) -> None:
        for watch in list(cls.watches):
            watch.registered_on(module)


class ParameterWatch:
    """The parameters to track now (:func:`stepped_parameters`), derived again only when something they
    depend on may have changed; called before every optimizer step.

    A check looks at what can change the set: a parameter or submodule registered on one of the model's
    modules since the last derivation (:class:`_Registrations`), a parameter's shape, dtype or
    ``requires_grad`` (``p.data = ...``, ``requires_grad_()``), the tensors in the optimizer's param groups.
    That is O(tensors) compares of attributes, no values read; deriving the set walks ``named_parameters()``
    and builds every name, which cost 0.3 ms a step on a 57-tensor model. Not seen: a tensor written into a
    module's ``_parameters`` dict directly, bypassing ``setattr`` (FSDP2 does so to swap its own shards,
    which is no change of the set). Unchanged, a call returns the very list it returned before, so callers
    can tell by identity.
    """

    def __init__(self, model: nn.Module, optimizer: Any):
        self.model, self.optimizer = model, optimizer
        self._derive()
        _Registrations.watch(self)

    def __call__(self) -> list[tuple[str, nn.Parameter]]:
        if self._changed():
            self._derive()
        return self._tracked

    def registered_on(self, module: nn.Module) -> None:
        if id(module) in self._module_ids:
            self._registered = True

    def _derive(self) -> None:
        self._registered = False
        self._tracked = stepped_parameters(self.model, self.optimizer)[0]
        # The modules are held, so that their ids cannot be reused by others while they are looked up.
        self._modules = list(self.model.modules())
        self._module_ids = {id(m) for m in self._modules}
        self._parameters = list(self.model.parameters())  # frozen ones too: they may be unfrozen
        self._layout = [(p.shape, p.dtype, p.requires_grad) for p in self._parameters]
        self._groups = getattr(unwrap_optimizer(self.optimizer), "param_groups", None) or []
        self._held = self._group_members()

    def _group_members(self) -> list[int]:
        return [id(p) for group in self._groups for p in group.get("params", ())]

    def _changed(self) -> bool:
        if self._registered:
            return True
        if any(p.shape != shape or p.dtype != dtype or p.requires_grad != trainable
               for p, (shape, dtype, trainable) in zip(self._parameters, self._layout, strict=True)):
            return True
        return self._group_members() != self._held


def describe_selection(not_stepped: list[str], optimizer: Any) -> dict[str, Any]:
    """What the run info says about the selection."""
    held = optimizer_parameter_ids(optimizer)
    return {
        "rule": "trainable parameters in the optimizer's param groups" if held else "every trainable parameter",
        "trainable_not_in_optimizer": len(not_stepped),
        "examples_not_in_optimizer": not_stepped[:5],
    }


def learning_rates(optimizer: Any) -> list[tuple[float, list[Any]]]:
    """``(lr, parameters)`` of each of the optimizer's param groups now (empty without an optimizer)."""
    groups = getattr(unwrap_optimizer(optimizer), "param_groups", None) or []
    return [(float(group.get("lr", 0.0)), list(group.get("params", ()))) for group in groups
            if isinstance(group.get("lr", 0.0), (int, float))]
