"""The tracker's state in one process: ``state_tensors()`` is a snapshot, a restore is validated before
anything changes, a state saved before a counter existed still resumes."""

from __future__ import annotations

import pytest
import torch

from gradtrace import GradTracker, TrackerConfig
from gradtrace.tracking.state import COUNTER_INDEX
from tests.helpers.tiny_linear import linear, step


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
