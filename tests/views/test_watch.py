"""``gradtrace watch``: the terminal view follows a run log while it is appended, and shows its numbers.

The records come from a real tiny traced run; they are replayed into a fresh log, beforehand or from a
thread, as a training process would write them.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
import torch
from rich.console import Console
from torch import nn

import gradtrace
from gradtrace import TrackerConfig
from gradtrace.cli import main as cli_main
from gradtrace.views.terminal import heat_strip, heat_strip_lines
from gradtrace.views.watch import LogFollower, fraction_bar, render, sparkline, watch


class TwoBlocks(nn.Module):
    """Two "layers" whose parameter names gradtrace maps to layers 0, 1 and kinds q / down / embed."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.q_proj = nn.Linear(8, 8)
            block.down_proj = nn.Linear(8, 8)
            self.layers.append(block)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(tokens)
        for block in self.layers:
            hidden = hidden + block.down_proj(torch.relu(block.q_proj(hidden)))
        return hidden.pow(2).mean()


@pytest.fixture(scope="module")
def log_lines(tmp_path_factory) -> list[str]:
    """The run log of a real traced run (bf16, small lr: sparse updates), one record per step."""
    run_dir = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    model = TwoBlocks().to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tracer = gradtrace.trace(model, optimizer, run_dir, log_every=1, wandb=False, strict=True,
                             config=TrackerConfig(cancellation="full"), label="watched")
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        model(torch.randint(0, 10, (6,), generator=generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    lines = (run_dir / "log.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["event"] for line in lines] == ["start"] + ["log"] * 5 + ["end"]
    return lines


def expected_strings(record: dict) -> list[str]:
    """What the view must show for a record: its step and fractions, as percentages."""
    out = [f"step {record['step']}"]
    for metric in ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed", "updated"):
        out.append(f"{metric} ")
        out.append(f"{100 * record['global'][metric]:.2f}%")
    for group in ("per_layer", "per_kind"):
        for values in record[group].values():
            out.append(f"{100 * values['update_sparsity']:.2f}%")
            out.append(f"{100 * values['gradient_sparsity']:.2f}%")
    return out


def test_once_on_a_log_being_written(log_lines, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Three complete records and half of the next line, as a reader may find it mid-write.
    (run_dir / "log.jsonl").write_text("".join(log_lines[:4]) + log_lines[4][:40])
    assert cli_main(["watch", str(run_dir), "--once"]) == 0
    text = capsys.readouterr().out
    current = json.loads(log_lines[3])
    assert current["step"] == 3
    for expected in expected_strings(current):
        assert expected in text, expected
    assert "running" in text and "finished" not in text and "watched" in text
    # Values of another step would differ: make sure the check above could fail.
    later = json.loads(log_lines[5])
    assert f"{100 * later['global']['update_sparsity']:.2f}%" != f"{100 * current['global']['update_sparsity']:.2f}%"


def test_follows_appends_and_exits_at_end(log_lines, tmp_path):
    run_dir = tmp_path / "run"  # does not exist yet: watch may start before training does

    def training():
        time.sleep(0.2)
        run_dir.mkdir()
        with open(run_dir / "log.jsonl", "w") as handle:
            for line in log_lines:
                # Each record in two writes, so the watcher also meets half-written lines.
                handle.write(line[:25])
                handle.flush()
                time.sleep(0.05)
                handle.write(line[25:])
                handle.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=training)
    console = Console(record=True, file=io.StringIO(), width=120, force_terminal=False)
    started = time.monotonic()
    writer.start()
    assert watch(run_dir, interval=0.02, console=console, timeout=30) == 0
    elapsed = time.monotonic() - started
    writer.join()
    assert elapsed < 15, "watch should stop at the end record, not at the timeout"
    text = console.export_text()
    assert "finished" in text
    for expected in expected_strings(json.loads(log_lines[-2])):
        assert expected in text, expected


def test_ctrl_c_exits_cleanly(log_lines, tmp_path, monkeypatch):
    (tmp_path / "log.jsonl").write_text("".join(log_lines[:3]))  # no end: would follow forever

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("gradtrace.views.watch.time.sleep", interrupted)
    console = Console(record=True, file=io.StringIO(), width=100)
    assert watch(tmp_path, console=console) == 0


def test_follower_reads_increments_and_keeps_the_newest_record_per_step(log_lines, tmp_path):
    path = tmp_path / "log.jsonl"
    follower = LogFollower(tmp_path)
    assert not follower.poll()  # no file yet
    path.write_text(log_lines[0] + log_lines[1][:30])
    assert follower.poll() and follower.latest is None and follower.info["label"] == "watched"
    with open(path, "a") as handle:
        handle.write(log_lines[1][30:] + log_lines[2])
    assert follower.poll()
    assert follower.latest == json.loads(log_lines[2]) and sorted(follower.history) == [1, 2]
    assert not follower.poll()  # nothing new
    # A resume from step 1's checkpoint: a new start, then step 2 again with other numbers.
    redone = json.loads(log_lines[3])
    redone["step"] = 2
    with open(path, "a") as handle:
        handle.write(log_lines[-1] + log_lines[0] + json.dumps(redone) + "\n")
    assert follower.poll()
    assert not follower.ended and follower.latest["step"] == 2
    assert follower.history[2]["update_sparsity"] == redone["global"]["update_sparsity"]
    # Truncated (a new run in the same directory): start over.
    path.write_text(log_lines[0])
    assert follower.poll() and follower.latest is None and follower.history == {}


def test_bars_and_sparklines():
    assert fraction_bar(0.5, 4) == "██  "
    assert fraction_bar(9 / 32, 4) == "█▏  "  # 9 eighths of a character
    assert fraction_bar(1.0, 3) == "███" and fraction_bar(None, 3) == "   "
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([0.2, 0.2]) == "▁▁"


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """The run log of a real 24-layer tiny Llama (bf16, small lr: per-layer sparsities that differ), a log
    every step for 6 steps."""
    from tests.helpers.traced_runs import traced_run

    return traced_run(tmp_path_factory.mktemp("deep") / "run", dtype=torch.bfloat16, lr=1e-5, tokens=32, steps=6,
                      layers=24, log_every=1, label="deep")


def shown(follower: LogFollower, width: int, height: int) -> list[str]:
    """The view as a terminal of that size shows it: its lines."""
    console = Console(width=width, height=height, record=True, file=io.StringIO(), color_system=None)
    console.print(render(follower, width=width, height=height))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width, height", [(100, 40), (80, 24)])
def test_every_layer_and_the_sparkline_ranges_fit_the_terminal(deep_run, width, height):
    follower = LogFollower(deep_run)
    follower.poll()
    lines = shown(follower, width, height)
    text = "\n".join(lines)
    assert len(lines) <= height and max(len(line) for line in lines) <= width
    latest = follower.latest
    assert len(latest["per_layer"]) == 24
    for layer, values in latest["per_layer"].items():
        update, gradient = (f"{100 * values[m]:.2f}%" for m in ("update_sparsity", "gradient_sparsity"))
        # the layer's label, then its two values (bars between them are not digits)
        assert re.search(rf"(?<![\d.]){layer} [^\d]*{re.escape(update)} [^\d]*{re.escape(gradient)}", text), layer
    # Each global metric: its sparkline over the logged steps and the range it is scaled to, the data's min-max.
    history = [follower.history[step] for step in sorted(follower.history)]
    assert len(history) == 6
    for metric in ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed", "updated"):
        values = [h[metric] for h in history]
        low, high = min(values), max(values)
        [line] = [line for line in lines if line.startswith(f"{metric} ")]
        spark = "".join("▁▂▃▄▅▆▇█"[round((v - low) / (high - low) * 7) if high > low else 0] for v in values)
        assert f"{spark}" in line and line.rstrip().endswith(f"{100 * low:.2f}%–{100 * high:.2f}%"), line
    if height == 40:  # the kinds too, while there is room
        for kind, values in latest["per_kind"].items():
            update = f"{100 * values['update_sparsity']:.2f}%"
            assert re.search(rf"{kind} [^\d]*{re.escape(update)}", text), kind


def test_heat_strip_shows_every_layer_on_its_range(deep_run):
    """The last resort of a terminal too small for columns: one block per layer, scaled to the range it prints."""
    follower = LogFollower(deep_run)
    follower.poll()
    per_layer = follower.latest["per_layer"]
    strip = heat_strip("per layer", per_layer, "layer", 40).plain.splitlines()
    assert len(strip) == heat_strip_lines(24, 2, 40)
    labels = [line.split()[1:] for line in strip if line.lstrip().startswith("layer ")]
    assert sum(labels, []) == [str(layer) for layer in range(24)]
    updates = [v["update_sparsity"] for v in per_layer.values()]
    assert f"update {100 * min(updates):.2f}%–{100 * max(updates):.2f}%" in strip[1]
    blocks = "".join(line.split(maxsplit=1)[1] for line in strip[3:] if line.lstrip().startswith("update "))
    lowest, highest = min(range(24), key=updates.__getitem__), max(range(24), key=updates.__getitem__)
    cells = blocks.split()
    assert len(cells) == 24 and cells[lowest][0] == "▁" and cells[highest][0] == "█"
