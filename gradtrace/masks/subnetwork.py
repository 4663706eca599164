"""Train a subnetwork alone: only the elements of a mask may change.

Mukherjee et al. (arXiv 2505.11711) retrain from θ_init applying ``m ⊙ ∇θL`` before each update. With
decoupled weight decay (AdamW) or momentum, masking the gradient alone does **not** freeze the
masked-out weights: ``θ ← θ − lr·λ·θ`` moves every weight. So this module does both:

1. zeroes the gradient outside the mask as soon as it is accumulated (so gradient clipping and the
   optimizer's moments see the subnetwork's gradient only), and again right before the step;
2. after every ``optimizer.step()`` writes the masked-out elements back from a snapshot taken at the
   start, so they stay **bit-identical** to their initial values whatever the optimizer does.

Plain loops use :func:`restrict_to_subnetwork` (optimizer step hooks); the ``transformers`` Trainer
uses ``SubnetworkCallback``, a thin adapter driving the same :class:`SubnetworkRestriction` (built on
first access, so importing this module for a plain loop does not import transformers).

Memory: per restricted parameter, a boolean mask (1 byte per element) plus a copy of the masked-out
values in the parameter's dtype. Parameters must be ordinary local tensors (not FSDP/DeepSpeed shards).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradtrace.anatomy.parameter_names import matching_key
from gradtrace.formats.dtypes import INT_VIEW
from gradtrace.formats.masks_file import Masks, PackedMask, load_masks

MaskInput = str | os.PathLike | Mapping[str, Any]



class SubnetworkError(ValueError):
    """The masks do not fit the model (names or shapes of the trainable parameters differ)."""


def read_masks(masks: MaskInput, kind: str = "update") -> dict[str, torch.Tensor]:
    """``{parameter name: BoolTensor}`` from a masks file path, a ``{kind: {name: mask}}`` dict (e.g. a
    loaded :class:`~gradtrace.formats.masks_file.Masks`) or a plain ``{name: mask}`` dict."""
    if isinstance(masks, (str, os.PathLike)):
        masks = load_masks(masks)
    if not masks:
        raise SubnetworkError("the masks are empty")
    first = next(iter(masks.values()))
    if isinstance(first, (torch.Tensor, PackedMask)):
        per_param = masks
    else:
        if kind not in masks:
            source = f"{masks.path}: " if isinstance(masks, Masks) and masks.path else ""
            raise SubnetworkError(f"{source}no {kind!r} masks (kinds: {sorted(masks)})")
        per_param = masks[kind]
    out = {}
    for name, mask in per_param.items():
        mask = mask.to_bool() if isinstance(mask, PackedMask) else torch.as_tensor(mask)
        out[name] = mask if mask.dtype == torch.bool else mask != 0
    return out


@dataclass
class _Restricted:
    name: str
    param: nn.Parameter
    outside: torch.Tensor  # bool, True where the element must keep its initial value
    frozen: torch.Tensor  # the initial values at those positions (param dtype, flat)
    all_outside: bool  # the whole tensor is frozen: restore with one copy_


def _describe(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class SubnetworkRestriction:
    """Restricts training of ``model`` to the elements where ``masks`` is True.

    Every trainable parameter needs a mask of its shape (masks of frozen parameters are accepted and
    ignored; masks of tied aliases are ORed). Construction snapshots the masked-out values; then
    :meth:`mask_gradients` zeroes gradients outside the mask and :meth:`restore` writes the snapshot
    back. With ``optimizer`` both run automatically around every ``optimizer.step()``; gradients are
    also masked as they are accumulated (``register_post_accumulate_grad_hook``), before clipping.
    """

    def __init__(self, model: nn.Module, masks: MaskInput, kind: str = "update",
                 optimizer: torch.optim.Optimizer | None = None):
        per_param = read_masks(masks, kind)
        self.ignored_buffer_masks = 0  # masks naming float buffers (saved in checkpoints, never trained)
        self._entries = self._match(model, per_param)
        self._hooks: list[Any] = []
        for entry in self._entries:
            self._hooks.append(entry.param.register_post_accumulate_grad_hook(self._grad_hook(entry)))
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.mask_gradients()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.restore()))

    # -- setup ------------------------------------------------------------------------------------
    def _match(self, model: nn.Module, per_param: Mapping[str, torch.Tensor]) -> list[_Restricted]:
        # Exact names first; otherwise the name without wrapper prefixes, which must then be unambiguous.
        by_exact = dict(model.named_parameters(remove_duplicate=False))
        by_canonical: dict[str, list[nn.Parameter]] = {}
        for name, param in by_exact.items():
            candidates = by_canonical.setdefault(matching_key(name), [])
            if all(param is not c for c in candidates):
                candidates.append(param)
        buffers = {matching_key(n) for n, _ in model.named_buffers()}
        unknown, wrong_shape = [], []
        masks_of: dict[int, list[torch.Tensor]] = {}
        names_of: dict[int, str] = {}
        for name, mask in per_param.items():
            key = matching_key(name)
            candidates = [by_exact[name]] if name in by_exact else by_canonical.get(key, [])
            if len(candidates) > 1:
                raise SubnetworkError(f"mask {name!r} matches {len(candidates)} parameters of the model once "
                                      "wrapper prefixes are removed; key the masks by the model's exact names")
            param = candidates[0] if candidates else None
            if param is None:
                if key in buffers:  # float buffers saved in a checkpoint (e.g. rotary inv_freq)
                    self.ignored_buffer_masks += 1
                else:
                    unknown.append(name)
                continue
            if tuple(mask.shape) != tuple(param.shape):
                wrong_shape.append(f"{name!r} mask {list(mask.shape)} vs parameter {list(param.shape)}")
                continue
            masks_of.setdefault(id(param), []).append(mask)
        seen: set[int] = set()
        missing = []
        entries = []
        for name, param in model.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) not in masks_of:
                missing.append(name)
                continue
            names_of[id(param)] = name
        if unknown or wrong_shape or missing:
            problems = []
            if unknown:
                problems.append(f"{len(unknown)} masks name no parameter of the model ({_describe(unknown)})")
            if wrong_shape:
                problems.append(f"{len(wrong_shape)} masks have the wrong shape ({'; '.join(wrong_shape[:3])})")
            if missing:
                problems.append(f"{len(missing)} trainable parameters have no mask ({_describe(missing)})")
            raise SubnetworkError("the masks do not fit this model: " + "; ".join(problems)
                                  + ". Were they recorded on another model, or with other trainable parameters "
                                  "(e.g. full fine-tuning vs LoRA)?")
        for name, param in model.named_parameters():
            if id(param) not in names_of or names_of[id(param)] != name:
                continue
            keep = masks_of[id(param)][0].to(param.device)
            for other in masks_of[id(param)][1:]:
                keep = keep | other.to(param.device)
            outside = ~keep
            if not bool(outside.any()):
                continue  # the whole tensor is in the subnetwork: nothing to restrict
            with torch.no_grad():
                all_outside = bool(outside.all())
                frozen = param.detach().clone() if all_outside else param.detach().masked_select(outside)
            entries.append(_Restricted(name, param, outside, frozen, all_outside))
        return entries

    @staticmethod
    def _grad_hook(entry: _Restricted):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                param.grad.masked_fill_(entry.outside, 0)
        return hook

    # -- per step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero every gradient element outside the mask (idempotent; call before ``optimizer.step()``)."""
        for entry in self._entries:
            grad = entry.param.grad
            if grad is not None:
                grad.masked_fill_(entry.outside, 0)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the initial values back outside the mask (call after every ``optimizer.step()``)."""
        for entry in self._entries:
            if entry.all_outside:
                entry.param.copy_(entry.frozen)
            else:
                entry.param.masked_scatter_(entry.outside, entry.frozen)

    @torch.no_grad()
    def verify(self) -> int:
        """Number of masked-out elements whose stored bits differ from the start (0 when restricted)."""
        changed = 0
        for entry in self._entries:
            current = entry.param.detach()
            current = current.reshape(-1) if entry.all_outside else current.masked_select(entry.outside)
            view = INT_VIEW[current.element_size()]
            changed += int((current.view(view) != entry.frozen.reshape(-1).view(view)).sum())
        return changed

    def remove(self) -> None:
        """Detach every hook; the parameters keep their current values."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- introspection ----------------------------------------------------------------------------
    @property
    def frozen_elements(self) -> int:
        """Elements held at their initial value (outside the mask)."""
        return sum(e.frozen.numel() for e in self._entries)

    @property
    def parameter_names(self) -> list[str]:
        """Parameters that have at least one frozen element."""
        return [e.name for e in self._entries]

    def __enter__(self) -> SubnetworkRestriction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def restrict_to_subnetwork(model: nn.Module, optimizer: torch.optim.Optimizer | None, masks: MaskInput,
                           kind: str = "update") -> SubnetworkRestriction:
    """Restrict training of ``model`` to ``masks`` (a masks file, ``{kind: {name: mask}}`` or ``{name: mask}``).

    With ``optimizer``, gradients are masked before and the masked-out weights restored after every
    ``optimizer.step()`` via its step hooks; without one, call ``handle.mask_gradients()`` before and
    ``handle.restore()`` after each step yourself. ``handle.remove()`` undoes the hooks. Raises
    :class:`SubnetworkError` at once if the masks do not fit the model's trainable parameters.
    """
    return SubnetworkRestriction(model, masks, kind, optimizer)


def _callback_class() -> type:
    """Build :class:`SubnetworkCallback` on first use, so the plain-loop API never imports transformers."""
    global _SubnetworkCallback
    if _SubnetworkCallback is not None:
        return _SubnetworkCallback
    from transformers import TrainerCallback

    class SubnetworkCallback(TrainerCallback):
        """``transformers`` callback: train only the masked elements (see :class:`SubnetworkRestriction`).

        ``SubnetworkCallback(masks, kind="update")``: ``masks`` is a masks file path, ``{kind: {name:
        mask}}`` or ``{name: mask}``; it is read at construction. The fit with the model is checked
        when training begins (a :class:`SubnetworkError` then stops ``trainer.train()`` before the first
        step). Gradients are masked as they are accumulated (so clipping sees the subnetwork's norm) and
        in ``on_pre_optimizer_step``; masked-out weights are restored in ``on_optimizer_step``.
        """

        def __init__(self, masks: MaskInput, kind: str = "update"):
            self.kind = kind
            self.masks = read_masks(masks, kind)
            self.restriction: SubnetworkRestriction | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise SubnetworkError("SubnetworkCallback needs the model at on_train_begin")
            if self.restriction is not None:
                self.restriction.remove()
            self.restriction = SubnetworkRestriction(model, self.masks, self.kind)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.restriction is not None:
                self.restriction.mask_gradients()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.restriction is not None:
                self.restriction.restore()

        def on_train_end(self, args, state, control, **kwargs):
            if self.restriction is not None:
                self.restriction.remove()

    SubnetworkCallback.__module__ = __name__
    SubnetworkCallback.__qualname__ = "SubnetworkCallback"  # picklable through the module __getattr__
    _SubnetworkCallback = SubnetworkCallback
    return SubnetworkCallback


_SubnetworkCallback: type | None = None


def __getattr__(name: str) -> Any:
    # ``from gradtrace.masks.subnetwork import SubnetworkCallback`` builds the class (importing transformers).
    if name == "SubnetworkCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
