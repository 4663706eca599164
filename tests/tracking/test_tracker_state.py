"""Hardening of the tracker's state, its files and its edges (issue 16, items 12-15), in one process.

State snapshots and validated restores, masks files that cannot be written or read half-valid, packing
of unaligned views, configuration checked at construction, float8, device-to-host copies that are never
read unsynchronised, and DeepSpeed NVMe offload refused up front.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

import gradtrace
from gradtrace import GradTracker, MaskFileError, TrackerConfig, load_masks, save_masks
from gradtrace.formats.bitpack import pack_bits
from gradtrace.formats.masks_file import FORMAT, PackedMask
from gradtrace.integrations.deepspeed import attach_to_deepspeed
from gradtrace.tracking import sharding
from gradtrace.tracking.kernels.torch_path import to_device as _to
from gradtrace.tracking.state import COUNTER_INDEX
from tests.helpers.deepspeed_fakes import fake_zero_optimizer


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


# ------------------------------------------------------------------------------------------ state (15)
def test_state_tensors_are_a_snapshot_that_later_steps_leave_alone():
    model = linear()
    tracker = GradTracker(model, TrackerConfig(ever_changed=True))
    step(model, tracker, 1)
    snapshot = tracker.state_tensors()
    copies = {key: value.clone() for key, value in snapshot.items()}
    step(model, tracker, 2)
    assert tracker.counters[COUNTER_INDEX["density_step"]] == 2  # the live counters moved on...
    for key, value in snapshot.items():  # ...the snapshot did not
        assert torch.equal(value, copies[key]), key
    assert int(snapshot["counters"][COUNTER_INDEX["density_step"]]) == 1


def test_a_state_saved_before_the_overflow_counter_existed_resumes_with_it_at_zero():
    saved_model, model = linear(0), linear(0)
    saved, tracker = GradTracker(saved_model), GradTracker(model)
    for seed in (1, 2):
        step(saved_model, saved, seed)
    tensors = saved.state_tensors()
    skipped = COUNTER_INDEX["skipped_overflow_steps"]
    assert skipped == len(tensors["counters"]) - 1  # the newest counter, appended last
    tensors["counters"] = tensors["counters"][:skipped]  # what gradtrace saved before it
    tracker.load_state_tensors(tensors)
    assert torch.equal(tracker.counters[:skipped], saved.counters[:skipped]) and tracker.counters[skipped] == 0
    assert tracker.steps == saved.steps


@pytest.mark.parametrize(("break_it", "named"), [
    (lambda t: t.pop("counters"), "counters"),
    (lambda t: t.__setitem__("counters", t["counters"][:3]), "counters"),
    (lambda t: t.__setitem__("counters", t["counters"].float()), "counters"),
    (lambda t: t.pop("steps"), "steps"),
    (lambda t: t.__setitem__("steps", torch.tensor([[1, 2]])), "steps"),
    (lambda t: t.__setitem__("reference/bias", t["reference/bias"][:2]), "bias"),
], ids=["no-counters", "short-counters", "float-counters", "no-steps", "bad-steps", "short-reference"])
def test_a_refused_state_leaves_the_tracker_as_it_was(break_it, named):
    saved_model, model = linear(0), linear(1)
    saved, tracker = GradTracker(saved_model), GradTracker(model)
    for seed in (1, 2):
        step(saved_model, saved, seed)
    step(model, tracker, 3)
    before = tracker.state_tensors()
    tensors = saved.state_tensors()
    break_it(tensors)
    with pytest.raises(ValueError, match=named):
        tracker.load_state_tensors(tensors, source="checkpoint-7")
    after = tracker.state_tensors()
    assert after.keys() == before.keys() and tracker.steps == 1
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_a_valid_state_restores_every_count():
    saved_model, model = linear(0), linear(0)
    saved, tracker = GradTracker(saved_model), GradTracker(model)
    for seed in (1, 2):
        step(saved_model, saved, seed)
    model.load_state_dict(saved_model.state_dict())
    tracker.load_state_tensors(saved.state_tensors())
    assert tracker.measure().per_param == saved.measure().per_param
    assert tracker.measure().counters == saved.measure().counters


# ------------------------------------------------------------------------------------- masks files (15)
def write_raw(path: Path, shape, bits: torch.Tensor) -> None:
    metadata = {"gradtrace_format": FORMAT, "params": json.dumps({"w": {"shape": shape, "dtype": ""}}),
                "kinds": json.dumps(["gradient"]), "step": "", "info": "{}"}
    save_file({"gradient/w": bits}, str(path), metadata=metadata)


@pytest.mark.parametrize(("shape", "bits"), [
    ([0, 2 ** 70], 0),  # zero elements, but no tensor has a size of 2**70
    ([2 ** 40, 2 ** 40], 0),  # 2**80 elements
    ([8.7], 2),  # not an integer (int() would make it 8)
    ([True, 8], 1),
], ids=["huge-size", "huge-product", "float-size", "bool-size"])
def test_shapes_that_are_no_tensors_are_refused_naming_file_and_parameter(tmp_path, shape, bits):
    path = tmp_path / "odd.safetensors"
    write_raw(path, shape, torch.zeros(bits, dtype=torch.uint8))
    with pytest.raises(MaskFileError, match=r"odd\.safetensors.*'w'"):
        load_masks(path)


@pytest.mark.parametrize("mask", [
    PackedMask(torch.zeros(1, dtype=torch.uint8), (21,)),  # 21 bits need 3 bytes
    PackedMask(torch.zeros(3, dtype=torch.int64), (21,)),
    PackedMask(torch.zeros(3, 1, dtype=torch.uint8), (21,)),
    PackedMask(torch.zeros(0, dtype=torch.uint8), (0, 2 ** 70)),
], ids=["short", "int64", "2-d", "huge-shape"])
def test_save_masks_refuses_what_load_masks_would_and_writes_nothing(tmp_path, mask):
    path = tmp_path / "masks.safetensors"
    with pytest.raises(ValueError, match="gradient/w"):
        save_masks(path, {"gradient": {"w": mask}})
    assert not path.exists()


def test_save_masks_refuses_kind_and_parameter_names_that_collide(tmp_path):
    one, other = torch.tensor([True, False]), torch.tensor([False, True])
    # "a" + "b/c" and "a/b" + "c" are both the tensor "a/b/c": one mask would silently replace the other
    masks = {"a": {"b/c": one, "c": one}, "a/b": {"b/c": other, "c": other}}
    with pytest.raises(ValueError, match="collide"):
        save_masks(tmp_path / "masks.safetensors", masks)


@pytest.mark.parametrize("offset", range(1, 8))
def test_pack_bits_of_a_view_not_aligned_to_8_bytes(offset):
    base = torch.rand(64 + offset, generator=torch.Generator().manual_seed(offset)) > 0.5
    view = base[offset:offset + 48]  # contiguous, length a multiple of 8, storage offset not
    assert view.is_contiguous() and view.storage_offset() % 8
    expected = np.packbits(view.numpy(), bitorder="little")
    assert np.array_equal(pack_bits(view).numpy(), expected)


@pytest.mark.parametrize("bins", [0, -1, 2.0, True, (1 << 24) + 1])
def test_histogram_bins_are_checked_at_construction(bins):
    with pytest.raises(ValueError, match="histogram_bins"):
        TrackerConfig(histogram_bins=bins)


def test_one_histogram_bin_holds_every_sampled_element_with_a_gradient():
    model = linear()
    tracker = GradTracker(model, TrackerConfig(histogram_bins=1, sample_stride=2))
    step(model, tracker, 1)
    measured = tracker.measure()
    assert measured.cancellation_histogram == [sum(r["sampled_gradient"] for r in measured.per_param.values())]


# -------------------------------------------------------------------------------------------- float8 (12)
def test_float8_parameters_are_refused_up_front_naming_them():
    model = nn.Linear(4, 2)
    model.weight = nn.Parameter(model.weight.detach().to(torch.float8_e4m3fn), requires_grad=True)
    with pytest.raises(ValueError, match=r"weight \(torch\.float8_e4m3fn\)"):
        GradTracker(model)
    GradTracker([("bias", model.bias)])  # the others can still be tracked


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_gradients_are_read_exactly(dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 7, generator=generator) * (torch.rand(6, 7, generator=generator) < 0.5)
    grad8 = values.to(dtype)
    widened = grad8.float()  # the independent reference: the same values in float32
    trackers = [GradTracker([("w", nn.Parameter(torch.zeros(6, 7)))]) for _ in range(2)]
    trackers[0].observe_gradients({"w": grad8})
    trackers[1].observe_gradients({"w": widened})
    assert trackers[0].measure().per_param == trackers[1].measure().per_param
    assert torch.equal(trackers[0].state["w"]["gradient_bits"], trackers[1].state["w"]["gradient_bits"])
    assert trackers[0].measure().per_param["w"]["gradient"] == int(widened.ne(0).sum())
    # a NaN in a float8 gradient drops the parameter's gradient for the step, as in any other dtype
    nan = grad8.clone()
    nan.view(torch.uint8)[0, 0] = 0x7F  # NaN in both formats
    trackers[0].observe_gradients({"w": nan})
    counters = trackers[0].measure().counters
    assert counters["nonfinite_gradient_steps"] == 1 and counters["discarded_gradient_elements"] == 42


# ------------------------------------------------------------------------------ device-to-host copies (13)
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


# --------------------------------------------------------------------------------- DeepSpeed offload (14)
@pytest.mark.parametrize("attr", ["swap_optimizer", "params_in_nvme_and_cpu"])
def test_deepspeed_nvme_offload_is_refused_up_front(attr):
    model = linear()
    optimizer = fake_zero_optimizer(model.parameters())  # stands in for DeepSpeed's optimizer (no engine here)
    setattr(optimizer, attr, True)
    with pytest.raises(ValueError, match="NVMe"):
        attach_to_deepspeed(GradTracker(model), optimizer)
    assert "step" not in vars(optimizer)  # nothing was hooked


# ------------------------------------------------------------------------- sampled subsets of shards (10)
def test_sampled_elements_of_a_box_shard_are_those_of_the_full_tensor(monkeypatch):
    """The index math of ``sharding.sample_index`` against brute force, on random boxes (the shard that
    ``[Shard(0), Shard(1)]`` and the like leave on a rank); tests/engines/test_mixed_sharding.py runs real DTensors."""
    rng = random.Random(0)

    class Param:
        pass

    for _ in range(300):
        full = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 3)))
        local = tuple(rng.randint(0, n) for n in full)
        offset = tuple(rng.randint(0, n - m) for n, m in zip(full, local, strict=True))
        stride = rng.randint(2, 5)
        monkeypatch.setattr(sharding, "_local_box", lambda p, box=(local, offset): box)
        monkeypatch.setattr(sharding, "is_sharded", lambda p: True)
        monkeypatch.setattr(sharding, "local", lambda p: torch.zeros(0))
        param = Param()
        param.shape = full
        box = torch.arange(int(np.prod(full))).reshape(full)[
            tuple(slice(o, o + n) for o, n in zip(offset, local, strict=True))].reshape(-1)
        index = sharding.sample_index(param, stride)
        if index is None:  # a contiguous run: sample_start describes it
            assert torch.equal(box, torch.arange(int(box[0]), int(box[0]) + box.numel()) if box.numel() else box)
            if box.numel():
                assert sharding.sample_start(param, stride) == (-int(box[0])) % stride
        else:
            assert torch.equal(index, torch.nonzero(box % stride == 0).reshape(-1))
