"""The local run log: one JSON object per line, readable with no server and while it is written.

Records: ``{"event": "start", "info": {...}}`` once per (re)start, then ``{"event": "log", ...summary}``
at each logging step, and ``{"event": "end", ...}`` at the end. Every record carries the ``run_id`` of the
run that wrote it. Trainers reuse their ``output_dir``, so one file may hold several runs: readers show
the run of the latest ``start`` record only. A resumed run starts again with its own id and continues its
records; of each step the newest record is kept, and a ``start`` at step S drops the run's records past S
(they belong to the branch abandoned by resuming from an earlier checkpoint).

A run killed mid-write leaves a torn last line: the next append starts on a fresh line, and readers skip
torn or ill-typed records with one warning (:class:`RunRecords`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import LOG_NAME, find_run_dir

# the per-group tables of a ``log`` record: {group name: {metric: number or null}}
GROUP_TABLES = ("per_layer", "per_kind", "per_matrix", "per_expert")


class RunLogWarning(UserWarning):
    """A run-log record was unreadable (torn by a killed run, or of the wrong shape) and was skipped."""


class RunLog:
    """Appends records to ``<run_dir>/log.jsonl``, flushing each line so followers see it at once."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, allow_nan=True)
        with open(self.path, "a+b") as handle:
            # A run killed mid-write (or a full disk) left a line without its newline: end it, or this
            # record would be glued onto it and lost with it.
            torn = handle.tell() > 0 and _last_byte(handle) != b"\n"
            handle.write((b"\n" if torn else b"") + line.encode("utf-8") + b"\n")
            handle.flush()


def _last_byte(handle) -> bytes:
    handle.seek(-1, os.SEEK_END)
    return handle.read(1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _table_problem(name: str, table: Any) -> str | None:
    """What is wrong with a ``{metric: number or null}`` table, or ``None``."""
    if not isinstance(table, Mapping):
        return f"{name!r} is {type(table).__name__}, not an object"
    for key, value in table.items():
        if value is not None and not _is_number(value) and not isinstance(value, bool):
            return f"{name}[{key!r}] is {json.dumps(value, default=str)[:40]}, not a number or null"
    return None


def record_problem(record: Any) -> str | None:
    """Why ``record`` cannot be a run-log record the readers fold, or ``None`` when it can.

    Readers index these fields without further checks, so a record that parses as JSON but holds the
    wrong types (``"step": null``, ``"global": "oops"``, a list for a record) is refused as a whole."""
    if not isinstance(record, Mapping):
        return f"a {type(record).__name__}, not an object"
    event, run_id = record.get("event"), record.get("run_id")
    if run_id is not None and not isinstance(run_id, (str, int)):
        return f"'run_id' is {type(run_id).__name__}, not a string"
    if event == "start":
        if "step" in record and not _is_step(record["step"]):
            return f"start 'step' is {record['step']!r}, not a non-negative integer"
        if record.get("info") is not None and not isinstance(record["info"], Mapping):
            return f"start 'info' is {type(record['info']).__name__}, not an object"
    elif event == "log":
        if not _is_step(record.get("step")):
            return f"log 'step' is {record.get('step')!r}, not a non-negative integer"
        problem = _table_problem("global", record.get("global"))
        if problem:
            return problem
        for name in GROUP_TABLES:
            groups = record.get(name)
            if groups is None:
                continue
            if not isinstance(groups, Mapping):
                return f"{name!r} is {type(groups).__name__}, not an object"
            for group, table in groups.items():
                problem = _table_problem(f"{name}[{group!r}]", table)
                if problem:
                    return problem
    elif event == "end":
        if record.get("step") is not None and not _is_step(record["step"]):
            return f"end 'step' is {record['step']!r}, not a non-negative integer"
    return None


class RunRecords:
    """Folds run-log records, in file order, into the latest run's state.

    ``info`` (of the run's latest start), ``by_step`` (step -> newest ``log`` record), ``latest`` (the
    ``log`` record appended last), ``end`` (the
    ``end`` record after its latest start, else ``None``) and ``earlier_runs`` (how many other runs the
    file holds). Records without a ``run_id`` (logs written before ids existed) count as one run.

    A ``start`` record at step S drops the same run's records past S: resuming from an earlier checkpoint
    abandons the branch trained after it. Torn lines and records of the wrong shape are skipped
    (:func:`record_problem`), the first with a :class:`RunLogWarning` naming ``source`` and the line.
    """

    def __init__(self, source: str | os.PathLike = "run log"):
        self.source = str(source)
        self.skipped = 0  # records skipped as unreadable
        self._lines = 0
        self._runs: dict[Any, dict[str, Any]] = {}
        self._current: Any = None

    def _run(self, run_id: Any) -> dict[str, Any]:
        return self._runs.setdefault(run_id, {"info": {}, "by_step": {}, "end": None, "latest": None})

    def _skip(self, why: str) -> None:
        self.skipped += 1
        if self.skipped == 1:
            where = f"{self.source}, line {self._lines}" if self._lines else self.source
            warnings.warn(f"gradtrace: {where}: skipped an unreadable record ({why}); "
                          "later ones are skipped silently", RunLogWarning, stacklevel=3)

    def apply_line(self, line: bytes | str) -> bool:
        """Fold one complete line of the file (a torn or ill-typed one is skipped, see :meth:`apply`)."""
        self._lines += 1
        if not line.strip():
            return False
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._skip(f"not JSON, e.g. a line torn by a run killed mid-write: {err}")
            return False
        return self.apply(record)

    def apply(self, record: Any) -> bool:
        """Fold one record; ``True`` if it was a run-log record (and may have changed the latest run)."""
        problem = record_problem(record)
        if problem:
            self._skip(problem)
            return False
        event, run_id = record.get("event"), record.get("run_id")
        if event == "start":
            self._current = run_id
            run = self._run(run_id)
            run["info"], run["end"] = dict(record.get("info") or {}), None
            if "step" in record:
                self._abandon_after(run, record["step"])
        elif event == "log":
            run = self._run(run_id)
            run["by_step"][record["step"]] = run["latest"] = record
        elif event == "end":
            self._run(run_id)["end"] = record
        else:
            return False
        return True

    @staticmethod
    def _abandon_after(run: dict[str, Any], step: int) -> None:
        """Drop the records past ``step``: a restart there continues from its checkpoint, not from them."""
        by_step = run["by_step"]
        for later in [s for s in by_step if s > step]:
            del by_step[later]
        if run["latest"] is not None and run["latest"]["step"] > step:
            run["latest"] = by_step[max(by_step)] if by_step else None

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
    (which holds ``gradtrace/``). A partial last line (a line being written) is ignored; a torn line
    before it, or a record of the wrong shape, is skipped with one :class:`RunLogWarning`.
    """
    given = Path(run_dir_or_file)
    path = given if given.is_file() and given.suffix == ".jsonl" else find_run_dir(given) / LOG_NAME
    records = RunRecords(path)
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # still being written
            records.apply_line(line)
    by_step = records.by_step
    return {"info": records.info, "logs": [by_step[s] for s in sorted(by_step)], "end": records.end,
            "path": str(path), "earlier_runs": records.earlier_runs, "skipped_records": records.skipped}
