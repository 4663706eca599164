"""Re-cutting saved tracker state for another layout (gradtrace.tracking.reshard), in one process: the
state of a real tracker cut into runs that start off byte and stride boundaries, and put back together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtrace import GradTracker, TrackerConfig
from gradtrace.formats.bitpack import unpack_bits
from gradtrace.tracking import reshard
from gradtrace.tracking.state import COUNTER_INDEX


def trained_tracker() -> GradTracker:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 11), nn.Linear(11, 5))
    tracker = GradTracker(model, TrackerConfig(sample_stride=3, ever_changed=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 7)
        x[:, 2] = 0  # a column without gradient
        model(x).pow(2).sum().backward()
        tracker.observe_gradients()
        optimizer.step()
        tracker.observe_update()
        optimizer.zero_grad()
    return tracker


def whole_part(tracker: GradTracker) -> reshard.SavedPart:
    return reshard.SavedPart(tracker.state_tensors(), tracker.layout(), False, "whole")


def test_cut_into_runs_and_back_gives_the_same_state():
    tracker = trained_tracker()
    whole = whole_part(tracker)
    name = "0.weight"  # 77 elements
    numel, stride = 77, 3
    cuts = [(0, 13), (13, 0), (13, 50), (63, 14)]  # off byte (8) and stride (3) boundaries, one empty
    parts = []
    for rank, (start, length) in enumerate(cuts):
        tensors = {f"{key}/{name}": reshard.cut([whole], name, key, numel, start, length, stride)
                   for key in tracker.state[name]}
        tensors.update(counters=whole.tensors["counters"], steps=whole.tensors["steps"])
        parts.append(reshard.SavedPart(tensors, {name: (start, length)}, True, f"rank{rank}"))
    # a run's own pieces are what it held: the gradient bits of elements 13..62, the sums of 15, 18, ...
    bits = unpack_bits(whole.tensors[f"gradient_bits/{name}"], numel)
    assert torch.equal(unpack_bits(parts[2].tensors[f"gradient_bits/{name}"], 50), bits[13:63])
    assert torch.equal(parts[2].tensors[f"signed_sum/{name}"], whole.tensors[f"signed_sum/{name}"][5:21])
    for key, value in tracker.state[name].items():
        again = reshard.cut(parts, name, key, numel, 0, numel, stride)
        assert torch.equal(again.reshape(value.shape), value), key
    assert bits.any() and not bits.all()


def test_counters_are_summed_only_where_the_saved_run_summed_them():
    tracker = trained_tracker()
    whole = whole_part(tracker)
    counters = whole.tensors["counters"]
    summed = [reshard.SavedPart(whole.tensors, whole.layout, True, f"rank{r}") for r in range(2)]
    each = [reshard.SavedPart(whole.tensors, whole.layout, False, f"rank{r}") for r in range(2)]
    total = COUNTER_INDEX["changed_elements_total"]
    steps = COUNTER_INDEX["zero_gradient_steps"]
    assert counters[total] > 0
    assert reshard.counters(summed, keep_here=True)[total] == 2 * counters[total]
    assert reshard.counters(each, keep_here=True)[total] == counters[total]
    assert reshard.counters(summed, keep_here=False)[total] == 0
    assert reshard.counters(summed, keep_here=False)[steps] == counters[steps]  # already global


def test_a_missing_run_is_refused():
    tracker = trained_tracker()
    whole = whole_part(tracker)
    half = {f"{key}/0.weight": reshard.cut([whole], "0.weight", key, 77, 0, 40, 3) for key in tracker.state["0.weight"]}
    part = reshard.SavedPart(half, {"0.weight": (0, 40)}, True, "rank0")
    with pytest.raises(ValueError, match="does not cover"):
        reshard.cut([part], "0.weight", "reference", 77, 30, 20, 3)


def test_a_tracker_loads_state_saved_by_two_ranks_as_one_process():
    tracker = trained_tracker()
    whole = whole_part(tracker)
    stride = tracker.config.stride
    parts = []
    for rank in range(2):
        tensors, layout = {}, {}
        for name, value in tracker.state.items():
            numel = value["reference"].numel()
            middle = numel // 2 + 1
            start, length = (0, middle) if rank == 0 else (middle, numel - middle)
            layout[name] = (start, length)
            for key in value:
                tensors[f"{key}/{name}"] = reshard.cut([whole], name, key, numel, start, length, stride)
        counters = whole.tensors["counters"].clone()
        if rank:  # the summed counters of a sharded run: rank 1's share is zero here, rank 0 holds them all
            for key in ("discarded_gradient_elements", "density_nonzero", "changed_elements_total",
                        "last_step_changed"):
                counters[COUNTER_INDEX[key]] = 0
        tensors.update(counters=counters, steps=whole.tensors["steps"])
        parts.append(reshard.SavedPart(tensors, layout, True, f"rank{rank}"))
    torch.manual_seed(0)
    fresh = GradTracker(nn.Sequential(nn.Linear(7, 11), nn.Linear(11, 5)), tracker.config)
    fresh.load_resharded(parts)
    assert fresh.steps == tracker.steps == 3
    for key, value in tracker.state_tensors().items():
        assert torch.equal(fresh.state_tensors()[key], value), key
    # (the fresh model holds the initial weights, so only the gradient side of the counts can agree)
    got, want = fresh.measure(), tracker.measure()
    assert {n: c["gradient"] for n, c in got.per_param.items()} == {n: c["gradient"] for n, c in want.per_param.items()}
    assert got.counters == want.counters
