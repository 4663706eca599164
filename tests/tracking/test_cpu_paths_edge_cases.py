"""Review of the NumPy CPU fast paths (gradtrace.tracking.kernels) against the torch path.

Each test feeds a fast tracker and a torch-only one (``backend="torch"``)
the same data and asks for the same state, counters, measurements and masks, on paths the tests of
tests/tracking/test_tracker.py and tests/tracking/test_cpu_measure.py do not reach: gradient and parameter layouts, resume
into a tracker whose bitmaps are full, shard sample starts at or past the shard's end; and a parameter
cast after tracking began, which both paths refuse.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradtrace.tracking.sharding
from gradtrace import TrackerConfig
from gradtrace.tracking.kernels import Backend
from gradtrace.tracking.kernels.numpy_scan import CpuScanner
from gradtrace.tracking.tracker import GradTracker


def _pair(params, config, chunk_elements: int | None = None):
    fast = GradTracker(params, config, backend=Backend("numpy", chunk_elements=chunk_elements))
    return fast, GradTracker(params, config, backend="torch")


def _assert_same_state(fast: GradTracker, reference: GradTracker, where) -> None:
    for name, state in reference.state.items():
        for key, value in state.items():
            mine = fast.state[name][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, (where, name, key)
            assert torch.equal(mine.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), \
                (where, name, key)
    assert torch.equal(fast.counters, reference.counters), where


def _assert_same_measure(fast: GradTracker, reference: GradTracker, where) -> None:
    mine, theirs = fast.measure(), reference.measure()
    assert mine.per_param == theirs.per_param, where
    assert mine.cancellation_histogram == theirs.cancellation_histogram, where
    assert mine.counters == theirs.counters, where
    mine, theirs = fast.packed_masks(), reference.packed_masks()
    for kind, masks in theirs.items():
        for name, mask in masks.items():
            assert torch.equal(mine[kind][name].bits, mask.bits), (where, kind, name)


@pytest.mark.parametrize("before, after", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-to-fp32", "fp32-to-bf16"])
@pytest.mark.parametrize("numel", [10, 11])
def test_a_parameter_cast_after_tracking_began_is_refused_clearly(before, after, numel):
    """``model.half()`` after the tracker was built: the reference copy and the change signatures are laid
    out for the old dtype (the NumPy path would reinterpret their bytes with the new width — an error from
    deep inside NumPy for bf16 -> fp32, silently wrong signatures for fp32 -> bf16). Both paths refuse it
    with one clear error, in every call that compares the parameter with its state."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(numel, generator=generator).to(before))
    for tracker in _pair([("p", param)], TrackerConfig(cancellation="off", ever_changed=True)):
        with torch.no_grad():
            param.data = param.data.to(after)
            param.add_(torch.randn(numel, generator=generator).to(after) * 1e-2)
        state_before = {key: value.clone() for key, value in tracker.state["p"].items()}
        for call in (tracker.observe_update, tracker.measure, tracker.packed_masks):
            with pytest.raises(ValueError, match=r"'p' is torch\.\w+ now but was torch\.\w+ when tracking began"):
                call()
        for key, value in state_before.items():  # nothing was written
            assert torch.equal(tracker.state["p"][key], value), key
        param.data = param.data.to(before)  # cast back for the next tracker of the pair


def test_reloading_an_earlier_state_into_a_tracker_with_full_bitmaps():
    """``load_state_tensors`` must forget the "bitmap full" cache: after a parameter's bitmap became full
    and an earlier, sparser state is loaded back, new bits must be set again (a ``detail=False`` step
    included, which reads nothing but the bitmap)."""
    generator = torch.Generator().manual_seed(1)
    params = [(f"p{i}", nn.Parameter(torch.zeros(n, dtype=dtype)))
              for i, (n, dtype) in enumerate([(100, torch.bfloat16), (37, torch.float32), (9, torch.float16)])]
    fast, reference = _pair(params, TrackerConfig(sample_stride=7), chunk_elements=16)
    sparse = {}
    for name, p in params:
        grad = torch.randn(p.numel(), generator=generator).to(p.dtype)
        grad[::2] = 0
        sparse[name] = grad
    for tracker in (fast, reference):
        tracker.observe_gradients(sparse)
    earlier = fast.state_tensors(), reference.state_tensors()
    for tracker in (fast, reference):
        tracker.observe_gradients({name: torch.ones(p.shape, dtype=p.dtype) for name, p in params})
    assert fast._full_bitmaps == {name for name, _ in params}
    for tracker, tensors in zip((fast, reference), earlier, strict=True):
        tracker.load_state_tensors(tensors)
    assert not fast._full_bitmaps
    single = {}
    for name, p in params:
        grad = torch.zeros(p.numel(), dtype=p.dtype)
        grad[1] = 1.0  # an odd element: its bit was not set in the earlier state
        single[name] = grad
    for step, grads in enumerate([single, sparse, single]):
        for tracker in (fast, reference):
            tracker.observe_gradients(grads, detail=step != 0)
        _assert_same_state(fast, reference, step)
    _assert_same_measure(fast, reference, "measure")


def _layouts(dtype: torch.dtype, generator: torch.Generator):
    """Gradients laid out in every way a caller may hand them over, for a 6x9 and a 9-element parameter."""

    def values(*shape, like=dtype):
        x = torch.randn(*shape, generator=generator)
        x[torch.rand(*shape, generator=generator) < 0.5] = 0.0
        return x.to(like)

    return {
        "transposed": lambda: {"w": values(9, 6).t(), "b": values(9)},
        "storage offset": lambda: {"w": values(100)[5:59].view(6, 9), "b": values(20)[11:]},
        "every other": lambda: {"w": values(6, 18)[:, ::2], "b": values(18)[::2]},
        "expanded": lambda: {"w": values(1, 9).expand(6, 9), "b": values(1).expand(9)},
        "requires_grad": lambda: {"w": values(6, 9).requires_grad_(), "b": values(9).requires_grad_()},
        "sparse": lambda: {"w": values(6, 9).to_sparse(), "b": values(9).to_sparse()},
        "fp32 mapping": lambda: {"w": values(6, 9, like=torch.float32), "b": values(9, like=torch.float32)},
        "fp64 mapping": lambda: {"w": values(6, 9, like=torch.float64), "b": values(9, like=torch.float64)},
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", [TrackerConfig(sample_stride=7, ever_changed=True),
                                    TrackerConfig(cancellation="full")], ids=["stride7", "full"])
def test_gradient_layouts_and_parameter_layouts_match_the_torch_path(dtype, config):
    """Non-contiguous, offset, expanded, sparse, ``requires_grad`` and other-dtype gradients (some take the
    NumPy path, some the torch path, within one step), then parameters replaced by channels-last,
    column-major and storage-offset tensors: the same state, measurement and masks on both paths."""
    generator = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(6, 9, generator=generator).to(dtype))
    b = nn.Parameter(torch.randn(9, generator=generator).to(dtype))
    c = nn.Parameter(torch.randn(2, 3, 2, 2, generator=generator).to(dtype))
    scalar = nn.Parameter(torch.randn((), generator=generator).to(dtype))
    empty = nn.Parameter(torch.zeros(0, 3, dtype=dtype))
    params = [("w", w), ("b", b), ("c", c), ("scalar", scalar), ("empty", empty)]
    fast, reference = _pair(params, config)
    for step, (layout, make) in enumerate(_layouts(dtype, generator).items()):
        grads = make()
        grads["c"] = torch.randn(2, 3, 2, 2, generator=generator).to(dtype).contiguous(
            memory_format=torch.channels_last if step % 2 else torch.contiguous_format)
        grads["scalar"] = torch.tensor(float(step % 2), dtype=dtype)
        grads["empty"] = torch.zeros(0, 3, dtype=dtype)
        for tracker in (fast, reference):
            tracker.observe_gradients(grads, detail=step % 3 != 2)
        with torch.no_grad():
            if step == 2:
                c.data = c.data.contiguous(memory_format=torch.channels_last)
                w.data = w.data.t().contiguous().t()
                buffer = torch.zeros(40, dtype=dtype)
                buffer[3:12] = b.data
                b.data = buffer[3:12]
            if step == 5:
                c.data, w.data = c.data.contiguous(), w.data.contiguous()
            for p in (w, b, c, scalar):
                p.add_((torch.randn(p.shape, generator=generator) * 1e-2).to(dtype))
        for tracker in (fast, reference):
            tracker.observe_update()
        _assert_same_state(fast, reference, layout)
        _assert_same_measure(fast, reference, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shard_sample_starts_at_or_past_the_shard_end(dtype, monkeypatch):
    """FSDP2 shards whose first sampled element lies at or beyond their end (``sample_start >= numel``: no
    gradient sums at all) and shards sampled from inside, through the tracker: fold, measure, masks."""
    starts = {}
    monkeypatch.setattr(gradtrace.tracking.sharding, "sample_start", lambda p, stride: starts[id(p)] % stride)
    generator = torch.Generator().manual_seed(3)
    sizes, offsets = (1, 5, 13, 40, 100), (0, 3, 20, 63, 50)
    params = [(f"p{i}", nn.Parameter(torch.zeros(n, dtype=dtype))) for i, n in enumerate(sizes)]
    for (_, p), offset in zip(params, offsets, strict=True):
        starts[id(p)] = offset
    fast, reference = _pair(params, TrackerConfig(sample_stride=64), chunk_elements=16)
    assert [fast.state[name]["signed_sum"].numel() for name, _ in params] == [1, 1, 0, 0, 1]
    for step in range(4):
        grads = {}
        for name, p in params:
            grad = torch.randn(p.numel(), generator=generator)
            grad[torch.rand(p.numel(), generator=generator) < 0.5] = 0.0
            grads[name] = grad.to(dtype)
        for tracker in (fast, reference):
            tracker.observe_gradients(grads)
        _assert_same_state(fast, reference, step)
    with torch.no_grad():
        for _, p in params:
            p.add_(torch.randn(p.numel(), generator=generator).to(dtype) * (torch.rand(p.numel()) < 0.5))
    _assert_same_measure(fast, reference, "measure")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])  # the dtypes it takes
def test_the_finite_check_agrees_with_isfinite_in_any_chunk(dtype):
    """CpuScanner.finite (the split tracking's check of a span's gradient) against torch.isfinite: NaN,
    +inf and -inf in the first, a middle and the last chunk, the largest finite value, negative zero."""
    scanner = CpuScanner(chunk_elements=64)
    base = torch.randn(1000, dtype=torch.float64).to(dtype)
    base[7] = torch.finfo(dtype).max
    base[8] = -torch.finfo(dtype).max
    base[9] = -0.0
    assert scanner.finite(base) and bool(torch.isfinite(base).all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 500, 999):
            grad = base.clone()
            grad[at] = bad
            assert scanner.finite(grad) is bool(torch.isfinite(grad).all()) is False, (bad, at)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_full_bitmap_step_answers_finite_and_nonzero_exactly(dtype):
    """A full bitmap with nothing counted takes a shortcut (one sum for "finite, some nonzero"): it must give
    torch's answers where that sum misleads — finite values whose sum overflows, values that cancel to 0,
    all zeros, negative zeros — and drop a gradient with a NaN/inf wherever it sits, sums untouched."""
    finfo = torch.finfo(dtype)
    base = torch.randn(1000, dtype=torch.float64).to(dtype)
    overflow = torch.full((1000,), finfo.max, dtype=dtype)
    cancelling = torch.tensor([1.0, -1.0] * 500, dtype=dtype)
    cases = {"normal": base, "overflowing sum": overflow, "cancelling": cancelling,
             "zeros": torch.zeros(1000, dtype=dtype), "negative zeros": torch.full((1000,), -0.0, dtype=dtype)}
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 999):
            grad = base.clone()
            grad[at] = bad
            cases[f"{bad} at {at}"] = grad
    for case, grad in cases.items():
        for stride, start in ((1, 0), (64, 5)):
            samples = grad[start::stride].float()
            sums = (torch.ones(samples.numel()), torch.ones(samples.numel()))
            bits = torch.full((125,), 0xFF, dtype=torch.uint8)
            folded = CpuScanner(chunk_elements=64).fold(grad, bits, full=True, count=False, sums=sums,
                                                        stride=stride, sample_start=start)
            finite = bool(torch.isfinite(grad).all())
            assert folded.finite is finite, case
            assert folded.any_nonzero is bool((grad != 0).any()), case
            assert folded.full and folded.nonzero is None and bool((bits == 0xFF).all()), case
            if finite:
                assert torch.equal(sums[0], 1 + samples) and torch.equal(sums[1], 1 + samples.abs()), case
            else:
                assert bool((sums[0] == 1).all()) and bool((sums[1] == 1).all()), case
