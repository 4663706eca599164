"""What a new user runs into in the first hour, each through a real Trainer / accelerate / PEFT run:
reused output directories, partial optimizers, wrapped optimizers, parameter sets that change, epoch
logging, natural paths on the command line, LoRA names, the recorded learning rate."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gradtrace import GradTraceCallback, GradTraceWarning, load_masks, read_run_log
from gradtrace.cli import main as cli_main
from gradtrace.demo import runs
from gradtrace.views.report import load_run
from gradtrace.views.watch import LogFollower


def _train(base_path, output_dir, **kwargs):
    callback = GradTraceCallback(strict=True, wandb=False)
    common = dict(logging_steps=2, per_device_train_batch_size=4, dtype=torch.float32)
    runs.run_trainer(base_path, output_dir, callbacks=[callback], **{**common, **kwargs})
    return callback


def test_a_fresh_run_in_a_reused_output_dir_is_not_spliced_with_the_earlier_one(tmp_path, base_path):
    first = _train(base_path, tmp_path, max_steps=8, learning_rate=1e-3)
    first_masks = load_masks(tmp_path / "gradtrace")
    first_id = first.session.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = _train(base_path, tmp_path, max_steps=4, learning_rate=1e-6)
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


def test_natural_paths_on_the_command_line(tmp_path, base_path, capsys):
    _train(base_path, tmp_path / "a", max_steps=2, learning_rate=1e-3)
    _train(base_path, tmp_path / "b", max_steps=2, learning_rate=1e-3)
    run = tmp_path / "a" / "gradtrace"
    for given in (run / "summary.json", run / "masks.safetensors", run / "log.jsonl", tmp_path / "a"):
        out = tmp_path / f"report-{given.name}.html"
        assert cli_main(["report", str(given), "-o", str(out)]) == 0, given
        assert out.is_file()
        assert cli_main(["watch", str(given), "--once"]) == 0, given
    assert "step 2" in capsys.readouterr().out
    # overlap takes run directories and output_dirs for their masks files
    assert cli_main(["overlap", str(run), str(tmp_path / "b"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["global"]["overlap"] == pytest.approx(1.0)  # same data, same seed: the same subnetwork

    # What is not a run says what was expected, with no traceback.
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "not a gradtrace run" in err and "log.jsonl" in err and "Traceback" not in err
    assert cli_main(["watch", str(tmp_path / "empty"), "--once"]) == 1
    assert "log.jsonl" in capsys.readouterr().out
    assert cli_main(["overlap", str(tmp_path / "empty"), str(run)]) != 0
    assert "empty: no masks.safetensors here" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
