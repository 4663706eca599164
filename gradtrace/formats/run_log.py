"""The local run log: one JSON object per line, readable with no server and while it is written.

Records: ``{"event": "start", "info": {...}}`` once per (re)start, then ``{"event": "log", ...summary}``
at each logging step, and ``{"event": "end", ...}`` at the end. A resumed run appends to the same file;
readers keep the newest record of each step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import LOG_NAME


class RunLog:
    """Appends records to ``<run_dir>/log.jsonl``, flushing each line so followers see it at once."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, allow_nan=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()


def read_run_log(run_dir_or_file: str | os.PathLike) -> dict[str, Any]:
    """``{"info": {...}, "logs": [summary, ...] sorted by step (newest record per step), "end": {...}|None}``.

    A partial last line (a run killed mid-write, or a line being written) is ignored.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no gradtrace run log here")
    info: dict[str, Any] = {}
    by_step: dict[int, dict[str, Any]] = {}
    end = None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # still being written
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            event = record.get("event")
            if event == "start":
                info = record.get("info", {})
            elif event == "log":
                by_step[int(record["step"])] = record
            elif event == "end":
                end = record
    return {"info": info, "logs": [by_step[s] for s in sorted(by_step)], "end": end, "path": str(path)}
