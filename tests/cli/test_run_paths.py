"""The paths a person types: ``report``, ``watch`` and ``overlap`` take a run's folder, any file in it, or the
Trainer's ``output_dir``; what is not a run says what was expected, with no traceback."""

from __future__ import annotations

import json

import pytest

from gradtrace.cli import main as cli_main
from tests.helpers.traced_runs import traced_trainer


def test_natural_paths_on_the_command_line(tmp_path, base_path, capsys):
    traced_trainer(base_path, tmp_path / "a", max_steps=2, learning_rate=1e-3)
    traced_trainer(base_path, tmp_path / "b", max_steps=2, learning_rate=1e-3)
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
