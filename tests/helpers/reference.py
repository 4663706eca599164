"""The simplest independent bookkeeping of what a Trainer run's parameters received and changed, and the
check that gradtrace's exported masks equal it bit for bit."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from gradtrace.anatomy.parameter_names import tracked_name


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


class ReferenceRecorder(TrainerCallback):
    """The simplest independent bookkeeping: full boolean tensors, updated where the optimizer's
    gradient is final (``on_pre_optimizer_step``), and a full copy of the starting weights."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = {tracked_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.initial = {n: p.detach().clone() for n, p in self.params.items()}
        self.gradient = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in self.params.items()}
        self.optimizer_steps = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, param in self.params.items():
            if param.grad is not None:
                self.gradient[name] |= (param.grad != 0) & torch.isfinite(param.grad)
        self.optimizer_steps += 1

    def updated(self) -> dict[str, torch.Tensor]:
        return {n: raw_bits(p.detach()) != raw_bits(self.initial[n]) for n, p in self.params.items()}


def assert_masks_equal_reference(masks, reference: ReferenceRecorder, *, some_without_gradient: bool = True) -> None:
    """Exported masks equal the reference bit for bit, and the reference is not trivial."""
    assert set(masks["gradient"]) == set(reference.gradient)
    updated = reference.updated()
    for name in reference.gradient:
        assert torch.equal(masks["gradient"][name], reference.gradient[name]), f"gradient mask differs: {name}"
        assert torch.equal(masks["update"][name], updated[name]), f"update mask differs: {name}"
    received = torch.cat([g.reshape(-1) for g in reference.gradient.values()])
    assert received.any()
    if some_without_gradient:
        assert not received.all(), "the run should leave some elements without gradient"
