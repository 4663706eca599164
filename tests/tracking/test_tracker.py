"""The core tracker against the simplest possible independent computation, in a plain loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import GradTracker, TrackerConfig, load_masks
from gradtrace.tracking.state import bytes_per_element
from gradtrace.tracking.summary import summarize

BF16 = torch.bfloat16


class Crafted(nn.Module):
    """Parameters whose fate is known by construction.

    - ``embed`` rows 8..15: tokens never in the data -> never a gradient;
    - ``dead``: its output is multiplied by 0 -> gradient exactly 0 every step; weight decay moves it;
    - ``unused``: never called -> ``.grad`` stays None;
    - ``seesaw[0]``: gradient +1, -1, +1, -1 ... -> cancels; SGD with lr 0.25 brings it back exactly;
    - ``stuck`` (bf16, value 1.0): constant gradient, lr far below half a bf16 ULP -> absorbed.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.dead = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.seesaw = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.stuck = nn.Parameter(torch.ones(4, dtype=BF16))

    def forward(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        hidden = self.embed(tokens)
        loss = self.proj(hidden).pow(2).mean() + (self.dead(hidden) * 0).sum()
        sign = 1.0 if step % 2 == 0 else -1.0
        loss = loss + sign * self.seesaw[0] + self.stuck.float().sum()
        return loss


def crafted_optimizer(model: Crafted) -> torch.optim.Optimizer:
    return torch.optim.SGD([
        {"params": [model.embed.weight, *model.proj.parameters(), *model.unused.parameters()], "lr": 0.05},
        {"params": list(model.dead.parameters()), "lr": 0.05, "weight_decay": 0.1},
        {"params": [model.seesaw], "lr": 0.25},
        {"params": [model.stuck], "lr": 1e-4},
    ])


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def run_crafted(steps: int, config: TrackerConfig, *, accumulation: int = 1, seed: int = 0):
    """Train the crafted model with a tracker and, independently, the reference bookkeeping."""
    torch.manual_seed(seed)
    model = Crafted()
    optimizer = crafted_optimizer(model)
    tracker = GradTracker(model, config)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_grad = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    ref_signed = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    ref_abs = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    zero_steps = 0
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for _ in range(accumulation):
            tokens = torch.randint(0, 8, (6,), generator=generator)
            (model(tokens, step) / accumulation).backward()
        any_nonzero = False
        for n, p in model.named_parameters():
            if p.grad is not None:
                ref_grad[n] |= p.grad != 0
                ref_signed[n] += p.grad.float()
                ref_abs[n] += p.grad.float().abs()
                any_nonzero |= bool((p.grad != 0).any())
        zero_steps += not any_nonzero
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
    ref_updated = {n: raw(p.detach()) != raw(initial[n]) for n, p in model.named_parameters()}
    return model, tracker, ref_grad, ref_updated, ref_signed, ref_abs, zero_steps


def test_masks_and_categories_match_reference_exactly(tmp_path):
    config = TrackerConfig(cancellation="full", cancel_epsilon=0.1)
    model, tracker, ref_grad, ref_updated, ref_signed, ref_abs, zero_steps = run_crafted(6, config)

    # The construction really produced each category (otherwise this test proves little).
    assert not ref_grad["embed.weight"][8:].any() and ref_grad["embed.weight"][:8].all()
    assert not ref_grad["dead.weight"].any() and ref_updated["dead.weight"].all()
    assert not ref_grad["unused.weight"].any() and not ref_updated["unused.weight"].any()
    assert ref_grad["seesaw"][0] and not ref_updated["seesaw"][0] and ref_signed["seesaw"][0] == 0
    assert ref_grad["stuck"].all() and not ref_updated["stuck"].any()

    # Masks, exported and re-read, equal the reference element for element.
    session = gradtrace.TraceSession(tracker, tmp_path, strict=True)
    masks = load_masks(session.finish(step=6))
    assert set(masks["gradient"]) == set(ref_grad)
    for name in ref_grad:
        assert torch.equal(masks["gradient"][name], ref_grad[name]), name
        assert torch.equal(masks["update"][name], ref_updated[name]), name
        assert masks["gradient"][name].shape == model.get_parameter(name).shape

    # Categories from the summary equal those counted directly from the reference tensors.
    counts = dict.fromkeys(("no_gradient", "changed_without_gradient", "updated", "cancelled", "absorbed"), 0)
    for name in ref_grad:
        g, u = ref_grad[name], ref_updated[name]
        cancelled_el = g & ~u & (ref_signed[name].abs() <= 0.1 * ref_abs[name])
        counts["no_gradient"] += int((~g & ~u).sum())
        counts["changed_without_gradient"] += int((~g & u).sum())
        counts["updated"] += int((g & u).sum())
        counts["cancelled"] += int(cancelled_el.sum())
        counts["absorbed"] += int((g & ~u & ~cancelled_el).sum())
    total = sum(p.numel() for p in model.parameters())
    summary = summarize(tracker.measure())
    for category, count in counts.items():
        assert summary["global"][category] == pytest.approx(count / total, abs=1e-12), category
    assert sum(summary["global"][c] for c in counts) == pytest.approx(1.0)
    assert summary["global"]["zero_gradient_steps"] == zero_steps
    assert summary["global"]["optimizer_steps"] == 6
    assert summary["per_matrix"]["stuck"]["absorbed"] == 1.0
    assert summary["per_matrix"]["seesaw"]["cancelled"] == 0.5


def test_sampled_sums_agree_with_full_on_the_sampled_elements():
    full = run_crafted(5, TrackerConfig(cancellation="full"))[1]
    sampled = run_crafted(5, TrackerConfig(cancellation="sampled", sample_stride=3))[1]
    for name in full.parameter_names:
        assert torch.equal(sampled.state[name]["signed_sum"], full.state[name]["signed_sum"][::3])
        assert torch.equal(sampled.state[name]["gradient_bits"], full.state[name]["gradient_bits"])
    s_full, s_sampled = summarize(full.measure()), summarize(sampled.measure())
    assert s_sampled["global"]["update_sparsity"] == s_full["global"]["update_sparsity"]
    # The split is estimated, but "gradient and unchanged" is exact and the split sums to it.
    g = s_sampled["global"]
    assert g["cancelled"] + g["absorbed"] == pytest.approx(s_full["global"]["gradient_unchanged"])


def test_cancellation_off_keeps_no_sums_and_leaves_split_unknown():
    tracker = run_crafted(3, TrackerConfig(cancellation="off"))[1]
    assert all("signed_sum" not in s for s in tracker.state.values())
    g = summarize(tracker.measure())["global"]
    assert g["cancelled"] is None and g["absorbed"] is None


def test_accumulation_masks_the_accumulated_gradient_not_micro_batches():
    """Two micro-batches whose gradients cancel exactly: the optimizer applies 0, so no mask bit."""
    layer = nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    tracker = GradTracker(layer)
    micro_batch_saw_nonzero = False
    for _step in range(3):
        for x in (torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 2.0]])):
            layer(x).sum().backward()
            micro_batch_saw_nonzero |= bool(layer.weight.grad[0, 0] != 0)
        tracker.observe_gradients()
        optimizer.step()
        optimizer.zero_grad()
    masks = tracker.packed_masks()["gradient"]["weight"].to_bool()
    assert micro_batch_saw_nonzero
    assert masks.tolist() == [[False, True]]
    assert tracker.steps == 3


def test_nonfinite_gradients_are_counted_and_never_poison_state():
    """A parameter's gradient holding NaN/inf is dropped for that step, whole; the rest is kept."""
    param = nn.Parameter(torch.zeros(6))
    other = nn.Parameter(torch.zeros(3))
    tracker = GradTracker([("p", param), ("other", other)], TrackerConfig(cancellation="full"))
    param.grad = torch.tensor([1.0, float("nan"), float("inf"), 0.0, -2.0, float("-inf")])
    other.grad = torch.tensor([0.0, 3.0, 0.0])
    tracker.observe_gradients()
    param.grad = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    other.grad = torch.tensor([0.0, 0.0, 0.0])
    tracker.observe_gradients()
    state = tracker.state["p"]
    assert torch.isfinite(state["signed_sum"]).all() and torch.isfinite(state["abs_sum"]).all()
    assert state["signed_sum"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    masks = tracker.packed_masks()["gradient"]
    assert masks["p"].to_bool().tolist() == [True, True, False, False, False, False]
    assert masks["other"].to_bool().tolist() == [False, True, False]
    g = summarize(tracker.measure())["global"]
    assert g["nonfinite_gradient_steps"] == 1 and g["discarded_gradient_elements"] == 6
    assert g["zero_gradient_steps"] == 0
    assert g["step_gradient_density"] == 2 / 9 and g["step_gradient_density_step"] == 2


@pytest.mark.parametrize("cpu_path", [True, False])
def test_an_all_nan_step_through_trace_is_nonfinite_not_zero(tmp_path, cpu_path):
    """A plain loop whose loss turns NaN for one step: that step counts as non-finite, not as all-zero."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=3, wandb=False, strict=True)
    if not cpu_path:
        tracer.tracker.backend = "torch"
    for step in range(3):
        loss = model(torch.randn(3, 4)).sum()
        (loss * float("nan") if step == 1 else loss).backward()
        assert step != 1 or all(torch.isnan(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    g = tracer.session.last_summary["global"]
    assert g["nonfinite_gradient_steps"] == 1 and g["zero_gradient_steps"] == 0
    assert g["discarded_gradient_elements"] == 10
    tracer.finish()


def test_density_is_counted_only_on_detailed_steps_and_zero_steps_always():
    param = nn.Parameter(torch.zeros(4))
    tracker = GradTracker([("p", param)])
    param.grad = torch.tensor([1.0, 0.0, 0.0, 0.0])
    tracker.observe_gradients(detail=True)
    param.grad = torch.zeros(4)
    tracker.observe_gradients(detail=False)
    g = summarize(tracker.measure())["global"]
    assert g["step_gradient_density"] == 0.25 and g["step_gradient_density_step"] == 1
    assert g["zero_gradient_steps"] == 1 and g["optimizer_steps"] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ever_changed_detector_against_exact_copies(dtype):
    """The per-step detector equals comparing full copies of the weights after every step, bit for bit."""
    torch.manual_seed(1)
    model = nn.Linear(64, 64).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    tracker = GradTracker(model, TrackerConfig(ever_changed=True))
    previous = {n: p.detach().clone() for n, p in model.named_parameters()}
    ever = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    changed_total = 0
    for step in range(8):
        x = torch.randn(4, 64, dtype=dtype)
        sign = 1 if step < 4 else -1  # push the weights back the other way: some return to their start
        (sign * model(x).float().sum()).backward()
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
        for n, p in model.named_parameters():
            changed = raw(p.detach()) != raw(previous[n])
            ever[n] |= changed
            changed_total += int(changed.sum())
            previous[n] = p.detach().clone()
    masks = tracker.packed_masks()
    for n in ever:
        detected = masks["ever_changed"][n].to_bool()
        assert torch.equal(detected, ever[n]), n
        assert int(ever[n].sum()) > 0.5 * ever[n].numel()  # the run really moved most weights
    summary = summarize(tracker.measure())
    numel = sum(p.numel() for p in model.parameters())
    detected_total = summary["global"]["mean_step_changed_fraction"] * numel * 8
    assert round(detected_total) == changed_total


@pytest.mark.parametrize("dtype, start, end", [
    (torch.bfloat16, 1.0, 0.2520),  # the two bytes' XOR of 1.0 and of 0.2520 are equal
    (torch.float32, 1.0, 0.50001),  # so are the two 16-bit halves' XOR of these float32s
    (torch.float32, 0.0, -0.0),  # only the sign bit
])
@pytest.mark.parametrize("cpu_path", [True, False])
def test_ever_changed_sees_changes_a_byte_signature_would_miss(dtype, start, end, cpu_path):
    param = nn.Parameter(torch.full((3,), start, dtype=dtype))
    tracker = GradTracker([("p", param)], TrackerConfig(ever_changed=True))
    if not cpu_path:
        tracker.backend = "torch"
    with torch.no_grad():
        param[1] = end
    tracker.observe_update()
    assert tracker.packed_masks()["ever_changed"]["p"].to_bool().tolist() == [False, True, False]
    assert int(tracker.counters[gradtrace.tracking.state.COUNTER_INDEX["last_step_changed"]]) == 1


@pytest.mark.parametrize("cpu_path", [True, False])
def test_ever_changed_after_one_adam_step_equals_the_update_mask(cpu_path):
    """One step from the start: "changed at some step" is exactly "differs from the start" (the 1-byte
    signature of earlier versions missed 436 of 262,144 changed elements of this 512 x 512 bf16 matrix)."""
    torch.manual_seed(0)
    layer = nn.Linear(512, 512, bias=False).to(torch.bfloat16)
    tracker = GradTracker(layer, TrackerConfig(ever_changed=True))
    if not cpu_path:
        tracker.backend = "torch"
    start = layer.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(8, 512, dtype=torch.bfloat16)).float().square().sum().backward()
    tracker.observe_gradients()
    optimizer.step()
    tracker.observe_update()
    masks = tracker.packed_masks()
    changed = raw(layer.weight.detach()) != raw(start)
    assert int(changed.sum()) > 200_000
    assert torch.equal(masks["ever_changed"]["weight"].to_bool(), changed)
    assert torch.equal(masks["update"]["weight"].to_bool(), changed)


def test_state_saved_with_the_old_signature_detector_still_resumes():
    """A state saved by a gradtrace with the 1-byte ``last_lowbits`` signature loads: the exact detector
    continues from the parameter's current values (after a resume, the checkpoint's)."""
    param = nn.Parameter(torch.arange(8, dtype=torch.bfloat16))
    tracker = GradTracker([("p", param)], TrackerConfig(ever_changed=True))
    saved = tracker.state_tensors()
    saved["last_lowbits/p"] = torch.zeros(8, dtype=torch.uint8)
    del saved["last_values/p"]
    with torch.no_grad():
        param[2] = 100.0  # the checkpoint's value
    fresh = GradTracker([("p", param)], TrackerConfig(ever_changed=True))
    fresh.load_state_tensors(saved)
    assert torch.equal(fresh.state["p"]["last_values"], param.detach())
    with torch.no_grad():
        param[5] = -1.0
    fresh.observe_update()
    assert fresh.packed_masks()["ever_changed"]["p"].to_bool().nonzero().flatten().tolist() == [5]


def test_tolerance_columns_follow_their_definitions():
    param = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 100.0, 0.0]))
    tracker = GradTracker([("p", param)])
    with torch.no_grad():
        param.copy_(torch.tensor([1.0 + 2e-6, 1.0 + 2e-5, 1.002, 100.05, 0.0]))
    masks = tracker.packed_masks()
    assert masks["update"]["p"].to_bool().tolist() == [True, True, True, True, False]
    assert masks["update_abs_1e-05"]["p"].to_bool().tolist() == [False, True, True, True, False]
    # |Δ| <= 1e-3 * max(|w|, |ŵ|): 1.002 moved by 2e-3 > 1.002e-3; 100.05 moved by 0.05 <= 0.10005
    assert masks["update_rel_0.001"]["p"].to_bool().tolist() == [False, False, True, False, False]


def test_state_round_trip_and_refusal_of_another_model(tmp_path):
    _, tracker, *_ = run_crafted(4, TrackerConfig(cancellation="full", ever_changed=True))
    fresh = GradTracker(Crafted(), TrackerConfig(cancellation="full", ever_changed=True))
    fresh.load_state_tensors(tracker.state_tensors())
    assert fresh.steps == 4
    for name in tracker.parameter_names:
        for key, value in tracker.state[name].items():
            assert torch.equal(fresh.state[name][key], value), (name, key)
    other = GradTracker(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="another model|no 'gradient_bits'"):
        other.load_state_tensors(tracker.state_tensors())


def test_plain_loop_trace_logs_and_exports(tmp_path):
    torch.manual_seed(0)
    model = Crafted()
    optimizer = crafted_optimizer(model)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=2, wandb=False, strict=True,
                             max_grad_norm=1.0)
    for step in range(5):
        model(torch.tensor([1, 2, 3]), step).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    path = tracer.finish()
    log = gradtrace.read_run_log(tmp_path)
    assert [r["step"] for r in log["logs"]] == [2, 4, 5]
    assert log["info"]["max_grad_norm"] == 1.0
    assert log["info"]["optimizer"]["param_groups"][1]["weight_decay"] == 0.1
    assert log["info"]["parameters"]["elements_by_dtype"] == {"float32": 16 * 8 + 3 * 72 + 2, "bfloat16": 4}
    masks = load_masks(path)
    assert masks.step == 5 and not masks["gradient"]["embed.weight"][4:].any()
    assert masks["gradient"]["embed.weight"][1:4].all()


def test_state_bytes_per_mode_match_documentation():
    big = nn.Linear(1024, 1024, bias=False)
    n = big.weight.numel()
    for config, expected in [
        (TrackerConfig(cancellation="off"), 0.125),
        (TrackerConfig(cancellation="sampled", sample_stride=64), 0.125 + 8 / 64),
        (TrackerConfig(cancellation="full"), 0.125 + 8),
        (TrackerConfig(cancellation="off", ever_changed=True), 0.125 + 0.125 + 4),
    ]:
        tracker = GradTracker(big, config)
        measured = tracker.state_bytes()
        counters = tracker.counters.numel() * tracker.counters.element_size()
        assert math.isclose((measured["device"] - counters) / n, expected), config
        assert measured["reference"] == 4 * n
        # the state table's declared cost (tracking.state.bytes_per_element) is what is allocated
        assert math.isclose(bytes_per_element(config, torch.float32), expected), config
        assert bytes_per_element(config, torch.float32, placement="reference") == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_bit_level_gradient_scan_equals_the_float_definition(dtype):
    """The raw-bits scan gives exactly (g != 0), any(g != 0) and all(finite)."""
    from gradtrace.tracking.kernels.torch_path import scan_gradient as _scan_gradient

    finfo = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), finfo.max,
                         -finfo.max, finfo.tiny, finfo.smallest_normal / 4, -finfo.tiny / 8], dtype=torch.float64)
    values = torch.cat([edge, torch.randn(5000, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (5000,))])
    for grad in (values.to(dtype), values[torch.isfinite(values)].to(dtype), torch.zeros(7, dtype=dtype),
                 -torch.zeros(7, dtype=dtype), torch.tensor([0.0, float("nan")], dtype=dtype)):
        nonzero, any_nonzero, all_finite = _scan_gradient(grad)
        finite = torch.isfinite(grad)
        assert torch.equal(nonzero, grad != 0)
        assert bool(any_nonzero) == bool((grad != 0).any())
        assert bool(all_finite) == bool(finite.all())


def test_explicit_gradients_equal_reading_dot_grad():
    """Engines that keep gradients outside ``.grad`` (DeepSpeed) hand them over by name."""
    from_grad = run_crafted(4, TrackerConfig(cancellation="full"))[1]
    torch.manual_seed(0)
    model = Crafted()
    optimizer = crafted_optimizer(model)
    explicit = GradTracker(model, TrackerConfig(cancellation="full"))
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        model(torch.randint(0, 8, (6,), generator=generator), step).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.zero_grad()  # .grad is gone, as inside DeepSpeed; only the mapping has it
        explicit.observe_gradients(grads)
        for name, p in model.named_parameters():
            p.grad = grads.get(name)
        optimizer.step()
        optimizer.zero_grad()
    for name in from_grad.parameter_names:
        for key in ("gradient_bits", "signed_sum", "abs_sum"):
            assert torch.equal(explicit.state[name][key], from_grad.state[name][key]), (name, key)


def _edge_gradients(dtype: torch.dtype, sizes: tuple[int, ...], steps: int, seed: int = 0):
    """Per step, one gradient per size: zeros, signed zeros, subnormals, huge values, and now and then a
    NaN/inf (the tracker drops such a gradient whole), one all-zero step, and fills that make a bitmap full."""
    generator = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, finfo.tiny, -finfo.tiny / 4, finfo.max, -finfo.max, 1e-30, 7.0],
                        dtype=torch.float64)
    for step in range(steps):
        grads = []
        for i, numel in enumerate(sizes):
            values = torch.randn(numel, generator=generator, dtype=torch.float64)
            values *= 10.0 ** torch.randint(-6, 4, (numel,), generator=generator)
            values[torch.rand(numel, generator=generator) < 0.6] = 0.0
            values[:len(edge)] = edge[:numel]
            if step % 3 == 1:
                values = values.abs() + 1.0  # every element nonzero: the bitmap becomes full ...
            if step < 2:
                values[-1 if i % 2 == 0 else 0] = 0.0  # ... but for its last (or first) bit, the first time
            if step == 2:
                values.zero_()
            if step == 3 and i % 2 == 0:  # a NaN or inf somewhere: the whole gradient is dropped
                values[(7 * i + 3) % numel] = (float("nan"), float("inf"), float("-inf"))[i % 3]
            if step == 3 and i == 1:
                values[-1] = -float("nan")
            grads.append(values.to(dtype))
        yield grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("config", [TrackerConfig(cancellation="off"), TrackerConfig(sample_stride=7),
                                    TrackerConfig(sample_stride=64), TrackerConfig(cancellation="full")],
                         ids=["off", "stride7", "stride64", "full"])
def test_cpu_fast_path_equals_the_torch_path(dtype, config):
    """The NumPy chunked CPU path leaves exactly the state and counters the device-agnostic torch path does:
    odd sizes, chunk boundaries (a 40-element chunk: not a multiple of the stride), full bitmaps, NaN/inf."""
    from gradtrace.tracking.kernels import Backend

    sizes = (1, 9, 13, 40, 1001, 2049)
    params = [(f"p{i}", nn.Parameter(torch.zeros(n, dtype=dtype))) for i, n in enumerate(sizes)]
    fast, reference = GradTracker(params, config), GradTracker(params, config)
    fast.backend = Backend("numpy", chunk_elements=40)
    reference.backend = "torch"
    for step, grads in enumerate(_edge_gradients(dtype, sizes, steps=7)):
        named = {name: g for (name, _), g in zip(params, grads, strict=True)}
        if step == 5:
            named["p3"] = None  # no gradient at all for one parameter
        for tracker in (fast, reference):
            tracker.observe_gradients(named, detail=step not in (4, 6))  # 6: full bitmaps, nothing counted
        for name, _ in params:
            for key, value in reference.state[name].items():
                assert torch.equal(fast.state[name][key].view(torch.uint8), value.view(torch.uint8)), (step, name, key)
        assert torch.equal(fast.counters, reference.counters), step
    assert fast.counters[gradtrace.tracking.state.COUNTER_INDEX["nonfinite_gradient_steps"]] == 1
    assert fast.counters[gradtrace.tracking.state.COUNTER_INDEX["zero_gradient_steps"]] == 1
    for name, numel in zip([n for n, _ in params], sizes, strict=True):  # the "full" cache matches the bits
        full = bool(torch.equal(gradtrace.formats.bitpack.unpack_bits(fast.state[name]["gradient_bits"], numel),
                                torch.ones(numel, dtype=torch.bool)))
        assert (name in fast._full_bitmaps) == (full and dtype != torch.float64), name  # float64: torch path
    assert fast._full_bitmaps or dtype == torch.float64  # the skip was exercised


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_fold_samples_from_any_start(dtype):
    """Sampled sums start at a shard's offset (``sample_start``), chunk by chunk, as the torch slice does."""
    from gradtrace.tracking.kernels.numpy_scan import CpuScanner

    grad = (torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    for start, stride, chunk in [(0, 64, 40), (5, 7, 40), (63, 64, 128), (999, 3, 8), (1200, 64, 40)]:
        expected = grad[start::stride].float()
        sums = (torch.zeros(expected.numel()), torch.zeros(expected.numel()))
        bits = torch.zeros(125, dtype=torch.uint8)
        folded = CpuScanner(chunk_elements=chunk).fold(grad, bits, full=False, count=True, sums=sums,
                                                       stride=stride, sample_start=start)
        assert torch.equal(sums[0], expected) and torch.equal(sums[1], expected.abs()), (start, stride)
        assert torch.equal(bits, gradtrace.formats.bitpack.pack_bits(grad != 0))
        assert folded.nonzero == int((grad != 0).sum()) and folded.finite and folded.any_nonzero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cpu_change_detector_equals_the_torch_path(dtype):
    """``ever_changed`` mode: the NumPy path leaves the same signatures, bits and counts as the torch path,
    for one-ULP steps, sign flips across zero and untouched elements, across 40-element chunk boundaries."""
    from gradtrace.tracking.kernels import Backend

    generator = torch.Generator().manual_seed(3)
    sizes = (1, 13, 40, 1001)
    params = [(f"p{i}", nn.Parameter(torch.randn(n, generator=generator).to(dtype))) for i, n in enumerate(sizes)]
    config = TrackerConfig(cancellation="off", ever_changed=True)
    fast, reference = GradTracker(params, config), GradTracker(params, config)
    fast.backend = Backend("numpy", chunk_elements=40)
    reference.backend = "torch"
    for step in range(5):
        with torch.no_grad():
            for _, p in params:
                bits = raw(p.data) if dtype != torch.float64 else p.data.view(torch.int64)
                touched = torch.rand(p.numel(), generator=generator) < 0.2 * (step + 1)
                bits[touched] += 1  # one unit in the last place
                if step == 2:
                    p.data[:1] = -p.data[:1]  # a sign flip
        for tracker in (fast, reference):
            tracker.observe_update()
        for name, _ in params:
            for key in ("last_values", "ever_changed_bits"):
                assert torch.equal(fast.state[name][key], reference.state[name][key]), (step, name, key)
        assert torch.equal(fast.counters, reference.counters), step
    assert 0 < int(fast.counters[gradtrace.tracking.state.COUNTER_INDEX["changed_elements_total"]]) < 5 * sum(sizes)


def test_backend_is_a_public_choice_and_a_wrong_one_is_named():
    """``backend=`` picks the kernels; an unknown name is refused naming the choices, before anything runs."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'torch', 'numpy', not 'gpu'"):
        GradTracker(model, backend="gpu")
    tracker = GradTracker(model, backend="torch")
    assert tracker.backend == "torch"
    tracker.backend = "numpy"
    assert tracker.backend == "numpy"
    with pytest.raises(ValueError, match="backend must be"):
        tracker.backend = "cuda"
    assert tracker.backend == "numpy"
