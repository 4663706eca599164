"""DeepSpeed in bf16 and fp16: a step DeepSpeed skips for an overflow sets no mask bit, adds no sum, and is
counted (``skipped_overflow_steps``), under ZeRO stages 0-3 (2 CPU processes, gloo, DeepSpeed's CPU
accelerator; ``tests/engines/workers/engine_precision.py``).

The reference is recorded in the same engine loop from DeepSpeed's public API, not through gradtrace:
each step's gradient (``safe_get_full_grad``, between ``engine.backward`` and ``engine.step``), whether
DeepSpeed skipped the step (``engine.skipped_steps``) and the loss scale it divided by. The masks must be
the OR of ``grad != 0`` over the steps DeepSpeed applied, the sums the sum of ``grad / scale`` over them.
One more run goes through ``transformers.Trainer`` (ZeRO-2, bf16; ``tests/engines/workers/trainer_deepspeed.py``)
to check the count in the run log and ``summary.json``.

fp16: DeepSpeed's CPU accelerator supports fp16 only with mkldnn fp16 kernels; where it has none,
``deepspeed.initialize`` raises ``ValueError: Type fp16 is not supported on your device.``. The fp16 runs
then override that one capability check (``force-fp16``), so that DeepSpeed's loss scaler and overflow
skip run for real on torch's CPU half kernels; the native variant is skipped with that reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradtrace import GradTraceWarning, GradTracker, TrackerConfig
from gradtrace.integrations.deepspeed import attach_to_deepspeed
from gradtrace.tracking.state import COUNTER_INDEX
from tests.helpers.deepspeed_fakes import fake_zero_optimizer
from tests.helpers.launching import DEEPSPEED_ENV, launch

OVERFLOW_STEP, USED = 3, 40  # as in tests/engines/workers/engine_precision.py
OPTIMIZERS = {0: {"bf16": "FP16_UnfusedOptimizer", "fp16": "FP16_UnfusedOptimizer"},
              1: {"bf16": "DeepSpeedZeroOptimizer", "fp16": "DeepSpeedZeroOptimizer"},
              2: {"bf16": "DeepSpeedZeroOptimizer", "fp16": "DeepSpeedZeroOptimizer"},
              3: {"bf16": "DeepSpeedZeroOptimizer_Stage3", "fp16": "DeepSpeedZeroOptimizer_Stage3"}}
FP16_REFUSED = ("DeepSpeed's CPU accelerator refuses fp16 on this CPU (no mkldnn fp16 kernels: "
                "torch.ops.mkldnn._is_mkldnn_fp16_supported() is False): deepspeed.initialize raises "
                "ValueError('Type fp16 is not supported on your device.'); the force-fp16 variant runs the same "
                "loop with that capability check overridden")


def cpu_fp16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())  # what DeepSpeed's CPU accelerator asks
    except Exception:
        return False


def run(tmp_path, stage: int, dtype: str, *extra: str) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    launch("engine_precision.py", str(out), str(stage), dtype, *extra, processes=2, cwd=tmp_path,
           env_extra=DEEPSPEED_ENV)
    return torch.load(out / "result.pt", weights_only=False)


def applied(result: dict) -> list[dict]:
    return [step for step in result["reference"] if not step["skipped"]]


def check_against_reference(result: dict, stage: int, dtype: str) -> None:
    assert result["stage"] == stage and result["optimizer"] == OPTIMIZERS[stage][dtype]
    # every element's state is kept by exactly one rank (split tracking at stages 0-2, partitions at 3)
    for name in result["names"]:
        covered = torch.zeros(math.prod(result["shapes"][name]), dtype=torch.int64)
        for part in result["signed_sums"]:
            start, length = part["layout"].get(name, (0, 0))
            covered[start:start + length] += 1
        assert covered.eq(1).all(), name
    # DeepSpeed itself skipped exactly the forced step
    assert [step["skipped"] for step in result["reference"]] == [s == OVERFLOW_STEP for s in range(1, 7)]
    assert result["skipped_steps"] == 1
    overall = result["summary"]["global"]
    assert overall["optimizer_steps"] == result["steps"] == 6
    assert overall["skipped_overflow_steps"] == 1
    assert overall["nonfinite_gradient_steps"] == 0 and overall["discarded_gradient_elements"] == 0
    masks = result["masks"]["gradient"]
    assert set(masks) == set(result["names"])
    for name in result["names"]:
        shape = result["shapes"][name]
        want = torch.zeros(shape, dtype=torch.bool)
        want_sum = torch.zeros(shape, dtype=torch.float64)
        for step in applied(result):
            grad = step["grads"][name]
            assert grad is not None and torch.isfinite(grad).all(), name  # a skipped step was the only overflow
            want |= grad.reshape(shape).ne(0)
            want_sum += grad.reshape(shape).double() / step["scale"]
        assert torch.equal(masks[name], want), name
        got_sum = torch.zeros(want_sum.numel(), dtype=torch.float64)
        for part in result["signed_sums"]:
            start, length = part["layout"].get(name, (0, 0))
            if length:
                got_sum[start:start + length] = part["sums"][name].reshape(-1)[:length].double()
        torch.testing.assert_close(got_sum.double(), want_sum.reshape(-1), rtol=1e-5, atol=1e-9)
    # the overflow step's tokens: their rows had a finite gradient only in the skipped step
    assert masks["embed.weight"][:USED].any() and not masks["embed.weight"][USED:].any()
    assert not masks["gate"].any()  # its only nonzero gradient was the inf of the skipped step


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=lambda s: f"zero{s}")
def test_bf16_overflow_step_sets_no_bit_and_is_counted(tmp_path, stage):
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_bf16_supported():
        pytest.skip("DeepSpeed's accelerator here reports no bf16 support")
    result = run(tmp_path, stage, "bf16")
    check_against_reference(result, stage, "bf16")
    assert {step["scale"] for step in result["reference"]} == {1.0}  # bf16: no loss scaling


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=lambda s: f"zero{s}")
def test_fp16_loss_scaler_overflow_and_unscaled_sums(tmp_path, stage):
    result = run(tmp_path, stage, "fp16", *(() if cpu_fp16_supported() else ("force-fp16",)))
    check_against_reference(result, stage, "fp16")
    scales = [step["scale"] for step in result["reference"]]
    assert scales[OVERFLOW_STEP - 1] < scales[OVERFLOW_STEP - 2]  # the scaler halved at the overflow
    # and grew again at a window boundary: DeepSpeed divides that step's gradient by the grown scale
    # (updated before unscaling), which the sums must follow
    assert any(later > earlier for earlier, later in zip(scales[OVERFLOW_STEP - 1:-1], scales[OVERFLOW_STEP:],
                                                         strict=True))


@pytest.mark.distributed
def test_fp16_without_override(tmp_path):
    """fp16 exactly as a user would run it on this machine's CPU accelerator."""
    if not cpu_fp16_supported():
        pytest.skip(FP16_REFUSED)
    check_against_reference(run(tmp_path, 2, "fp16"), 2, "fp16")


@pytest.mark.distributed
def test_trainer_bf16_overflow_is_counted_in_the_run_log(tmp_path):
    """Through transformers.Trainer (ZeRO-2, bf16, 2 processes): a loss of inf at step 3 makes DeepSpeed skip
    it; the run log shows the skip at that step and after, that step's density as 0, and no warning."""
    pytest.importorskip("deepspeed")
    import json

    from gradtrace import read_run_log

    out = tmp_path / "ds"
    launch("trainer_deepspeed.py", str(out), "2", "4", "1", "bf16-overflow", processes=2, cwd=tmp_path,
           env_extra=DEEPSPEED_ENV)
    for rank in (0, 1):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["deepspeed_skipped_steps"] == 1 and record["optimizer_steps"] == record["trainer_steps"] == 4
        assert record["warnings"] == []  # the skip was foreseen, not found out afterwards
    log = read_run_log(out / "gradtrace")
    steps = [entry["global"] for entry in log["logs"]]
    assert [g["optimizer_steps"] for g in steps] == [1, 2, 3, 4]
    assert [g["skipped_overflow_steps"] for g in steps] == [0, 0, 1, 1]
    assert [g["nonfinite_gradient_steps"] for g in steps] == [0, 0, 0, 0]  # not read at all: skipped whole
    density = [g["step_gradient_density"] for g in steps]
    assert density[2] == 0.0 and all(d > 0 for i, d in enumerate(density) if i != 2)
    summary = json.loads((out / "gradtrace" / "summary.json").read_text())
    assert summary["global"]["skipped_overflow_steps"] == 1


# ---------------------------------------------------------------------------------------------- no processes
def test_a_skip_not_foreseen_is_counted_and_warned_once():
    """An optimizer whose overflow checks gradtrace does not mirror (no ``has_overflow``): DeepSpeed's
    ``overflow`` flag after the step still counts the skip, with one warning that its bits were kept."""
    pytest.importorskip("deepspeed")
    model = nn.Linear(4, 3)
    zero = fake_zero_optimizer(model.parameters())
    real_step = zero.step

    def step_that_overflows():
        zero.overflow = True  # as DeepSpeed's ZeRO optimizers report a skipped step; nothing applied
    tracker = GradTracker(model, TrackerConfig(cancellation="off"))
    attach_to_deepspeed(tracker, zero)
    hooked = zero.step
    with pytest.warns(GradTraceWarning, match="did not foresee") as caught:
        for overflow in (False, True, True):
            handle = hooked.__self__
            handle._original_step = step_that_overflows if overflow else real_step
            zero.overflow = False
            model(torch.ones(1, 4)).sum().backward()
            zero.step()
            zero.zero_grad()
    assert sum("did not foresee" in str(w.message) for w in caught) == 1
    assert tracker.steps == 3 and int(tracker.counters[COUNTER_INDEX["skipped_overflow_steps"]]) == 2


def test_skip_step_counts_without_touching_masks():
    model = nn.Linear(3, 2)
    tracker = GradTracker(model)
    model(torch.ones(1, 3)).sum().backward()
    tracker.observe_gradients()
    before = {name: mask.to_bool().clone() for name, mask in tracker.packed_masks()["gradient"].items()}
    sums = {name: state["signed_sum"].clone() for name, state in tracker.state.items()}
    tracker.skip_step()
    assert tracker.steps == 2
    for name, mask in tracker.packed_masks()["gradient"].items():
        assert torch.equal(mask.to_bool(), before[name])
        assert torch.equal(tracker.state[name]["signed_sum"], sums[name])
    counters = tracker.counters
    assert int(counters[COUNTER_INDEX["skipped_overflow_steps"]]) == 1
    assert int(counters[COUNTER_INDEX["density_step"]]) == 2 and int(counters[COUNTER_INDEX["density_nonzero"]]) == 0
    tracker.skip_step(observed=True)  # known only after observe_gradients: not a second step
    assert tracker.steps == 2 and int(counters[COUNTER_INDEX["skipped_overflow_steps"]]) == 2


def test_the_scale_after_update_is_asked_of_a_copy():
    """ZeRO's ``step`` updates its loss scaler before unscaling: on a step where a dynamic scale grows, the
    gradient is divided by the grown scale. gradtrace asks a copy of the scaler; the real one is untouched."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from gradtrace.integrations.deepspeed import _scale_after_update

    class Optimizer:  # the attributes of DeepSpeed's ZeRO optimizers that the probe reads
        def __init__(self):
            self.loss_scaler = DynamicLossScaler(init_scale=256.0, scale_window=2, min_scale=1.0, delayed_shift=1,
                                                 consecutive_hysteresis=False)
            self.custom_loss_scaler = False

        @property
        def loss_scale(self):
            return self.loss_scaler.cur_scale

    optimizer = Optimizer()
    seen = []
    for _ in range(4):  # what each step will divide by, then the real update the step makes
        before = vars(optimizer.loss_scaler).copy()
        seen.append(_scale_after_update(optimizer))
        assert vars(optimizer.loss_scaler) == before  # the probe changed nothing
        optimizer.loss_scaler.update_scale(False)
        assert optimizer.loss_scale == seen[-1]  # the scale the step divided by
    assert seen == [256.0, 256.0, 512.0, 512.0]
