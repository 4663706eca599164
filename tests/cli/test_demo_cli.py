"""`gradtrace demo` end to end (short): the table it prints is what the runs wrote."""

from __future__ import annotations

import json

import pytest

from gradtrace import load_masks
from gradtrace.cli import main


@pytest.mark.slow
def test_demo_prints_the_runs_numbers_and_writes_masks_logs_and_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "4", "--base-steps", "10"]) == 0
    out = capsys.readouterr().out
    for run in ("grpo", "sft-in", "sft-out", "grpo-fp32"):
        summary = json.loads((tmp_path / run / "gradtrace" / "summary.json").read_text())
        assert summary["optimizer_steps"] == 4
        masks = load_masks(tmp_path / run / "gradtrace" / "masks.safetensors")
        assert masks.step == 4
        dtype = "float32" if run == "grpo-fp32" else "bfloat16"
        assert set(masks.dtypes.values()) == {dtype}
        assert f"{summary['global']['update_sparsity']:.4f}" in out
        assert run in out
    assert (tmp_path / "report" / "report.html").is_file()
    assert "report.html" in out
