"""A run's lifecycle through real Trainer runs: resuming another run's checkpoint, resuming an earlier
checkpoint of the same run, a fresh run in a reused output directory, logging at epoch ends, runs stopped
by an exception, and what the run log shows then."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from gradtrace import GradTraceCallback, GradTraceWarning, load_masks, read_run_log
from gradtrace.demo import runs
from gradtrace.formats.run_log import RunLogWarning
from gradtrace.views.run_data import load_run
from gradtrace.views.watch import LogFollower
from tests.helpers.traced_runs import traced_trainer

COMMON = dict(save_steps=4, logging_steps=2, learning_rate=1e-2, dtype=torch.bfloat16, per_device_train_batch_size=4)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, base_path):
    """Run X: 8 steps with a checkpoint at 4 and the reference bookkeeping; run Y: another run (of another
    model of the same architecture, at another learning rate) whose output_dir holds a checkpoint-4 too."""
    from gradtrace.demo.tiny import build_model, load_tokenizer, save_base
    from tests.helpers.reference import ReferenceRecorder

    root = tmp_path_factory.mktemp("lifecycle")
    tokenizer = load_tokenizer(base_path)
    other_base = save_base(build_model(tokenizer, dtype=torch.float32, seed=1, hidden_size=32, num_hidden_layers=2,
                                       intermediate_size=64), tokenizer, root / "other-base")
    reference = ReferenceRecorder()
    runs.run_trainer(base_path, root / "x", callbacks=[GradTraceCallback(strict=True, wandb=False), reference],
                     max_steps=8, **COMMON)
    runs.run_trainer(other_base, root / "y", callbacks=[GradTraceCallback(strict=True, wandb=False)],
                     max_steps=4, **{**COMMON, "learning_rate": 1e-3}, seed=1)
    return root, reference


def test_resume_from_another_output_dir_reads_the_state_of_the_checkpoint_resumed(two_runs, base_path):
    root, reference = two_runs
    callback = GradTraceCallback(strict=True, wandb=False)
    trainer = runs.build_trainer(base_path, root / "y", callbacks=[callback], max_steps=8, **COMMON)
    trainer.train(resume_from_checkpoint=str(root / "x" / "checkpoint-4"))

    # Y's output_dir holds its own checkpoint-4: the masks continue X's, the checkpoint the Trainer resumed.
    resumed = load_masks(root / "y" / "gradtrace")
    assert resumed.step == 8
    updated = reference.updated()
    for name in reference.gradient:
        assert torch.equal(resumed["gradient"][name], reference.gradient[name]), name
        assert torch.equal(resumed["update"][name], updated[name]), name
    assert 0 < callback.summary["global"]["update_sparsity"] < 1
    assert callback.session.run_id == resumed.info["run_id"]
    log = read_run_log(root / "y")
    assert log["info"]["run_id"] == read_run_log(root / "x")["info"]["run_id"]  # X's run, continued
    assert [r["step"] for r in log["logs"]] == [6, 8]  # steps 2 and 4 were logged into X's output_dir


def test_state_of_another_run_is_refused_not_continued(two_runs, base_path, tmp_path):
    root, _ = two_runs
    # The state found beside the resumed weights was saved with other weights (Y's run): strict raises...
    strict = GradTraceCallback(strict=True, wandb=False, resume_from=root / "y" / "checkpoint-4")
    trainer = runs.build_trainer(base_path, tmp_path / "a", callbacks=[strict], max_steps=6, **COMMON)
    with pytest.raises(ValueError, match="saved with other weights.*checkpoint-4"):
        trainer.train(resume_from_checkpoint=str(root / "x" / "checkpoint-4"))
    # ... and by default one warning says so, tracking is off and training goes on without masks.
    lenient = GradTraceCallback(wandb=False, resume_from=root / "y" / "checkpoint-4")
    trainer = runs.build_trainer(base_path, tmp_path / "b", callbacks=[lenient], max_steps=6, **COMMON)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(root / "x" / "checkpoint-4"))
    said = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(said) == 1 and "other weights" in said[0] and "switched off" in said[0]
    assert trainer.state.global_step == 6 and not (tmp_path / "b" / "gradtrace" / "masks.safetensors").exists()


def test_a_checkpoint_without_tracker_state_names_where_it_looked(two_runs, base_path, tmp_path):
    root, _ = two_runs
    import shutil

    bare = tmp_path / "bare-checkpoint-4"
    shutil.copytree(root / "x" / "checkpoint-4", bare, ignore=shutil.ignore_patterns("gradtrace"))
    trainer = runs.build_trainer(base_path, tmp_path / "c", callbacks=[GradTraceCallback(strict=True, wandb=False)],
                                 max_steps=6, **COMMON)
    with pytest.raises(FileNotFoundError, match=f"no gradtrace tracker state.*{bare}, the one the Trainer resumed"):
        trainer.train(resume_from_checkpoint=str(bare))


def test_resuming_an_earlier_checkpoint_drops_the_abandoned_steps(two_runs, base_path, tmp_path):
    root, _ = two_runs
    import shutil

    run = tmp_path / "x"
    shutil.copytree(root / "x", run)  # X finished 8 steps and logged 2, 4, 6, 8
    callback = GradTraceCallback(strict=True, wandb=False)
    trainer = runs.build_trainer(base_path, run, callbacks=[callback], **{**COMMON, "max_steps": 6})
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-4"))
    log = read_run_log(run)
    # steps 6 and 8 of the first branch are gone: 6 is the resumed branch's, 8 never happened on it
    assert [r["step"] for r in log["logs"]] == [2, 4, 6]
    assert log["logs"][-1]["global"] == callback.summary["global"] and log["end"]["step"] == 6


def _train(base_path, output_dir, **kwargs):
    callback = GradTraceCallback(strict=True, wandb=False)
    runs.run_trainer(base_path, output_dir, callbacks=[callback], **{**COMMON, "save_steps": None, **kwargs})
    return callback


def test_a_fresh_run_in_a_reused_output_dir_is_not_spliced_with_the_earlier_one(tmp_path, base_path):
    first = traced_trainer(base_path, tmp_path, max_steps=8, learning_rate=1e-3)
    first_masks = load_masks(tmp_path / "gradtrace")
    first_id = first.session.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = traced_trainer(base_path, tmp_path, max_steps=4, learning_rate=1e-6)
    assert second.session.run_id != first_id

    # The run log holds both runs; every reader shows the second only, never a curve spliced from both.
    log = read_run_log(tmp_path / "gradtrace")
    assert [r["step"] for r in log["logs"]] == [2, 4]
    assert log["earlier_runs"] == 1 and log["info"]["run_id"] == second.session.run_id
    assert log["logs"][-1]["global"] == second.summary["global"]
    assert log["info"]["learning_rate"] == 1e-6
    run = load_run(tmp_path)  # the Trainer's output_dir stands for its gradtrace/ folder
    assert [r["step"] for r in run.logs] == [2, 4] and run.final["global"] == second.summary["global"]
    follower = LogFollower(tmp_path)
    follower.poll()
    assert sorted(follower.history) == [2, 4] and follower.ended and follower.latest["step"] == 4

    # The first run's masks were kept aside, not overwritten; one warning said where.
    kept = tmp_path / "gradtrace" / "earlier-runs" / first_id
    moved = load_masks(kept / "masks.safetensors")
    assert moved.step == 8 and json.loads((kept / "summary.json").read_text())["info"]["run_id"] == first_id
    for kind in ("gradient", "update"):
        for name, mask in first_masks[kind].items():
            assert torch.equal(moved[kind][name], mask)
    assert load_masks(tmp_path / "gradtrace").step == 4
    messages = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(messages) == 1 and str(kept) in messages[0]


def test_epoch_logging_gives_live_curves(tmp_path, base_path):
    callback = GradTraceCallback(strict=True, wandb=False)
    result = runs.run_trainer(base_path, tmp_path, callbacks=[callback], max_steps=-1, num_train_epochs=3,
                              logging_strategy="epoch", per_device_train_batch_size=16, learning_rate=1e-3,
                              dtype=torch.float32)
    epochs_end = [int(r["step"]) for r in result.trainer.state.log_history if "loss" in r]
    assert len(epochs_end) == 3
    records = [json.loads(line) for line in (tmp_path / "gradtrace" / "log.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if r["event"] == "log"]
    assert logged == epochs_end  # at each epoch's end, before the run ended
    assert records[-1]["event"] == "end"


def test_a_torn_last_line_does_not_hide_the_next_run(tmp_path, base_path):
    _train(base_path, tmp_path, max_steps=4)
    log_path = tmp_path / "gradtrace" / "log.jsonl"
    whole = log_path.read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    log_path.write_bytes(whole + last[: len(last) // 2])  # a run killed in the middle of writing a line
    second = _train(base_path, tmp_path, max_steps=2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = read_run_log(tmp_path)
    assert log["info"]["run_id"] == second.session.run_id and log["earlier_runs"] == 1
    said = [str(w.message) for w in caught if issubclass(w.category, RunLogWarning)]
    assert len(said) == 1 and re.search(r"log.jsonl, line \d+: skipped an unreadable record \(not JSON", said[0])
    assert [r["step"] for r in log["logs"]] == [2] and log["logs"][-1]["global"] == second.summary["global"]
    assert log["skipped_records"] == 1


BAD_RECORDS = [
    lambda log: {**log, "step": None},
    lambda log: {**log, "global": "oops"},
    lambda log: {**log, "per_kind": {"q": "x"}},
    lambda log: {**log, "per_layer": ["a list"]},
    lambda log: {**log, "global": {**log["global"], "update_sparsity": "x"}},
    lambda log: {**log, "run_id": ["unhashable"]},
    lambda log: {"event": "start", "run_id": log["run_id"], "step": 0, "info": ["a list"]},
    lambda log: [log],
]


def test_ill_typed_records_are_skipped_by_every_reader(tmp_path, base_path, capsys):
    from gradtrace.cli import main as cli_main

    callback = _train(base_path, tmp_path, max_steps=4)
    log_path = tmp_path / "gradtrace" / "log.jsonl"
    good = read_run_log(tmp_path)
    template = {**good["logs"][-1], "step": 6}
    with open(log_path, "a", encoding="utf-8") as handle:
        for make in BAD_RECORDS:  # valid JSON, wrong types: a hand-edited or foreign log
            handle.write(json.dumps(make(template)) + "\n")

    with pytest.warns(RunLogWarning, match="skipped an unreadable record") as said:
        log = read_run_log(tmp_path)
    assert len([w for w in said if issubclass(w.category, RunLogWarning)]) == 1
    assert log["skipped_records"] == len(BAD_RECORDS)
    assert [r["step"] for r in log["logs"]] == [2, 4] and log["logs"] == good["logs"]
    assert log["logs"][-1]["global"] == callback.summary["global"]
    with pytest.warns(RunLogWarning):
        assert cli_main(["report", str(tmp_path), "-o", str(tmp_path / "report.html")]) == 0
    with pytest.warns(RunLogWarning):
        assert cli_main(["watch", str(tmp_path), "--once"]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "Traceback" not in out


def test_two_callbacks_on_one_trainer_do_not_share_a_run_directory(tmp_path, base_path, reference):
    from tests.helpers.reference import assert_masks_equal_reference

    first, second = GradTraceCallback(wandb=False), GradTraceCallback(wandb=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs.run_trainer(base_path, tmp_path, callbacks=[first, second, reference],
                         **{**COMMON, "save_steps": None, "max_steps": 4})
    said = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(said) == 1 and "already the run directory of another GradTraceCallback" in said[0]
    assert "output_dir=" in said[0] and second.session is None  # refused before it wrote anything
    # the first one's results are whole: its masks exact, its log alone in the file
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace"), reference, some_without_gradient=False)
    log = read_run_log(tmp_path)
    assert log["earlier_runs"] == 0 and [r["step"] for r in log["logs"]] == [2, 4]
    # strict: a clear error
    trainer = runs.build_trainer(base_path, tmp_path / "strict", max_steps=2, **{**COMMON, "save_steps": None},
                                 callbacks=[GradTraceCallback(strict=True, wandb=False),
                                            GradTraceCallback(strict=True, wandb=False)])
    with pytest.raises(ValueError, match="already the run directory"):
        trainer.train()


def test_two_trainers_sharing_an_output_dir_concurrently(tmp_path, base_path, reference):
    import threading

    from transformers import TrainerCallback

    from tests.helpers.reference import assert_masks_equal_reference

    started, proceed = threading.Event(), threading.Event()

    class Pause(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                started.set()
                assert proceed.wait(120)

    first = GradTraceCallback(strict=True, wandb=False)
    common = {**COMMON, "save_steps": None, "max_steps": 4}
    thread = threading.Thread(target=runs.run_trainer, args=(base_path, tmp_path),
                              kwargs=dict(callbacks=[first, reference, Pause()], **common), name="first")
    thread.start()
    try:
        assert started.wait(120)
        second = GradTraceCallback(wandb=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runs.run_trainer(base_path, tmp_path, callbacks=[second], **{**common, "max_steps": 2})
    finally:
        proceed.set()
        thread.join()
    said = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(said) == 1 and "in thread 'first'" in said[0] and result.trainer.state.global_step == 2
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace"), reference, some_without_gradient=False)
    assert read_run_log(tmp_path)["info"]["run_id"] == first.session.run_id
    # once the first has ended, the directory is free again
    again = _train(base_path, tmp_path, max_steps=2)
    assert read_run_log(tmp_path)["info"]["run_id"] == again.session.run_id


INTERRUPTED_TRAINER = """
import sys, torch
from transformers import TrainerCallback
from gradtrace import GradTraceCallback
from gradtrace.demo import runs
from tests.helpers.reference import ReferenceRecorder

base, out, kind = sys.argv[1:4]
reference = ReferenceRecorder()

class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            torch.save({"gradient": reference.gradient, "update": reference.updated()}, out + "/reference.pt")
            raise KeyboardInterrupt if kind == "keyboard" else RuntimeError("a failure at step 5")

torch.set_num_threads(1)
runs.run_trainer(base, out, callbacks=[GradTraceCallback(wandb=False), reference, Interrupt()], max_steps=8,
                 save_steps=None, logging_steps=2, learning_rate=1e-2, dtype=torch.bfloat16,
                 per_device_train_batch_size=4)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, shown", [("keyboard", "KeyboardInterrupt: "),
                                         ("error", "RuntimeError: a failure at step 5")])
def test_a_trainer_stopped_by_an_exception_still_writes_its_masks(tmp_path, base_path, kind, shown):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_TRAINER)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), base_path, str(tmp_path), kind], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and shown.split(":")[0] in done.stderr, done.stderr[-2000:]

    masks = load_masks(tmp_path / "gradtrace")
    reference = torch.load(tmp_path / "reference.pt")
    assert masks.step == 5
    for name, mask in reference["gradient"].items():
        assert torch.equal(masks["gradient"][name], mask), name
        assert torch.equal(masks["update"][name], reference["update"][name]), name
    summary = json.loads((tmp_path / "gradtrace" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["interrupted_by"].startswith(shown)
    assert summary["step"] == 5 and 0 < summary["global"]["update_sparsity"] < 1
    log = read_run_log(tmp_path)
    assert log["end"]["interrupted"] is True and log["end"]["step"] == 5
    assert [r["step"] for r in log["logs"]] == [2, 4, 5]


def test_a_plain_loop_stopped_by_an_exception_still_writes_its_masks(tmp_path):
    import gradtrace

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradient = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    with pytest.raises(KeyboardInterrupt), gradtrace.trace(model, optimizer, tmp_path, log_every=2,
                                                           wandb=False, strict=True) as tracer:
        for step in range(1, 9):
            model(torch.randint(0, 6, (4,))).sum().backward()  # tokens 6..15 never get a gradient
            for name, param in model.named_parameters():
                gradient[name] |= param.grad != 0
            optimizer.step()
            optimizer.zero_grad()
            if step == 3:
                raise KeyboardInterrupt
    masks = load_masks(tmp_path)
    assert masks.step == tracer.step == 3
    for name, param in model.named_parameters():
        assert torch.equal(masks["gradient"][name], gradient[name]), name
        assert torch.equal(masks["update"][name], param.detach().view(torch.int32) != initial[name].view(torch.int32))
    assert not masks["gradient"]["0.weight"].all() and masks["gradient"]["0.weight"].any()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["interrupted_by"] == "KeyboardInterrupt: "
    assert read_run_log(tmp_path)["end"]["interrupted"] is True


def test_a_plain_loop_whose_tracking_fails_trains_on_without_it(tmp_path):
    """The Trainer callback's failure policy in ``trace()`` too: a failed read in the optimizer's hook says
    so once and switches tracking off (hooks removed, nothing written), and training goes on; strict raises."""
    import gradtrace

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = gradtrace.trace(model, optimizer, tmp_path / "lenient", log_every=1, wandb=False)
    yours = []
    optimizer.register_step_pre_hook(lambda *_: yours.append(1))  # a hook of the loop's own, after gradtrace's
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # tracked
    tracer.tracker.observe_gradients = lambda grads=None, detail=True: 1 / 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            before = model.weight.detach().clone()
            optimizer.step()
            assert not torch.equal(model.weight, before)  # every step still applied
    said = [str(w.message) for w in caught if issubclass(w.category, GradTraceWarning)]
    assert len(said) == 1 and "before the optimizer step failed (ZeroDivisionError" in said[0]
    assert "switched off" in said[0]
    assert tracer.step == 1 and len(yours) == 4  # the loop's own hook ran at every step
    assert tracer.finish() is None and not (tmp_path / "lenient" / "masks.safetensors").exists()
    assert len(optimizer._optimizer_step_pre_hooks) == 1 and not optimizer._optimizer_step_post_hooks

    strict = gradtrace.trace(model, optimizer, tmp_path / "strict", wandb=False, strict=True)
    strict.tracker.observe_gradients = lambda grads=None, detail=True: 1 / 0
    with pytest.raises(ZeroDivisionError):
        optimizer.step()
    strict.finish(interrupted="test")
