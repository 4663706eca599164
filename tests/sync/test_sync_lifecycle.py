"""The weight-sync observer across a run's life: resumed from a checkpoint, with the tracked parameters
changed mid-run, and where it cannot run (DeepSpeed).

The reference is independent of the observer: the weights cast to bf16 after every optimizer step, saved by
a callback (of an uninterrupted run, for the resumed one), compared bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

import gradtrace
from gradtrace import GradTraceCallback
from gradtrace.anatomy.parameter_names import tracked_name
from gradtrace.demo import runs
from tests.helpers.sync_reference import assert_sync_section, changed
from tests.helpers.trainer_callbacks import StopAt

EVERY, SAVED, STEPS = 4, 6, 12  # resumed mid-window: window 2 (steps 5-8) holds the checkpoint step 6


class CastWeights(TrainerCallback):
    """After gradtrace's callback: the trainer's weights cast to bf16 at the start and after each optimizer
    step (by global step), and the ``sync`` section logged at that step."""

    def __init__(self, gradtrace_callback: GradTraceCallback):
        self.gradtrace = gradtrace_callback
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.sections: dict[int, dict] = {}

    def cast(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(torch.bfloat16).clone() for n, p in self.params.items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = {tracked_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.weights[state.global_step] = self.cast()

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = self.cast()
        self.sections[state.global_step] = self.gradtrace.summary["sync"]


def _trainer(base_path, output_dir, *extra):
    callback = GradTraceCallback(strict=True, wandb=False, sync_dtype="bfloat16", sync_every=EVERY)
    record = CastWeights(callback)
    trainer = runs.build_trainer(base_path, output_dir, callbacks=[callback, record, *extra], max_steps=STEPS,
                                 save_steps=SAVED, logging_steps=1, dtype=torch.float32, learning_rate=3e-4,
                                 use_cpu=True, quiet=True)
    return trainer, record


def test_a_resumed_run_continues_on_global_steps_from_the_checkpoint_weights(base_path, tmp_path):
    whole_trainer, whole = _trainer(base_path, tmp_path / "whole")
    whole_trainer.train()
    first, _ = _trainer(base_path, tmp_path / "parts", StopAt(SAVED))
    first.train()
    trainer, resumed = _trainer(base_path, tmp_path / "parts")
    trainer.train(resume_from_checkpoint=True)

    assert sorted(resumed.sections) == list(range(SAVED + 1, STEPS + 1))
    reference = whole.weights
    for step in range(SAVED, STEPS + 1):  # the resumed run trains exactly as the uninterrupted one
        for name, tensor in reference[step].items():
            assert torch.equal(resumed.weights[step][name].view(torch.int16), tensor.view(torch.int16)), (step, name)
    for step, section in resumed.sections.items():
        assert section["step"] == step
        # the step after the resume is compared with the checkpoint's weights, every later one as usual
        assert_sync_section(section, "step_changed", {n: changed(reference[step - 1][n], reference[step][n])
                                                      for n in reference[step]})
        assert section["global"]["step_changed"] == whole.sections[step]["global"]["step_changed"]
        assert section["step_bytes"] == whole.sections[step]["step_bytes"]
    # no complete window since the resume at step 6 yet
    assert resumed.sections[7]["window_end_step"] is None and resumed.sections[7]["global"]["window_changed"] is None
    # window 2 (steps 5-8) resumed at step 6: it covers steps 7-8, from the weights resumed, and says so
    for step in (8, 9, 10, 11):
        section = resumed.sections[step]
        assert (section["window_start_step"], section["window_end_step"]) == (SAVED, 8)
        assert_sync_section(section, "window_changed", {n: changed(reference[SAVED][n], reference[8][n])
                                                        for n in reference[8]})
    # window 3 (steps 9-12) is whole again, aligned to the global steps: the uninterrupted run's numbers
    last = resumed.sections[STEPS]
    assert (last["window_start_step"], last["window_end_step"]) == (8, 12)
    assert_sync_section(last, "window_changed", {n: changed(reference[8][n], reference[12][n]) for n in reference[12]})
    assert last["global"]["window_changed"] == whole.sections[STEPS]["global"]["window_changed"]
    assert last["window_bytes"] == whole.sections[STEPS]["window_bytes"]
    assert whole.sections[8]["window_start_step"] == 4  # the uninterrupted run's window 2 is whole


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 4)

    def forward(self, x):
        out = self.second(torch.tanh(self.first(x)))
        scale = getattr(self, "scale", None)  # a parameter added mid-run
        return out if scale is None else out * scale


def _cast(named):
    return {n: p.detach().to(torch.bfloat16).clone() for n, p in named}


def test_changed_parameters_are_followed_never_compared_with_a_stale_copy(tmp_path):
    """A parameter replaced by a new tensor is read from the new one (a stale copy would count none of its
    changes: the old tensor no longer moves); one added mid-run is observed from the step it is added."""
    torch.manual_seed(0)
    model = TwoLayers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, strict=True,
                             sync_dtype="bfloat16")
    x, y = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.randn(8, 4)

    def step():
        before = _cast(model.named_parameters())  # what the optimizer steps (a parameter added now too)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        section = tracer.session.last_summary["sync"]
        after = _cast(tracer.tracker.named_parameters())
        assert set(section["per_matrix"]) == set(after)
        assert_sync_section(section, "step_changed", {n: changed(before[n], after[n]) for n in after})
        return section

    step()
    with torch.no_grad():  # a new tensor for first.weight, as a reload or a re-init would give
        model.first.weight = nn.Parameter(model.first.weight * 0.5)
    optimizer.param_groups[0]["params"][0] = model.first.weight
    optimizer.state.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradtrace says the parameter set changed
        section = step()
    assert 0 < section["per_matrix"]["first.weight"]["step_changed"]  # read from the new tensor
    model.scale = nn.Parameter(torch.ones(4))
    optimizer.add_param_group({"params": [model.scale]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        section = step()
    assert section["per_matrix"]["scale"]["step_changed"] == 1.0 and section["step"] == 3
    step()
    assert tracer.session.sync is not None
    tracer.finish()


def test_deepspeed_says_once_that_the_sync_budget_is_not_measured(tmp_path):
    """Under DeepSpeed the observer cannot run: the run says so once, trains and tracks on, and its
    summaries hold no ``sync`` section (nor curves)."""
    pytest.importorskip("deepspeed")
    from gradtrace import GradTraceWarning
    from tests.helpers.deepspeed_fakes import fake_engine, fake_zero_optimizer

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    zero = fake_zero_optimizer(model.parameters())
    with pytest.warns(GradTraceWarning) as caught:
        tracer = gradtrace.trace(fake_engine(model, zero), zero, tmp_path, log_every=1, wandb=False,
                                 sync_dtype="bfloat16", sync_every=2)
        for _ in range(3):
            model(torch.ones(1, 4)).sum().backward()
            zero.step()  # as the engine calls it
            zero.zero_grad()
        tracer.finish()
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "sync_dtype is not supported under DeepSpeed" in said[0], said
    assert tracer.session.sync is None and tracer.step == 3
    summary = tracer.session.last_summary
    assert "sync" not in summary and not any(key.startswith("sync_") for key in summary["global"])
