"""The local run log: one JSON object per line, readable with no server and while it is written.

Records: ``{"event": "start", "info": {...}}`` once per (re)start, then ``{"event": "log", ...summary}``
at each logging step, and ``{"event": "end", ...}`` at the end. Every record carries the ``run_id`` of the
run that wrote it. Trainers reuse their ``output_dir``, so one file may hold several runs: readers show
the run of the latest ``start`` record only. A resumed run starts again with its own id and continues its
records; of each step the newest record is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import LOG_NAME, find_run_dir


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


class RunRecords:
    """Folds run-log records, in file order, into the latest run's state.

    ``info`` (of the run's latest start), ``by_step`` (step -> newest ``log`` record), ``latest`` (the
    ``log`` record appended last), ``end`` (the
    ``end`` record after its latest start, else ``None``) and ``earlier_runs`` (how many other runs the
    file holds). Records without a ``run_id`` (logs written before ids existed) count as one run.
    """

    def __init__(self):
        self._runs: dict[Any, dict[str, Any]] = {}
        self._current: Any = None

    def _run(self, run_id: Any) -> dict[str, Any]:
        return self._runs.setdefault(run_id, {"info": {}, "by_step": {}, "end": None, "latest": None})

    def apply(self, record: Any) -> bool:
        """Fold one record; ``True`` if it was a run-log record (and may have changed the latest run)."""
        if not isinstance(record, dict):
            return False
        event, run_id = record.get("event"), record.get("run_id")
        if event == "start":
            self._current = run_id
            run = self._run(run_id)
            run["info"], run["end"] = dict(record.get("info") or {}), None
        elif event == "log" and "step" in record:
            run = self._run(run_id)
            run["by_step"][int(record["step"])] = run["latest"] = record
        elif event == "end":
            self._run(run_id)["end"] = record
        else:
            return False
        return True

    @property
    def current(self) -> dict[str, Any]:
        return self._runs.get(self._current) or {"info": {}, "by_step": {}, "end": None, "latest": None}

    @property
    def info(self) -> dict[str, Any]:
        return self.current["info"]

    @property
    def by_step(self) -> dict[int, dict[str, Any]]:
        return self.current["by_step"]

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.current["latest"]

    @property
    def end(self) -> dict[str, Any] | None:
        return self.current["end"]

    @property
    def earlier_runs(self) -> int:
        return max(0, len(self._runs) - 1)


def read_run_log(run_dir_or_file: str | os.PathLike) -> dict[str, Any]:
    """``{"info": {...}, "logs": [summary, ...] sorted by step (newest record per step), "end": {...}|None}``
    of the latest run in the log, with ``"earlier_runs"``: how many other runs the same file holds.

    Accepts the run directory, its ``log.jsonl`` or any other file in it, and a Trainer's ``output_dir``
    (which holds ``gradtrace/``). A partial last line (a run killed mid-write, or a line being written)
    is ignored.
    """
    given = Path(run_dir_or_file)
    path = given if given.is_file() and given.suffix == ".jsonl" else find_run_dir(given) / LOG_NAME
    records = RunRecords()
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # still being written
            try:
                records.apply(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    by_step = records.by_step
    return {"info": records.info, "logs": [by_step[s] for s in sorted(by_step)], "end": records.end,
            "path": str(path), "earlier_runs": records.earlier_runs}
