"""DeepSpeed ZeRO-0/1/2/3 through a real transformers.Trainer (2 CPU processes, gloo, DeepSpeed's CPU
accelerator) against a single-process run without DeepSpeed on the same global batches.

The distributed tests need ``deepspeed`` (not a gradtrace dependency: ``pip install deepspeed``; its
CPU accelerator JIT-builds a small shared-memory op with the system C++ compiler on first use) and are
skipped without it. The detection helpers are tested everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtrace import GradTraceWarning, GradTracker, TrackerConfig, load_masks, read_run_log
from gradtrace.integrations.deepspeed import (
    attach_to_deepspeed,
    check_supported,
    find_zero_optimizer,
    is_deepspeed_object,
)
from gradtrace.integrations.failures import Failures
from gradtrace.tracking.state import COUNTER_INDEX
from tests.helpers.deepspeed_fakes import DeepSpeedOptimizerWrapper, fake_engine, fake_zero_optimizer
from tests.helpers.launching import DEEPSPEED_ENV, assert_same_masks, launch, ranks
from tests.helpers.tiny_linear import linear


@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "per_device", "accumulation", "optimizer"), [
    (2, 4, 1, "DeepSpeedZeroOptimizer"),
    (1, 2, 2, "DeepSpeedZeroOptimizer"),
    (0, 4, 1, "AdamW"),  # no ZeRO: the engine steps the Trainer's torch optimizer itself
    (3, 4, 1, "DeepSpeedZeroOptimizer_Stage3"),  # partitioned parameters: each rank tracks its partitions
], ids=["zero2", "zero1-accumulation2", "zero0", "zero3"])
def test_zero_trainer_matches_single_process(tmp_path, reference, stage, per_device, accumulation, optimizer):
    out = tmp_path / "ds"
    launch("trainer_deepspeed.py", str(out), str(stage), str(per_device), str(accumulation), processes=2,
           cwd=tmp_path, env_extra=DEEPSPEED_ENV)
    got, (want,) = ranks(out), ranks(reference, world=1)
    for record in got:
        assert record["world_size"] == 2 and record["warnings"] == []
        assert record["stage"] == stage and record["zero_optimizer"] == optimizer
        assert record["optimizer_steps"] == record["trainer_steps"] == 4
        # why the hook is needed: by the Trainer's on_pre_optimizer_step DeepSpeed has applied and freed it
        assert record["grad_was_none_at_pre_step"] == [True] * 4
        assert record["hook_removed"]
    assert want["grad_was_none_at_pre_step"] == [False] * 4 and not want["sharded"]
    # each rank keeps state for its own partition (ZeRO-3), or its share of the replicated parameters
    # (ZeRO-0/1/2: split tracking): about half of the single process's state
    assert all(record["sharded"] for record in got)
    assert sum(r["tracked_numel"] for r in got) == want["tracked_numel"]
    for where in ("device", "reference"):
        per_rank = [r["state_bytes"][where] for r in got]
        assert abs(sum(per_rank) - want["state_bytes"][where]) <= 0.01 * want["state_bytes"][where] + 256
        assert max(per_rank) <= 0.55 * want["state_bytes"][where]
    if stage in (1, 2):
        # each rank tracks the fragments of its own optimizer partition, and reads its gradient there:
        # no all-reduce per parameter (safe_get_full_grad). Per step, before DeepSpeed's own step: the
        # tracker's 2 (the step flags, the finite check of the parameters cut between partitions),
        # DeepSpeed's has_overflow (1), and, as the sums are clipped, DeepSpeed's scaled_global_norm (one
        # per parameter group: the Trainer makes 2, with and without weight decay)
        straddling = 0
        for name in got[0]["spans"]:
            held = sorted(tuple(r["spans"][name]) for r in got if r["spans"][name][1])
            assert held[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(held, held[1:], strict=False)), (name, held)
            straddling += len(held) > 1
        assert straddling >= 1  # a parameter cut between the two partitions
        for record in got:
            assert record["parameter_groups"] == 2
            assert record["collectives_per_step"] == [2 + 1 + 2] * 4 and record["tracked_parameters"] > 10
    assert_same_masks(out / "gradtrace" / "masks.safetensors", reference / "gradtrace" / "masks.safetensors")

    ds_log, single_log = read_run_log(out / "gradtrace"), read_run_log(reference / "gradtrace")
    assert [r["step"] for r in ds_log["logs"]] == [1, 2, 3, 4]
    for got_step, want_step in zip(ds_log["logs"], single_log["logs"], strict=True):
        # each step's gradient density too: a rank-local (unreduced) gradient would miss rows
        assert got_step["global"] == want_step["global"]
        assert got_step["per_matrix"] == want_step["per_matrix"]
        # the sums are of the gradient as applied (clipped with DeepSpeed's norm): equal up to rounding,
        # which may move an element across a histogram edge (unclipped sums move hundreds)
        got_counts = got_step["cancellation_histogram"]["counts"]
        want_counts = want_step["cancellation_histogram"]["counts"]
        assert sum(got_counts) == sum(want_counts)
        assert sum(abs(a - b) for a, b in zip(got_counts, want_counts, strict=True)) <= 4
    assert ds_log["info"]["world_size"] == 2
    lines = (out / "gradtrace" / "log.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in lines) == 1  # only rank 0 writes


@pytest.mark.distributed
def test_zero2_without_split_reads_full_gradients_with_an_all_reduce_each(tmp_path, reference):
    """The contrast to the ZeRO-2 case above: with ``split=False`` every rank tracks everything and reads
    each parameter's full gradient through ``safe_get_full_grad``, one all-reduce per parameter per step."""
    out = tmp_path / "ds"
    launch("trainer_deepspeed.py", str(out), "2", "4", "1", "nosplit", processes=2, cwd=tmp_path,
           env_extra=DEEPSPEED_ENV)
    got, (want,) = ranks(out), ranks(reference, world=1)
    for record in got:
        assert not record["sharded"] and record["spans"] == {}
        # one per parameter, then DeepSpeed's has_overflow and norm (2 groups), as in the split case
        assert record["collectives_per_step"] == [record["tracked_parameters"] + 1 + 2] * 4
    assert got[0]["gradient_digest"] == got[1]["gradient_digest"] == want["gradient_digest"]
    assert_same_masks(out / "gradtrace" / "masks.safetensors", reference / "gradtrace" / "masks.safetensors")


# ---------------------------------------------------------------------------------------------- no processes
def test_detection_of_deepspeed_objects():
    model = nn.Linear(3, 2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not is_deepspeed_object(plain) and not is_deepspeed_object(None)
    zero = fake_zero_optimizer(model.parameters())
    wrapped = DeepSpeedOptimizerWrapper(zero)
    assert is_deepspeed_object(zero) and is_deepspeed_object(wrapped)
    assert find_zero_optimizer(wrapped) is zero and find_zero_optimizer(zero) is zero
    assert check_supported(wrapped, model) == 2
    assert check_supported(fake_zero_optimizer(model.parameters(), stage=1)) == 1
    with pytest.raises(TypeError, match="not a DeepSpeed engine or optimizer"):
        find_zero_optimizer(plain)
    with pytest.raises(TypeError, match="not a DeepSpeed engine or optimizer"):
        check_supported(plain, model)  # something unsupported: a clear error before any state is built
    model.weight.ds_id = 0  # ZeRO-3 marks each partitioned parameter
    assert check_supported(wrapped, model) == 3


def test_hook_reads_before_the_step_and_remove_restores_it():
    pytest.importorskip("deepspeed")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    zero = fake_zero_optimizer(model.parameters())
    tracker = GradTracker(model, TrackerConfig(cancellation="off"))
    handle = attach_to_deepspeed(tracker, DeepSpeedOptimizerWrapper(zero))
    with pytest.raises(RuntimeError, match="already tracked"):
        attach_to_deepspeed(tracker, zero)
    before = model.weight.detach().clone()
    model(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).sum().backward()
    zero.step()  # as the engine calls it
    assert tracker.steps == 1 and not torch.equal(model.weight, before)
    gradient = tracker.packed_masks()["gradient"]["weight"].to_bool()
    assert gradient[:, 0].all() and not gradient[:, 1:].any()  # only input 0 was nonzero
    handle.remove()
    handle.remove()  # idempotent
    assert "step" not in vars(zero)
    zero.step()
    assert tracker.steps == 1


def test_a_failing_read_switches_off_and_the_step_still_runs():
    pytest.importorskip("deepspeed")
    model = nn.Linear(4, 3)
    zero = fake_zero_optimizer(model.parameters())
    tracker = GradTracker(model)
    failures = Failures()  # the run's policy, not strict: a failure switches tracking off
    handle = attach_to_deepspeed(tracker, zero, failures=failures)
    tracker.observe_gradients = lambda grads=None, detail=True: 1 / 0
    before = model.weight.detach().clone()
    model(torch.ones(1, 4)).sum().backward()
    with pytest.warns(GradTraceWarning, match=r"tracking in DeepSpeed's step failed \(ZeroDivisionError"):
        zero.step()
    assert failures.switched_off and not handle.active and "step" not in vars(zero)
    assert not torch.equal(model.weight, before)  # training went on


def test_trace_drives_a_deepspeed_engine_through_its_step(tmp_path):
    """``gradtrace.trace(engine, engine.optimizer, ...)``: the chooser picks the engine's step (not torch's
    step hooks), the parameters are named as in ``engine.module``, and ``finish`` removes the hook."""
    pytest.importorskip("deepspeed")
    import gradtrace
    from gradtrace.integrations.gradient_sources import DeepSpeedStep, OptimizerHooks, choose_gradient_source

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    assert isinstance(choose_gradient_source(model, torch.optim.SGD(model.parameters(), lr=0.1)), OptimizerHooks)
    zero = fake_zero_optimizer(model.parameters())
    engine = fake_engine(model, zero)
    assert isinstance(choose_gradient_source(engine, zero), DeepSpeedStep)
    with pytest.raises(ValueError, match="the engine's own"):
        gradtrace.trace(engine, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "wrong", wandb=False)
    tracer = gradtrace.trace(engine, zero, tmp_path, log_every=2, wandb=False, strict=True)
    assert "step" in vars(zero) and not zero._optimizer_step_pre_hooks  # the engine's step, not torch's hooks
    for step in range(3):
        model(torch.tensor([[1.0, 0.0, 0.0, float(step == 2)]])).sum().backward()
        zero.step()  # as the engine calls it
        zero.zero_grad()
    masks = load_masks(tracer.finish())
    assert "step" not in vars(zero) and tracer.step == 3
    assert set(masks["gradient"]) == {"weight", "bias"}  # engine.module's names
    gradient = masks["gradient"]["weight"]
    assert gradient[:, 0].all() and gradient[:, 3].all() and not gradient[:, 1:3].any()
    assert [record["step"] for record in read_run_log(tmp_path)["logs"]] == [2, 3]  # log_every, then finish


def test_the_hook_counts_density_only_when_asked():
    """The engine-step hook asks ``wants_detail`` (the callback answers: is the next step a logging step?),
    so the density pass is skipped on the other steps, as in the Trainer path."""
    pytest.importorskip("deepspeed")
    model = nn.Linear(4, 3)
    zero = fake_zero_optimizer(model.parameters())
    tracker = GradTracker(model)
    handle = attach_to_deepspeed(tracker, zero)
    asked = []
    observe = tracker.observe_gradients
    tracker.observe_gradients = lambda grads=None, detail=True: (asked.append(detail), observe(grads, detail=detail))
    for wanted in (True, False, False):
        handle.wants_detail = lambda wanted=wanted: wanted
        model(torch.ones(1, 4)).sum().backward()
        zero.step()
        zero.zero_grad()
    assert asked == [True, False, False]
    assert int(tracker.counters[COUNTER_INDEX["density_step"]]) == 1  # only the first step was counted


@pytest.mark.parametrize("attr", ["swap_optimizer", "params_in_nvme_and_cpu"])
def test_deepspeed_nvme_offload_is_refused_up_front(attr):
    model = linear()
    optimizer = fake_zero_optimizer(model.parameters())  # stands in for DeepSpeed's optimizer (no engine here)
    setattr(optimizer, attr, True)
    with pytest.raises(ValueError, match="NVMe"):
        attach_to_deepspeed(GradTracker(model), optimizer)
    assert "step" not in vars(optimizer)  # nothing was hooked
