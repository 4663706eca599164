"""Stand-ins for DeepSpeed's objects, for the tests that need no DeepSpeed engine: found by class name and
module, as gradtrace finds the real ones."""

from __future__ import annotations

import torch
from torch import nn


class DeepSpeedOptimizerWrapper:
    """Stands in for accelerate's wrapper (what a Trainer callback receives): found by its class name."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def fake_zero_optimizer(params, *, stage=2):
    """A torch optimizer whose class looks like DeepSpeed's ZeRO-1/2 optimizer (module and name)."""
    cls = type("DeepSpeedZeroOptimizer", (torch.optim.SGD,), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})
    optimizer = cls(params, lr=0.1)
    optimizer.partition_gradients = stage == 2
    return optimizer


def fake_engine(module, optimizer, stage=2):
    """An nn.Module whose class looks like DeepSpeed's engine: ``.module``, ``.optimizer``, its ZeRO stage."""
    cls = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine",
                                                 "zero_optimization_stage": lambda self: stage})
    engine = cls()
    engine.module, engine.optimizer = module, optimizer
    return engine
