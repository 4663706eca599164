"""A seeded ``nn.Linear`` and one observed SGD step on it, for the tracker tests that need no real model."""

from __future__ import annotations

import torch
from torch import nn

from gradtrace import GradTracker


def linear(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(5, 3).to(dtype)


def step(model: nn.Module, tracker: GradTracker, seed: int) -> None:
    """One observed SGD step with a sparse gradient: about half the elements get one."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype) * (
            torch.rand(param.shape, generator=generator) < 0.5)
    tracker.observe_gradients()
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.1 * param.grad
    tracker.observe_update()
