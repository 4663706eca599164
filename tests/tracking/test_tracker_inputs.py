"""What the tracker accepts: its configuration checked at construction (histogram bins), float8 parameters
refused up front, float8 gradients read exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtrace import GradTracker, TrackerConfig
from tests.helpers.tiny_linear import linear, step


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
