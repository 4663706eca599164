"""Device-to-host copies: never asynchronous towards the host, and on the torch path (what a GPU run takes)
no value read while a step is folded, one transfer per logging step."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import gradtrace
from gradtrace import GradTracker, TrackerConfig
from gradtrace.tracking.kernels.torch_path import to_device as _to
from tests.helpers.tiny_linear import linear, step


class RecordTo(TorchFunctionMode):
    """Records ``(destination device type, non_blocking)`` of every ``Tensor.to`` call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device = next((a for a in args[1:] if isinstance(a, (torch.device, str))), kwargs.get("device"))
            if device is not None:
                self.calls.append((torch.device(device).type, bool(kwargs.get("non_blocking", False))))
        return func(*args, **kwargs)


def test_copies_to_the_host_are_never_asynchronous():
    with RecordTo() as recorded:
        _to(torch.ones(3), torch.device("cpu"))
        _to(torch.ones(3), torch.device("meta"))  # towards a device: asynchronous is safe, and kept
    assert recorded.calls == [("cpu", False), ("meta", True)]
    # a whole tracked step on the torch path (float64 parameters) moves nothing to the CPU asynchronously
    model = linear(dtype=torch.float64)
    tracker = GradTracker(model, TrackerConfig(ever_changed=True))
    with RecordTo() as recorded:
        step(model, tracker, 1)
        tracker.measure()
        tracker.packed_masks()
    assert ("cpu", True) not in recorded.calls and ("cpu", False) in recorded.calls


class RecordHostReads(TorchFunctionMode):
    """Records every call that reads a tensor's values into Python or NumPy: on a GPU, each is a host sync."""

    # Not numpy(): the tracker calls it only where a tensor is on the CPU already (bitpack.popcount's NumPy
    # branch; on a GPU the same count is a table lookup on the device).
    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_torch_path_reads_values_once_per_logging_step_and_never_in_a_step():
    """What a GPU run does (the torch path, forced here on the CPU): no value read while
    folding a step's gradient or update, and exactly one, measure()'s transfer of all counts, per logging
    step; summarizing the result reads no tensor at all."""
    from gradtrace.tracking.summary import summarize

    model = linear(dtype=torch.float64)
    tracker = GradTracker(model, TrackerConfig(ever_changed=True, cancellation="full"))
    tracker.backend = "torch"  # the NumPy paths are for CPU tensors only
    step(model, tracker, 1)
    with RecordHostReads() as reads:
        step(model, tracker, 2)
    assert reads.calls == []
    with RecordHostReads() as reads:
        summarize(tracker.measure(), step=2)
    assert reads.calls == ["tolist"]


def test_only_the_safe_helper_passes_non_blocking():
    """Read by code: every ``non_blocking=`` in the package goes through ``torch_path.to_device``."""
    package = Path(gradtrace.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] + [tree]:
            if function is not tree and function.name == "to_device" and path.name == "torch_path.py":
                continue
            body = function.body if function is tree else [function]
            for node in (n for statement in body for n in ast.walk(statement)):
                if isinstance(node, ast.Call) and any(k.arg == "non_blocking" for k in node.keywords):
                    if not (path.name == "torch_path.py" and _inside_to(tree, node)):
                        offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []


def _inside_to(tree: ast.Module, target: ast.AST) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "to_device" and target in ast.walk(n) for n in ast.walk(tree))
