"""``gradtrace watch RUN_DIR``: a live terminal view of a run, following its ``log.jsonl`` as it grows.

Shows the run's progress (logging step, optimizer steps), the current global fractions with a sparkline
of their history and the range it is scaled to, and per-kind / per-layer update and gradient sparsity,
fitted to the terminal: every layer stays on the screen, in side-by-side columns or a heat strip when one
row each does not fit (:mod:`gradtrace.views.terminal`). It needs nothing but the run log, so it works on
another machine that sees the run directory (e.g. a shared filesystem).

The log is followed incrementally: each poll reads only the bytes appended since the last one (a run
log holds a full per-matrix summary per line, so re-reading it every second would grow costly) and
keeps a line that is still being written for the next poll.
"""

from __future__ import annotations

import io
import json
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
from gradtrace.views.terminal import (  # noqa: F401  (fraction_bar: the tests')
    SPARK,
    fit_groups,
    fraction_bar,
    heat_strip,
    heat_strip_lines,
    spark_range,
    sparkline,
)

WATCH_METRICS = ("gradient_sparsity", "update_sparsity", "update_sparsity_abs_*", "update_sparsity_rel_*",
                 "cancelled", "absorbed", "changed_without_gradient", "updated", "no_gradient")


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


def _lines(renderable: Any, width: int) -> int:
    """How many terminal lines ``renderable`` takes at ``width`` columns."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    return len(console.render_lines(renderable, console.options, pad=False))


def global_table(current: Mapping[str, Any], by_step: Mapping[int, Mapping[str, float]], width: int) -> Table:
    """The global fractions now, each with a bar, a sparkline of its history and the range the sparkline is
    scaled to (each is scaled to its own range: without it, a 13.0-14.2% wiggle and a 0-100% climb looked
    alike)."""
    steps = sorted(by_step)
    metrics = metric_keys(current, WATCH_METRICS)
    name_width = max(len(m) for m in metrics)
    bar_width = 20 if width >= 110 else 10 if width >= 90 else 0  # narrow terminals: the sparkline first
    histories = {m: [by_step[s][m] for s in steps if m in by_step[s]] for m in metrics}
    range_width = 15  # "100.00%–100.00%"
    gaps = 2 * (4 if bar_width else 3)
    spark_width = max(4, min(40, width - name_width - 7 - bar_width - range_width - gaps))
    table = Table(title="global (fraction of tracked elements)", title_justify="left", show_edge=False,
                  pad_edge=False, box=None)
    table.add_column("metric", no_wrap=True)
    table.add_column("now", justify="right", no_wrap=True, min_width=7)
    if bar_width:
        table.add_column("", no_wrap=True, min_width=bar_width)
    table.add_column(f"over {len(steps)} logs", no_wrap=True)
    table.add_column("its range", no_wrap=True)
    for metric in metrics:
        value = current.get(metric)
        cells = [metric, percent(value), *([fraction_bar(value, bar_width)] if bar_width else []),
                 sparkline(histories[metric], spark_width), spark_range(histories[metric], spark_width)]
        table.add_row(*cells)
    return table


def render(follower: LogFollower, *, width: int = 100, height: int | None = None) -> Group:
    """The dashboard for the follower's current state (a rich renderable), fitted to ``width`` columns and,
    when given, ``height`` lines: every layer stays on the screen (in side-by-side columns, or a heat strip,
    when one row per layer does not fit); the per-kind table gives way first."""
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
    parts.append(global_table(current, follower.history, width))
    per_expert = latest.get("per_expert") or {}
    if per_expert:  # right after the global table: one short line per MoE layer, above the long tables
        parts.append(expert_lines(current, per_expert, latest.get("expert_extremes")))
    per_kind = latest.get("per_kind") or {}
    per_layer = dict(sorted((latest.get("per_layer") or {}).items(), key=lambda kv: layer_sort_key(kv[0])))
    left = None if height is None else height - sum(_lines(part, width) for part in parts)
    parts.extend(_groups_views(per_kind, per_layer, width, left))
    return Group(*parts)


def _groups_views(per_kind: Mapping[str, Any], per_layer: Mapping[str, Any], width: int,
                  lines: int | None) -> list[Any]:
    """The per-kind and per-layer views in ``lines`` terminal lines (``None``: no limit). Every layer is
    shown: one row each if that fits, else in side-by-side columns, else as a heat strip; the kinds get one
    row each if the layers can still be shown, else columns, else a one-line note, else nothing."""
    kinds_full = fit_groups("per module kind", per_kind, "kind", width, None) if per_kind else None
    if not per_layer:
        return [kinds_full[0]] if kinds_full else []
    kind_lines = kinds_full[1] if kinds_full else 0
    layers = fit_groups("per layer", per_layer, "layer", width, None if lines is None else lines - kind_lines)
    if layers is not None:
        return [pair[0] for pair in (kinds_full, layers) if pair is not None]
    # The layers' most compact view with numbers (fewest lines the width allows), else the heat strip.
    fewest = next((view for rows in range(1, len(per_layer) + 1)
                   if (view := fit_groups("per layer", per_layer, "layer", width, rows + 2))), None)
    if fewest is None or fewest[1] > lines:
        fewest = (heat_strip("per layer", per_layer, "layer", width),
                  heat_strip_lines(len(per_layer), max(len(k) for k in per_layer), width))
    spare = lines - fewest[1]
    kinds = fit_groups("per module kind", per_kind, "kind", width, spare) if per_kind else None
    if kinds is None and per_kind and spare >= 1:
        kinds = (Text(f"per module kind: {len(per_kind)} kinds, not shown in a terminal this short", style="dim"), 1)
    layers = fit_groups("per layer", per_layer, "layer", width, lines - (kinds[1] if kinds else 0)) or fewest
    return [pair[0] for pair in (kinds, layers) if pair is not None]


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
        cells = "".join("·" if d is None or d <= 0 else SPARK[min(len(SPARK) - 1, round(d * (len(SPARK) - 1)))]
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
        # A terminal shows the view in its height; a file or a pipe takes it all.
        console.print(render(follower, width=console.width, height=console.height if console.is_terminal else None))
        return 0
    started = time.monotonic()
    try:
        with Live(render(follower, width=console.width, height=console.height), console=console, refresh_per_second=4,
                  transient=False) as live:
            while not follower.ended:
                if timeout is not None and time.monotonic() - started > timeout:
                    break
                time.sleep(interval)
                if follower.poll():
                    live.update(render(follower, width=console.width, height=console.height))
            live.update(render(follower, width=console.width, height=console.height))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops watching: not an error
    return 0
