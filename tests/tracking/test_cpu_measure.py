"""The CPU NumPy path of GradTracker.measure() and packed_masks() (gradtrace.tracking.kernels.numpy_measure) against the
torch path, bit for bit: edge values, tolerance boundaries and rounding ties, every mode, chunk
boundaries, a trained model; plus checks that a subtly wrong fast path would be caught."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradtrace import GradTracker, TrackerConfig
from gradtrace.tracking.kernels import numpy_measure as cpu_measure
from gradtrace.tracking.state import sampled_length

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RAW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
NP_RAW = {torch.bfloat16: (np.uint16, np.int16), torch.float16: (np.uint16, np.int16),
          torch.float32: (np.uint32, np.int32)}
INF, NAN = float("inf"), float("nan")
NAN_BITS = {torch.bfloat16: [0x7FC1, 0xFFC1, 0x7F81], torch.float16: [0x7E01, 0xFE02, 0x7C01],
            torch.float32: [0x7FC00001, 0xFFC00002, 0x7F800001]}  # payloads, negative, signalling


def from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    unsigned, signed = NP_RAW[dtype]
    return torch.from_numpy(np.array(bits, dtype=unsigned).view(signed)).view(dtype)


def bits_of(value: torch.Tensor) -> int:
    return int(value.view(RAW[value.dtype]).item()) & (0xFFFF if value.element_size() == 2 else 0xFFFFFFFF)


def f32(value: float) -> np.float32:
    return np.float32(value)


# ---------------------------------------------------------------------------------------------- data
def special_values(dtype: torch.dtype, abs_tolerance: float) -> torch.Tensor:
    """Values whose pairwise differences hit every edge: signed zeros, infinities, NaNs with different
    payloads, extremes, subnormals, the cast tolerance and its neighbours, half its ULP (so that
    ``tolerance - (-half ULP)`` is exactly the rounding tie) and that half's neighbours, and values whose
    difference is exactly ``max(|a|, |b|) / 16`` (the relative test's boundary at rel_tolerance 1/16)."""
    info = torch.finfo(dtype)
    plain = [0.0, -0.0, INF, -INF, NAN, info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal / 2,
             1.0, -1.0, 0.5, 0.9375, 1.0625, 15 / 16 - info.eps / 2, 2.0 ** -10, 3e-3]
    values = [torch.tensor(v, dtype=dtype) for v in plain]
    subnormal = from_bits([1], dtype)[0]
    values += [subnormal, -subnormal, *from_bits(NAN_BITS[dtype], dtype)]
    tol = torch.tensor(abs_tolerance, dtype=dtype)  # torch's cast, as the torch path compares
    if math.isfinite(float(tol)):
        k = bits_of(tol)
        near = from_bits(list(range(max(0, k - 2), k + 3)), dtype)
        values += [*near, *-near]
        half = half_ulp(dtype, abs_tolerance)
        if half is not None:  # differences reach the rounding tie exactly
            h = bits_of(half)
            family = from_bits([h - 1, h, h + 1], dtype)
            values += [*family, *-family]
    return torch.stack(values)


def half_ulp(dtype: torch.dtype, tolerance: float) -> torch.Tensor | None:
    """Half the spacing above the cast tolerance, where it is a value of the dtype (not in the subnormal
    range, where every difference is a whole number of spacings and no tie is reachable)."""
    cast = torch.tensor(tolerance, dtype=dtype)
    half = (float(from_bits([bits_of(cast) + 1], dtype)[0]) - float(cast)) / 2
    value = torch.tensor(half, dtype=dtype)
    return value if half > 0 and float(value) == half else None


def edge_pairs(dtype: torch.dtype, abs_tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair of :func:`special_values`: ``(reference, current)``."""
    values = special_values(dtype, abs_tolerance)
    reference = values.repeat_interleave(len(values))
    current = values.repeat(len(values))
    return reference, current


def rel_boundary_pairs(dtype: torch.dtype, rel_tolerance: float, count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 pairs whose |difference| is exactly one of the two candidate bounds max(|a|, |b|) * rel:
    torch's (the tolerance cast to float32, then a float32 product) or the double product rounded to
    float32, where the two differ: so the two rules disagree on every pair. Empty where none exist."""
    if dtype != torch.float32 or not 0 < rel_tolerance < 0.5:
        return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype)
    larger = (1 + np.random.default_rng(0).random(1 << 20)).astype(np.float32)  # [1, 2): spacing 2**-23
    single = larger * f32(rel_tolerance)
    double = (larger.astype(np.float64) * rel_tolerance).astype(np.float32)
    current, reference = [], []
    for bound in (single, double):
        smaller = larger - bound  # exact when bound is a whole number of spacings (Sterbenz)
        hit = ((larger - smaller) == bound) & (single != double)
        current += [larger[hit][:count], -larger[hit][:count]]
        reference += [smaller[hit][:count], -smaller[hit][:count]]
    return torch.from_numpy(np.concatenate(reference)), torch.from_numpy(np.concatenate(current))


def random_pairs(dtype: torch.dtype, numel: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and slightly moved copies: unchanged, below, near and above the default tolerances."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(numel, generator=generator) * 0.02
    scale = torch.tensor([0.0, 1e-6, 1e-5, 3e-5, 1e-4, 1e-3])[torch.randint(0, 6, (numel,), generator=generator)]
    current = reference + torch.randn(numel, generator=generator) * scale
    return reference.to(dtype), current.to(dtype)


def crafted_sums(numel: int, epsilon: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient sums hitting the histogram's and the cancellation test's edges: ratios 0, 1, above 1,
    exactly k / 20, inf / inf (a NaN ratio), NaN, a subnormal or zero absolute sum, |Σg| exactly ε Σ|g|."""
    generator = torch.Generator().manual_seed(seed)
    absolute = torch.rand(numel, generator=generator) * 3
    signed = (torch.rand(numel, generator=generator) * 2 - 1) * absolute
    boundary = torch.from_numpy(absolute.numpy() * f32(epsilon))  # float32 product, as torch computes it
    pick = torch.randint(0, 12, (numel,), generator=generator)
    signed = torch.where(pick == 0, boundary, signed)
    signed = torch.where(pick == 1, -boundary, signed)
    signed = torch.where(pick == 2, torch.nextafter(boundary, torch.tensor(INF)), signed)
    signed = torch.where(pick == 3, absolute, signed)
    signed = torch.where(pick == 4, absolute * 1.0000002, signed)  # a ratio just above 1
    k = torch.randint(0, 21, (numel,), generator=generator).float()
    signed = torch.where(pick == 5, k, signed)
    absolute = torch.where(pick == 5, torch.full_like(absolute, 20.0), absolute)
    special = torch.tensor([[INF, INF], [-INF, INF], [0.0, 0.0], [1e-40, 1e-40], [1.0, 1e-40], [NAN, 1.0],
                            [1.0, INF], [NAN, INF]])
    rows = torch.randint(0, len(special), (numel,), generator=generator)
    signed = torch.where(pick == 6, special[rows, 0], signed)
    absolute = torch.where(pick == 6, special[rows, 1], absolute)
    return signed, absolute


# ------------------------------------------------------------------------------------------- helpers
def build_tracker(dtype: torch.dtype, config: TrackerConfig, *, sample_start: int = 0,
                  seed: int = 0) -> GradTracker:
    """A tracker over parameters of odd sizes (edge pairs, random weights, 1, 7 and 0 elements) whose
    state is set by hand: moved weights (raw bits copied, NaN payloads kept), gradient and ever-changed
    bitmaps with random bytes (padding bits included) and crafted gradient sums."""
    reference, current = edge_pairs(dtype, config.abs_tolerance)
    boundary_ref, boundary_cur = edge_pairs(dtype, 1e-3)  # the tie of a normal tolerance, too
    random_ref, random_cur = random_pairs(dtype, 3001, seed)
    pairs = {"edge": (reference, current), "tie": (boundary_ref, boundary_cur), "random": (random_ref, random_cur),
             "one": (random_ref[:1], random_cur[:1]), "seven": (random_ref[7:14], random_cur[7:14]),
             "empty": (random_ref[:0], random_cur[:0])}
    rel_ref, rel_cur = rel_boundary_pairs(dtype, config.rel_tolerance)
    if len(rel_ref):
        pairs["rel_bound"] = (rel_ref, rel_cur)
    params = [(name, nn.Parameter(ref.clone())) for name, (ref, _) in pairs.items()]
    tracker = GradTracker(params, config)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, param in params:
        state = tracker.state[name]
        numel = param.numel()
        if config.tracks_sums and config.stride > 1:
            tracker._placements[name] = dataclasses.replace(tracker._placements[name], sample_start=sample_start)
            length = sampled_length(numel, config.stride, sample_start)
            state["signed_sum"] = torch.zeros(length)
            state["abs_sum"] = torch.zeros(length)
        with torch.no_grad():
            param.view(RAW[dtype]).copy_(pairs[name][1].view(RAW[dtype]))
        state["gradient_bits"].copy_(torch.randint(0, 256, state["gradient_bits"].shape, generator=generator,
                                                   dtype=torch.uint8))
        if config.ever_changed:
            state["ever_changed_bits"].copy_(torch.randint(0, 256, state["ever_changed_bits"].shape,
                                                           generator=generator, dtype=torch.uint8))
        if config.tracks_sums:
            signed, absolute = crafted_sums(state["signed_sum"].numel(), config.cancel_epsilon, seed + 2)
            state["signed_sum"].copy_(signed)
            state["abs_sum"].copy_(absolute)
    tracker.steps = 3
    tracker.counters += torch.arange(len(tracker.counters))
    return tracker


def measure_both(tracker: GradTracker):
    tracker.backend = "torch"
    slow, slow_masks = tracker.measure(), tracker.packed_masks()
    tracker.backend = "numpy"
    fast, fast_masks = tracker.measure(), tracker.packed_masks()
    return slow, fast, slow_masks, fast_masks


def assert_same(tracker: GradTracker) -> None:
    slow, fast, slow_masks, fast_masks = measure_both(tracker)
    for name in slow.per_param:
        assert fast.per_param[name] == slow.per_param[name], name
    assert dataclasses.asdict(fast) == dataclasses.asdict(slow)
    assert slow_masks.keys() == fast_masks.keys()
    for kind, masks in slow_masks.items():
        for name, mask in masks.items():
            assert torch.equal(fast_masks[kind][name].bits, mask.bits), (kind, name)
            assert fast_masks[kind][name].shape == mask.shape


CONFIGS = {
    "off": TrackerConfig(cancellation="off"),
    "sampled64": TrackerConfig(),
    "stride7_ever": TrackerConfig(sample_stride=7, ever_changed=True),
    "full_ever_rel16": TrackerConfig(cancellation="full", ever_changed=True, abs_tolerance=1e-3,
                                     rel_tolerance=0.0625),
    "stride64_zero_tolerances": TrackerConfig(ever_changed=True, abs_tolerance=0.0, rel_tolerance=0.0,
                                              cancel_epsilon=0.0),
    "stride7_nan_abs_big_rel": TrackerConfig(sample_stride=7, abs_tolerance=NAN, rel_tolerance=INF),
}


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("chunk_bytes", [None, 256], ids=["default_chunks", "small_chunks"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fast_measure_equals_torch_path_on_edge_values(dtype, config, chunk_bytes, monkeypatch):
    """measure() and packed_masks(): the whole Measurement and every mask equal the torch path's, with
    chunks of 64-128 elements (many boundaries, none aligned with the stride) or the default, and the
    sampled elements starting at 0 or further in (as on a shard)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(cpu_measure, "CHUNK_BYTES", chunk_bytes)
    for sample_start in (0, min(5, config.stride - 1)):
        tracker = build_tracker(dtype, config, sample_start=sample_start)
        assert_same(tracker)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_data_exercises_what_it_claims(dtype):
    """For each plausible wrong threshold, some edge pair's difference lies between it and the right one
    (so the two disagree on that pair), the 16-bit pairs reach the rounding tie exactly, the relative
    test's boundary is hit exactly, and the crafted sums give NaN, zero and above-one ratios."""
    for tolerance in (1e-5, 1e-3):
        reference, current = edge_pairs(dtype, tolerance)
        delta = (current.float() - reference.float()).abs().numpy()
        right = float(cpu_measure.abs_threshold(dtype, tolerance))
        for why, wrong in _wrong_thresholds(dtype, tolerance).items():
            low, high = sorted((right, wrong))
            assert ((delta > low) & (delta <= high)).any(), (tolerance, why)
        half = half_ulp(dtype, tolerance)
        if dtype != torch.float32 and half is not None:
            tie = float(torch.tensor(tolerance, dtype=dtype)) + float(half)
            assert (delta == tie).any()
    reference, current = edge_pairs(dtype, 1e-5)
    with np.errstate(all="ignore"):
        bound = np.maximum(np.abs(current.float().numpy()), np.abs(reference.float().numpy())) * f32(0.0625)
        assert ((current.float() - reference.float()).abs().numpy() == bound)[bound > 0].any()
    if dtype == torch.float32:
        reference, current = rel_boundary_pairs(dtype, 1e-3)
        assert len(current) >= 200
    signed, absolute = crafted_sums(2000, 0.1, 0)
    ratio = signed.abs() / absolute.clamp_min(torch.finfo(torch.float32).tiny)
    assert ratio.isnan().any() and (ratio > 1).any() and (ratio == 0).any()


def test_nan_ratio_goes_to_the_last_bin_on_both_paths():
    """Gradient sums that overflowed to inf on both sides (|Σg| / Σ|g| = inf / inf): the last bin; the
    torch path used to turn the NaN into a negative index."""
    param = nn.Parameter(torch.zeros(4))
    tracker = GradTracker([("w", param)], TrackerConfig(cancellation="full"))
    state = tracker.state["w"]
    state["gradient_bits"].fill_(0b1111)
    state["signed_sum"].copy_(torch.tensor([INF, -INF, 1.0, 0.0]))
    state["abs_sum"].copy_(torch.tensor([INF, INF, 2.0, 0.0]))
    slow, fast, _, _ = measure_both(tracker)
    assert slow.cancellation_histogram == fast.cancellation_histogram
    expected = [0] * 20
    expected[0], expected[10], expected[19] = 1, 1, 2
    assert slow.cancellation_histogram == expected


def expected_abs_threshold(dtype: torch.dtype, tolerance: float) -> float:
    """The threshold from the rounding rule, independently of torch's oracle: a float32 difference rounds
    (to nearest, ties to even) to at most the cast tolerance c exactly when it is below the midpoint
    between c and the next value up, or equal to it when c's last mantissa bit is 0."""
    if math.isnan(tolerance):
        return -INF
    cast = torch.tensor(tolerance, dtype=dtype)
    if dtype == torch.float32 or math.isinf(float(cast)):
        return float(cast)
    k = bits_of(cast)
    above = float(from_bits([k + 1], dtype)[0])
    if math.isinf(above):  # past the largest value: the next binade's first value, as rounding sees it
        above = 2.0 ** (math.frexp(torch.finfo(dtype).max)[1])
    midpoint = (float(cast) + above) / 2  # exact: a few more bits than the dtype has
    assert float(f32(midpoint)) == midpoint
    return float(midpoint) if k % 2 == 0 else float(np.nextafter(f32(midpoint), f32(0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_abs_threshold_follows_the_rounding_rule(dtype):
    info = torch.finfo(dtype)
    tolerances = [0.0, 1e-45, 1e-40, 3e-8, 1e-5, 1e-3, 0.0625, 0.1, 1.0, 1e5, 65504.0, 65519.0, 65520.0,
                  3.3e38, 3.39e38, 3.4e38, 1e39, INF, NAN, info.max, info.tiny, float(from_bits([1], dtype)[0])]
    # both parities of the cast tolerance's last mantissa bit, at several scales
    tolerances += [float(v) for v in from_bits([0x3A83, 0x3A84, 0x0001, 0x0002, 0x1234, 0x1235], dtype)]
    for tolerance in tolerances:
        got = float(cpu_measure.abs_threshold(dtype, tolerance))
        assert got == expected_abs_threshold(dtype, tolerance), (tolerance, got)


def test_torch_semantics_this_path_relies_on():
    """The facts the threshold and scalar handling rest on: bf16/fp16 subtraction is the float32
    difference rounded to the dtype, and torch multiplies float32 by a Python float cast to float32."""
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randint(-2**15, 2**15, (200_003,), generator=generator, dtype=torch.int32).to(torch.int16)
        b = a + torch.randint(-300, 300, a.shape, generator=generator, dtype=torch.int32).to(torch.int16)
        a, b = a.view(dtype), b.view(dtype)
        direct, widened = a - b, (a.float() - b.float()).to(dtype)
        assert torch.equal(direct.isnan(), widened.isnan())
        assert torch.equal(direct[~direct.isnan()].view(torch.int16), widened[~widened.isnan()].view(torch.int16))
    x = torch.rand(100_000, generator=generator) * 10
    assert np.array_equal(x.clone().mul_(1e-3).numpy(), x.numpy() * f32(1e-3))
    assert not np.array_equal(x.numpy() * f32(1e-3), (x.numpy().astype(np.float64) * 1e-3).astype(np.float32))
    assert bool(torch.tensor([float(torch.tensor(1e-5, dtype=torch.bfloat16))] * 3, dtype=torch.bfloat16)
                .le(1e-5).all())  # compared with the tolerance cast to bf16 (1.0014e-05 > 1e-5)


def _wrong_thresholds(dtype: torch.dtype, tolerance: float) -> dict[str, float]:
    right = float(cpu_measure.abs_threshold(dtype, tolerance))
    cast = float(torch.tensor(tolerance, dtype=dtype))
    wrong = {"uncast tolerance": float(f32(tolerance))}
    if dtype == torch.float32 or half_ulp(dtype, tolerance) is not None:  # else no difference needs rounding
        wrong["cast tolerance (rounding ignored)"] = cast
    if dtype == torch.float32:
        wrong["one ulp up"] = float(np.nextafter(f32(right), f32(INF)))
        wrong["one ulp down"] = float(np.nextafter(f32(right), f32(0)))
    else:
        half = half_ulp(dtype, tolerance)
        if half is not None:  # a reachable tie
            midpoint = cast + float(half)
            flipped = float(np.nextafter(f32(midpoint), f32(0))) if right == midpoint else midpoint
            wrong["tie rounded the other way"] = flipped
    return {why: value for why, value in wrong.items() if value != right}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_fast_path_would_be_caught(dtype, monkeypatch):
    """The comparison is sharp: each plausible mistake (rounding ignored, tie the wrong way, tolerance not
    cast, a float32 threshold one ULP off, the relative or cancellation scale one ULP off, NaN ratios
    binned as 0) changes the fast path's Measurement on the edge data."""
    config = TrackerConfig(cancellation="full", ever_changed=True, abs_tolerance=1e-3, rel_tolerance=0.0625)
    tracker = build_tracker(dtype, config)
    reference = tracker_measure(tracker, fast=False)
    assert tracker_measure(tracker, fast=True) == reference

    real_threshold = cpu_measure.abs_threshold
    for why, value in _wrong_thresholds(dtype, config.abs_tolerance).items():
        monkeypatch.setattr(cpu_measure, "abs_threshold", lambda d, t, value=value: f32(value))
        assert tracker_measure(tracker, fast=True) != reference, why
    monkeypatch.setattr(cpu_measure, "abs_threshold", real_threshold)

    for target in (config.rel_tolerance, config.cancel_epsilon):
        nudged = np.nextafter(f32(target), f32(0))
        monkeypatch.setattr(cpu_measure, "float32_scalar",
                            lambda v, target=target, nudged=nudged: nudged if v == target else f32(v))
        assert tracker_measure(tracker, fast=True) != reference, target
    monkeypatch.undo()

    class NoNanBin(cpu_measure.CpuMeasurer):  # NaN ratios binned as 0 instead of in the last bin
        def _sampled(self, *args):
            signed, absolute = args[2], args[3]
            with np.errstate(all="ignore"):
                signed = np.where(np.isnan(signed / absolute), 0, signed).astype(np.float32)
            return super()._sampled(*args[:2], signed, *args[3:])

    monkeypatch.setattr(cpu_measure, "CpuMeasurer", NoNanBin)
    assert tracker_measure(tracker, fast=True) != reference
    monkeypatch.undo()

    # the scalars as float64 (the double product, rounded), not cast to float32 first as torch does
    tracker = build_tracker(dtype, TrackerConfig(cancellation="full"))  # rel 1e-3, epsilon 0.1
    reference = tracker_measure(tracker, fast=False)
    assert tracker_measure(tracker, fast=True) == reference
    for target in (1e-3, 0.1) if dtype == torch.float32 else (0.1,):  # 16-bit: no pair tells at 1e-3
        monkeypatch.setattr(cpu_measure, "float32_scalar",
                            lambda v, target=target: np.float64(v) if v == target else f32(v))
        assert tracker_measure(tracker, fast=True) != reference, target


def tracker_measure(tracker: GradTracker, *, fast: bool) -> dict:
    tracker.backend = "numpy" if fast else "torch"
    return dataclasses.asdict(tracker.measure())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", [TrackerConfig(), TrackerConfig(cancellation="full", ever_changed=True),
                                    TrackerConfig(cancellation="off", sample_stride=7)],
                         ids=["sampled", "full_ever", "off"])
def test_trained_model_measures_identically(dtype, config, monkeypatch):
    """A tiny Llama trained a few AdamW steps through the tracker: identical measurements and masks, with
    the default chunks and with 64-element ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False)).to(dtype)
    tracker = GradTracker(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, eps=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 48, (2, 12), generator=generator)  # tokens 48.. never seen
        model(input_ids=tokens, labels=tokens).loss.backward()
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
    assert_same(tracker)
    counts = tracker.measure().per_param
    assert sum(row["updated"] for row in counts.values()) > 0
    monkeypatch.setattr(cpu_measure, "CHUNK_BYTES", 256)
    assert_same(tracker)


def test_other_dtypes_and_layouts_keep_the_torch_path():
    w = torch.zeros(8)
    assert cpu_measure.supports(w, w.clone())
    assert not cpu_measure.supports(w.double(), w.double())
    assert not cpu_measure.supports(w, w.to(torch.bfloat16))
    assert not cpu_measure.supports(torch.zeros(4, 4).t(), torch.zeros(4, 4))
    assert not cpu_measure.supports(w, torch.zeros(8, device="meta"))
    param = nn.Parameter(torch.randn(13, dtype=torch.float64))
    tracker = GradTracker([("w", param), ("v", nn.Parameter(torch.randn(5)))], TrackerConfig())
    with torch.no_grad():
        param.add_(1e-3)
    assert_same(tracker)
    with pytest.raises(ValueError):
        cpu_measure.CpuMeasurer(20, chunk_elements=12)
