"""``gradtrace watch RUN_DIR``: a live terminal view of a run, following its ``log.jsonl`` as it grows.

Shows the run's progress (logging step, optimizer steps), the current global fractions with a sparkline
of their history, and per-layer / per-kind bars of update and gradient sparsity. It needs nothing but
the run log, so it works on another machine that sees the run directory (e.g. a shared filesystem).

The log is followed incrementally: each poll reads only the bytes appended since the last one (a run
log holds a full per-matrix summary per line, so re-reading it every second would grow costly) and
keeps a line that is still being written for the next poll.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradtrace.anatomy.naming import layer_sort_key
from gradtrace.formats.run_dir import LOG_NAME, TRAINER_SUBDIR
from gradtrace.formats.run_log import RunRecords
from gradtrace.views.run_data import metric_keys, percent, run_label

WATCH_METRICS = ("gradient_sparsity", "update_sparsity", "update_sparsity_abs_*", "update_sparsity_rel_*",
                 "cancelled", "absorbed", "changed_without_gradient", "updated", "no_gradient")
_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"


class LogFollower:
    """Incremental reader of a run log: call :meth:`poll` repeatedly; it reads only new complete lines.

    State, of the latest run in the log (:class:`~gradtrace.formats.run_log.RunRecords`): ``info`` (of its
    latest start), ``latest`` (the last ``log`` record appended), ``history`` (step -> global fractions,
    newest record per step, as :func:`~gradtrace.formats.run_log.read_run_log` keeps), and ``ended`` (an
    ``end`` record came after the latest ``start``).
    """

    def __init__(self, run_dir_or_file: str | os.PathLike):
        path = Path(run_dir_or_file)
        if path.is_file() and path.suffix != ".jsonl":
            path = path.parent  # summary.json, masks.safetensors...: the run directory they are in
        if path.is_dir() and not (path / LOG_NAME).exists() and (path / TRAINER_SUBDIR).is_dir():
            path = path / TRAINER_SUBDIR  # a Trainer's output_dir
        # A directory that may not exist yet (watch started before training), or the log file itself.
        self.path = path if path.suffix == ".jsonl" else path / LOG_NAME
        self._reset()

    def _reset(self) -> None:
        self._records = RunRecords()
        self._offset = 0
        self._pending = b""

    @property
    def info(self) -> dict[str, Any]:
        return self._records.info

    @property
    def latest(self) -> dict[str, Any] | None:
        return self._records.latest

    @property
    def ended(self) -> bool:
        return self._records.end is not None

    @property
    def history(self) -> dict[int, dict[str, float]]:
        return {step: {k: v for k, v in (record.get("global") or {}).items() if isinstance(v, (int, float))}
                for step, record in self._records.by_step.items()}

    def poll(self) -> bool:
        """Read what was appended since the last poll; ``True`` if any complete record was read."""
        try:
            size = self.path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return False
        if size < self._offset:  # truncated or replaced: start over
            self._reset()
        if size == self._offset:
            return False
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        self._offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # b"" after a complete line, else a line still being written
        changed = False
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            changed |= self._records.apply(record)
        return changed


def fraction_bar(value: float | None, width: int = 30) -> str:
    """A bar ``width`` characters wide filled to ``value`` (0..1), in eighths of a character."""
    if value is None or not math.isfinite(value):
        return " " * width
    eighths = round(max(0.0, min(1.0, value)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def sparkline(values: list[float], width: int = 24) -> str:
    """The last ``width`` values as a sparkline scaled to their own range."""
    values = [v for v in values if math.isfinite(v)][-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(_SPARK[round((v - low) / span * (len(_SPARK) - 1)) if span else 0] for v in values)


def _bars_table(title: str, groups: Mapping[str, Mapping[str, Any]], label: str, width: int) -> Table:
    """Update and gradient sparsity of each group as bars, fitted into ``width`` terminal columns."""
    label_width = max([len(label), *(len(k) for k in groups)])
    # Two bars share what the label, the two percentages (7 chars) and the column padding leave.
    bar_width = max(5, min(40, (width - label_width - 2 * 7 - 5 * 2) // 2))
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
    table.add_column(label, justify="right", style="bold", no_wrap=True, min_width=label_width)
    table.add_column("update sparsity", no_wrap=True, min_width=bar_width)
    table.add_column("", justify="right", no_wrap=True, min_width=7)
    table.add_column("gradient sparsity", no_wrap=True, min_width=bar_width)
    table.add_column("", justify="right", no_wrap=True, min_width=7)
    for key, values in groups.items():
        update, gradient = values.get("update_sparsity"), values.get("gradient_sparsity")
        table.add_row(key, Text(fraction_bar(update, bar_width), style="green"), percent(update),
                      Text(fraction_bar(gradient, bar_width), style="cyan"), percent(gradient))
    return table


def render(follower: LogFollower, *, width: int = 100) -> Group:
    """The dashboard for the follower's current state (a rich renderable), fitted to ``width`` columns."""
    label = run_label(follower.path.parent, follower.info)
    status = "finished" if follower.ended else "running" if follower.latest else "waiting for the first measurement"
    latest = follower.latest
    header = Text()
    header.append(f"{label}", style="bold")
    header.append(f"  ·  {status}", style="green" if follower.ended else "yellow")
    if latest is not None:
        header.append(f"  ·  step {latest['step']}  ·  optimizer steps {latest.get('optimizer_steps')}")
        tracked = (latest.get("global") or {}).get("tracked_elements")
        if tracked:
            header.append(f"  ·  {tracked:,} tracked elements")
    header.append(f"\n{follower.path}", style="dim")
    parts: list[Any] = [Panel(header, title="gradtrace watch", title_align="left")]
    if latest is None:
        return Group(*parts)
    warnings = anatomy_warnings_panel(latest)
    if warnings is not None:
        parts.append(warnings)
    current = latest.get("global") or {}
    by_step = follower.history
    steps = sorted(by_step)
    metrics = metric_keys(current, WATCH_METRICS)
    spark_width = max(8, min(40, width - max(len(m) for m in metrics) - 7 - 20 - 8))
    fractions = Table(title="global (fraction of tracked elements)", title_justify="left", show_edge=False,
                      pad_edge=False, box=None)
    fractions.add_column("metric", no_wrap=True)
    fractions.add_column("now", justify="right", no_wrap=True, min_width=7)
    fractions.add_column("", no_wrap=True, min_width=20)
    fractions.add_column(f"over {len(steps)} logs", no_wrap=True)
    for metric in metrics:
        history = [by_step[s][metric] for s in steps if metric in by_step[s]]
        fractions.add_row(metric, percent(current.get(metric)), fraction_bar(current.get(metric), 20),
                          sparkline(history, spark_width))
    parts.append(fractions)
    # Kinds (a dozen rows) before layers (one row per block): a terminal too short for the whole view
    # crops the bottom, so the long table goes last.
    per_kind = latest.get("per_kind") or {}
    if per_kind:
        parts.append(_bars_table("per module kind", per_kind, "kind", width))
    per_layer = latest.get("per_layer") or {}
    if per_layer:
        parts.append(_bars_table("per layer", dict(sorted(per_layer.items(), key=lambda kv: layer_sort_key(kv[0]))),
                                 "layer", width))
    per_expert = latest.get("per_expert") or {}
    if per_expert:  # right after the global table: one short line per MoE layer, above the long tables
        parts.insert(2, expert_lines(current, per_expert, latest.get("expert_extremes")))
    return Group(*parts)


def expert_lines(current: Mapping[str, Any], per_expert: Mapping[str, Mapping[str, Any]],
                 extremes: Mapping[str, list] | None = None) -> Text:
    """The compact expert view: the headline numbers, the least and most touched experts by name, then one
    line per MoE layer with one character per routed expert, its gradient density (1 − gradient sparsity)
    as a block height; ``·`` for none at all."""
    text = Text()
    text.append("experts ", style="bold")
    text.append(f"{current.get('experts', len(per_expert))} routed · "
                f"{current.get('experts_without_gradient', '?')} never received a gradient · gradient density "
                f"min {percent(current.get('expert_gradient_density_min'))} / median "
                f"{percent(current.get('expert_gradient_density_median'))} / max "
                f"{percent(current.get('expert_gradient_density_max'))}")
    for side, label in (("least_touched", "least touched"), ("most_touched", "most touched")):
        entries = (extremes or {}).get(side)
        if entries:
            named = ", ".join(f"{e['expert']} {percent(e['gradient_density'])}" for e in entries)
            text.append(f"\n  {label}: {named}")
    layers: dict[str, list[float | None]] = {}
    for key, values in per_expert.items():
        layer, _, _ = key.rpartition("/")
        sparsity = values.get("gradient_sparsity")
        layers.setdefault(layer, []).append(None if sparsity is None else 1 - sparsity)
    width = max(len(layer) for layer in layers)
    for layer, densities in layers.items():
        cells = "".join("·" if d is None or d <= 0 else _SPARK[min(len(_SPARK) - 1, round(d * (len(_SPARK) - 1)))]
                        for d in densities)
        text.append(f"\n  layer {layer.rjust(width)}  ")
        text.append(cells, style="cyan")
    return text


def anatomy_warnings_panel(summary: Mapping[str, Any]) -> Panel | None:
    """The summary's ``anatomy_warnings`` (an unrecognised MoE layout: experts with no per-expert view),
    in a red panel under the header; ``None`` when there are none."""
    warnings = summary.get("anatomy_warnings") or []
    if not warnings:
        return None
    return Panel(Text("\n".join(warnings), style="red"), title="model anatomy", title_align="left")


def watch(run_dir: str | os.PathLike, *, once: bool = False, interval: float = 1.0,
          console: Console | None = None, timeout: float | None = None) -> int:
    """Follow ``run_dir``'s log and redraw until an ``end`` record appears or Ctrl-C; returns an exit code.

    ``once``: render the current state once and return (0, or 1 if there is no run log). ``timeout``
    (seconds) stops following after that long (for scripts and tests); by default it follows forever.
    """
    console = console or Console()
    follower = LogFollower(run_dir)
    follower.poll()
    if once:
        if not follower.path.is_file():
            console.print(f"no gradtrace run log at {follower.path}: give a run directory (it holds {LOG_NAME}; "
                          f"the callback writes one to <output_dir>/{TRAINER_SUBDIR}) or a file in one",
                          style="red", markup=False)
            return 1
        console.print(render(follower, width=console.width))
        return 0
    started = time.monotonic()
    try:
        with Live(render(follower, width=console.width), console=console, refresh_per_second=4,
                  transient=False) as live:
            while not follower.ended:
                if timeout is not None and time.monotonic() - started > timeout:
                    break
                time.sleep(interval)
                if follower.poll():
                    live.update(render(follower, width=console.width))
            live.update(render(follower, width=console.width))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops watching: not an error
    return 0
