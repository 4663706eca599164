"""Bit-exactness of the tracker's torch path on a CUDA device (fp32, bf16, fp16), against an independent
computation with plain torch ops on the same device. The same checks run on the CPU, through the NumPy
path (``cpu``) and through the torch path that CUDA takes (``cpu-torch``: the CPU fast paths switched off,
as in ``tests/tracking/test_cpu_paths_edge_cases.py``), so the test itself is exercised on every machine.

Without CUDA the ``cuda`` cases skip (``torch.cuda.is_available()`` is False). ``benchmarks/gpu_check.sh``
runs this file on a GPU machine.

The reference works on values, the tracker on raw bits: a gradient mask is the OR over the steps whose
gradient was finite of ``grad != 0`` (so -0.0 sets no bit, a subnormal does); the sums are the fp32
sums of those gradients in step order; the bitwise update mask compares the integer views of the final
and initial values; ``ever_changed`` is the OR over steps of "the bits changed at this step".
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtrace import GradTracker, TrackerConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = [
    "cpu",
    "cpu-torch",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: torch.cuda.is_available() is False")),
]
SHAPES = {"matrix": (37, 19), "vector": (130,), "cube": (5, 7, 3), "dropped": (11, 4), "blown": (9,)}
INT_VIEW = {4: torch.int32, 2: torch.int16}


def tracker_on(case: str, model, config: TrackerConfig) -> GradTracker:
    tracker = GradTracker(model, config)
    if case == "cpu-torch":
        tracker.backend = "torch"
    return tracker


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT_VIEW[tensor.element_size()])


def gradient(shape, dtype, device, generator) -> torch.Tensor:
    """Half zeros (some of them -0.0), the rest normal values, a few subnormals of ``dtype``."""
    values = torch.randn(shape, generator=generator, device=device)
    keep = torch.rand(shape, generator=generator, device=device) < 0.5
    grad = torch.where(keep, values, torch.zeros_like(values)).to(dtype)
    flat = grad.view(-1)
    flat[::7] = -0.0  # a negative zero is no gradient
    flat[3::11] = torch.finfo(dtype).smallest_normal / 4  # subnormal: nonzero
    return grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
def test_masks_sums_and_counts_equal_an_independent_computation(device, dtype):
    case, device = device, device.removesuffix("-torch")
    generator = torch.Generator(device=device).manual_seed(0)
    params = {name: nn.Parameter(torch.randn(shape, generator=generator, device=device).to(dtype))
              for name, shape in SHAPES.items()}
    initial = {name: p.detach().clone() for name, p in params.items()}
    tracker = tracker_on(case, list(params.items()), TrackerConfig(cancellation="full", ever_changed=True))
    want_mask = {name: torch.zeros(shape, dtype=torch.bool, device=device) for name, shape in SHAPES.items()}
    want_signed = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in SHAPES.items()}
    want_abs = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in SHAPES.items()}
    want_changed = {name: torch.zeros(shape, dtype=torch.bool, device=device) for name, shape in SHAPES.items()}
    discarded = 0
    for step in range(4):
        for p in params.values():
            p.grad = gradient(p.shape, dtype, device, generator)
        if step == 1:
            params["dropped"].grad[2, 1] = float("nan")
        if step == 2:
            params["blown"].grad[4] = float("inf")
        tracker.observe_gradients()
        with torch.no_grad():
            for name, p in params.items():
                grad = p.grad
                if not torch.isfinite(grad).all():  # the whole parameter's gradient is dropped for the step
                    discarded += grad.numel()
                    continue
                want_mask[name] |= grad != 0
                want_signed[name] += grad.float()
                want_abs[name] += grad.float().abs()
                before = p.detach().clone()
                p.sub_(0.01 * grad.sign())  # elements without a gradient stay unchanged
                want_changed[name] |= bits(p.detach()) != bits(before)
        tracker.observe_update()

    masks = tracker.packed_masks()
    measured = tracker.measure()
    for name, p in params.items():
        assert torch.equal(masks["gradient"][name].to_bool(), want_mask[name].cpu()), name
        updated = bits(p.detach()) != bits(initial[name])
        assert torch.equal(masks["update"][name].to_bool(), updated.cpu()), name
        assert torch.equal(masks["ever_changed"][name].to_bool(), want_changed[name].cpu()), name
        state = tracker.state[name]
        assert torch.equal(state["signed_sum"].reshape(SHAPES[name]), want_signed[name]), name
        assert torch.equal(state["abs_sum"].reshape(SHAPES[name]), want_abs[name]), name
        counts = measured.per_param[name]
        assert counts["numel"] == p.numel()
        assert counts["gradient"] == int(want_mask[name].sum())
        assert counts["updated"] == int(updated.sum())
        assert counts["gradient_and_updated"] == int((want_mask[name] & updated).sum())
        assert counts["ever_changed"] == int(want_changed[name].sum())
        assert 0 < counts["gradient"] < counts["numel"]
    assert measured.counters["nonfinite_gradient_steps"] == 2
    assert measured.counters["discarded_gradient_elements"] == discarded == 11 * 4 + 9


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
def test_a_real_backward_matches_the_gradients_it_produced(device, dtype):
    """A tiny Llama's own gradients (embedding rows of unused tokens get none): the masks are the OR of
    ``grad != 0`` read in the loop, the counts of the step's density too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    case, device = device, device.removesuffix("-torch")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).to(device=device, dtype=dtype)
    tracker = tracker_on(case, model, TrackerConfig(cancellation="sampled", sample_stride=5))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    want = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    generator = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 10), generator=generator).to(device)  # rows >= 64 never appear
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            want[name] |= p.grad != 0
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
    masks = tracker.packed_masks()["gradient"]
    for name, mask in want.items():
        assert torch.equal(masks[name].to_bool(), mask.cpu()), name
    embedding = masks["model.embed_tokens.weight"].to_bool()
    assert embedding[:64].any() and not embedding[64:].any()
