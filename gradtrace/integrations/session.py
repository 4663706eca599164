"""A traced run: the tracker plus where its results go (run log, sinks, masks, checkpoints).

Integrations (the Trainer callback, the plain-loop helper) drive a :class:`TraceSession`; sinks such as
W&B plug in through the small :class:`~gradtrace.sinks.base.Sink` protocol. Nothing the instrument does may stop training:
a failing sink or write is reported once and skipped, unless ``strict=True`` (tests use it); the run's
:class:`~gradtrace.integrations.failures.Failures` decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gradtrace.formats.atomic import write_atomic, write_json_atomic
from gradtrace.formats.masks_file import save_masks
from gradtrace.formats.run_dir import EARLIER_RUNS_DIR, MASKS_NAME, STATE_NAME, SUMMARY_NAME
from gradtrace.formats.run_log import RunLog
from gradtrace.integrations.failures import Failures
from gradtrace.sinks.base import Sink
from gradtrace.sync.observer import SyncObserver, headline
from gradtrace.tracking.reshard import SavedPart
from gradtrace.tracking.summary import summarize
from gradtrace.tracking.tracker import GradTracker


class TraceSession:
    """Owns a tracker's outputs under ``run_dir``: ``log.jsonl``, ``masks.safetensors``, ``summary.json``."""

    def __init__(self, tracker: GradTracker, run_dir: str | os.PathLike, *, sinks: list[Sink] | None = None,
                 info: dict[str, Any] | None = None, strict: bool = False, is_main_process: bool = True,
                 failures: Failures | None = None):
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.sinks = list(sinks or [])
        # Identifies this run's records and exports: a Trainer's reused output_dir may hold earlier runs.
        # A resumed run takes the id saved with the checkpoint (restore_state).
        self.info = {"run_id": uuid.uuid4().hex[:12], **dict(info or {})}
        # the run's failure policy, shared with the adapter that drives the session (default: its own)
        self.failures = failures if failures is not None else Failures(strict)
        self.is_main_process = is_main_process
        # The world this run started in, kept: after dist.destroy_process_group() the world reads as one
        # process, but the tracker's state is still divided among processes that may be gone.
        self.processes = dist.get_world_size() if several_processes() else 1
        self.run_log = RunLog(self.run_dir) if is_main_process else None
        self.last_summary: dict[str, Any] | None = None
        self._parameter_source: Callable[[], list[tuple[str, Any]]] | None = None
        self.zero_lr_steps = 0  # optimizer steps taken with every param group at lr 0 (warm-up from 0)
        # Tracked parameters whose param group had lr 0 at every step so far: what they received and kept
        # unchanged is reported as zero_lr, not as cancelled or absorbed (tracking.summary).
        self.zero_lr_parameters: set[str] = set(tracker.parameter_names)
        self._parameter_by_name: dict[str, Any] | None = None  # built on the first step with a group at lr 0
        self._parameter_fingerprint: tuple | None = None
        self._parameter_list: list[tuple[str, Any]] | None = None
        # weight-sync budget (gradtrace.sync): per-step changes in the sync dtype; off unless set
        self.sync: SyncObserver | None = None

    @property
    def strict(self) -> bool:
        return self.failures.strict

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    def _append(self, record: dict[str, Any]) -> None:
        if self.run_log is not None:
            self.failures.attempt("runlog", "writing the run log", self.run_log.append,
                                  {**record, "run_id": self.run_id})

    # ------------------------------------------------------------------ the parameter set
    def follow_parameters(self, source: Callable[[], list[tuple[str, Any]]]) -> None:
        """Call ``source()`` (the ``(name, parameter)`` pairs to track, as given to the tracker) before every
        step (:meth:`check_parameters`), so that a parameter set changed mid-run is noticed."""
        self._parameter_source = source
        self._parameter_list = source()
        self._parameter_fingerprint = self._fingerprint(self._parameter_list)

    @staticmethod
    def _fingerprint(named: list[tuple[str, Any]]) -> tuple:
        return tuple((name, id(p), tuple(p.shape), p.dtype, p.requires_grad) for name, p in named)

    def check_parameters(self) -> None:
        """Before a step: track what changed in the parameter set since the last one (new parameters from
        now on, replaced ones continuing their state, resized or recast ones restarting), and say so once."""
        if self._parameter_source is None:
            return
        named = self._parameter_source()
        if named is self._parameter_list:  # a source that says "unchanged" by returning the same list
            return
        self._parameter_list = named
        fingerprint = self._fingerprint(named)
        if fingerprint == self._parameter_fingerprint:
            return
        self._parameter_fingerprint = fingerprint
        changes = self.tracker.compare_parameters(named)
        if not changes:
            return
        step = self.tracker.steps
        before = self.tracker.apply_parameter_changes(changes)
        self.restart_sync(step, parameters_changed=True)
        self._parameter_by_name = None  # rebound or new tensors
        self.zero_lr_parameters |= {name for name, _ in [*changes.added, *changes.restarted]}  # no step yet
        record: dict[str, Any] = {"step": step, **changes.describe()}
        if before and self.is_main_process:
            path = self.run_dir / f"before-step-{step + 1}" / MASKS_NAME
            record["masks_before"] = str(path)
            self.failures.attempt(f"before-{step}", f"saving the masks gathered before step {step + 1}",
                                  lambda: save_masks(path, {"gradient": before}, step=step, info=self.info))
        self.info.setdefault("parameter_changes", []).append(record)
        self._append({"event": "parameters", "time": time.time(), **record})
        said = {"added": "now tracked from this step on", "rebound": "replaced by a tensor of the same shape: "
                "their masks continue", "restarted": "changed shape or dtype: their masks restart from the "
                "current values" + (f", the gradient masks gathered so far are in {record['masks_before']}"
                                    if before else "")}
        for kind, names in changes.describe().items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self.failures.warn_once(f"parameters-{kind}-{step}", f"before optimizer step {step + 1} the "
                                    f"trainable parameters changed: {shown} {said[kind]}")

    def note_learning_rates(self, groups: list[tuple[float, list[Any]]]) -> None:
        """Before a step: the ``(lr, parameters)`` of each param group it will use. A parameter stepped at
        lr 0 is not changed by that step, so while every step so far was one for it, what it received and
        kept unchanged was not "absorbed by rounding" nor "cancelled": it is reported as ``zero_lr``. Steps
        at lr 0 in every group are also counted (``zero_lr_steps``; a warm-up from 0)."""
        if groups and all(lr == 0 for lr, _ in groups):
            self.zero_lr_steps += 1
        if not self.zero_lr_parameters:
            return
        if all(lr != 0 for lr, _ in groups):  # the common case: no per-parameter work
            self.zero_lr_parameters.clear()
            return
        # Only the parameters still at lr 0 so far are looked at (usually a small, shrinking set); one held by
        # no group at lr 0 (a positive-lr group, or master copies the model does not hold) has been stepped.
        at_zero = {id(p) for lr, params in groups if lr == 0 for p in params}
        if self._parameter_by_name is None:
            self._parameter_by_name = dict(self.tracker.named_parameters())
        self.zero_lr_parameters = {name for name in self.zero_lr_parameters
                                   if id(self._parameter_by_name.get(name)) in at_zero}

    def _with_zero_lr_steps(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary["global"]["zero_lr_steps"] = self.zero_lr_steps
        return summary

    # ------------------------------------------------------------------ weight-sync budget
    def observe_sync(self) -> None:
        """After an optimizer step: what it changed in the sync dtype (if ``sync`` is set). On failure
        warn once and stop observing (its state no longer matches the weights); training goes on."""
        if self.sync is None:
            return
        self.failures.attempt("sync", "the weight-sync observer", self.sync.observe, dropped=self._drop_sync,
                              consequence="it is switched off, training and the rest of the tracking continue")

    def _drop_sync(self) -> None:
        self.sync = None  # its state no longer matches the weights

    def restart_sync(self, step: int, *, parameters_changed: bool = False) -> None:
        """The weights now are those after global step ``step`` (the run starts or resumes, or the tracked
        parameters changed before the next step): the observer copies them afresh, over the parameters
        tracked now, so that it never compares against a stale copy; its windows stay on global steps."""
        if self.sync is None:
            return
        named = self.tracker.named_parameters() if parameters_changed else None
        self.failures.attempt("sync", "the weight-sync observer", self.sync.restart, step, named,
                              dropped=self._drop_sync,
                              consequence="it is switched off, training and the rest of the tracking continue")

    def _with_sync(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Add the ``sync`` section (per-step / per-window fractions and bytes) and its headline curves."""
        if self.sync is not None:
            section = self.failures.attempt("sync-summary", "summarizing the weight-sync budget", self.sync.summary)
            if section is not None:
                summary["sync"] = section
                summary["global"].update(headline(section))
        return summary

    # ------------------------------------------------------------------ events
    def start(self, *, step: int = 0, resumed_from: str | None = None) -> None:
        self.restart_sync(step)  # a resumed run's first step is compared with the weights it resumed
        record = {"event": "start", "time": time.time(), "step": step, "info": self.info}
        if resumed_from:
            record["resumed_from"] = resumed_from
        self._append(record)

    def log(self, step: int) -> dict[str, Any]:
        """Measure now (one host sync), append to the run log and send to every sink."""
        summary = self._with_zero_lr_steps(summarize(self.tracker.measure(), step=step,
                                                     zero_lr=self.zero_lr_parameters))
        summary = self._with_sync(summary)
        self.last_summary = summary
        if not self.is_main_process:
            return summary
        self._append({"event": "log", "time": time.time(), **summary})
        for sink in list(self.sinks):
            self.failures.attempt(f"sink-{sink.name}", f"{sink.name} logging", sink.log, summary, step,
                                  dropped=lambda sink=sink: self.sinks.remove(sink),
                                  consequence=f"it is switched off, the local run log in {self.run_dir} goes on")
        return summary

    def export(self, directory: str | os.PathLike | None = None, *, step: int,
               interrupted: str | None = None) -> Path | None:
        """Write ``masks.safetensors`` and ``summary.json`` (atomically) into ``directory`` or the run dir.

        Every rank must call it (for sharded parameters it gathers the masks); the main process writes.
        """
        target = Path(directory) if directory is not None else self.run_dir
        summary = self.last_summary if self.last_summary and self.last_summary["step"] == step else self.log(step)
        masks = self.tracker.packed_masks()
        if not self.is_main_process:
            return None

        def write() -> Path:
            self._keep_earlier_run(target)
            path = target / MASKS_NAME
            save_masks(path, masks, dtypes=self.tracker.dtypes(), step=step, info=self.info)
            marked = {"interrupted": True, "interrupted_by": interrupted} if interrupted else {}
            write_json_atomic(target / SUMMARY_NAME, {"info": self.info, **summary, **marked})
            return path

        return self.failures.attempt(f"export-{target}", f"writing masks to {target}", write)

    def _keep_earlier_run(self, directory: Path) -> None:
        """Move the masks and summary of another run out of ``directory`` before this run writes its own.

        A second ``trainer.train()`` into the same ``output_dir`` must not silently replace the first's
        masks: they go to ``earlier-runs/<run id>/``, with one warning saying where.
        """
        summary_path = directory / SUMMARY_NAME
        try:
            earlier = json.loads(summary_path.read_text(encoding="utf-8")).get("info", {}).get("run_id")
        except (OSError, ValueError, AttributeError):
            earlier = None  # no summary (or not ours): nothing to tell apart
        if not summary_path.is_file() or earlier == self.run_id:
            return
        keep = directory / EARLIER_RUNS_DIR / str(earlier or f"before-{self.run_id}")
        keep.mkdir(parents=True, exist_ok=True)
        for name in (MASKS_NAME, SUMMARY_NAME):
            if (directory / name).is_file():
                shutil.move(str(directory / name), str(keep / name))
        self.failures.warn_once(f"earlier-{directory}", f"{directory} held the masks of an earlier run "
                                f"({earlier or 'unknown id'}); they were moved to {keep}, this run writes its own")

    @staticmethod
    def state_path(directory: str | os.PathLike) -> Path:
        """This rank's tracker-state file in ``directory``: one per rank, since under FSDP2 each holds
        only its own shards (``tracker_state.safetensors`` in a single process)."""
        if several_processes():
            rank, world = dist.get_rank(), dist.get_world_size()
            return Path(directory) / STATE_NAME.replace(".safetensors", f"-rank{rank}-of-{world}.safetensors")
        return Path(directory) / STATE_NAME

    def save_state(self, directory: str | os.PathLike, *, step: int) -> None:
        """Save everything needed to resume into ``directory`` (with the masks, for inspection)."""
        path = self.state_path(directory)

        def write() -> None:
            tensors = self.tracker.state_tensors()
            # what part of each parameter this rank kept, so that another number of ranks can resume
            layout = self.tracker.layout()
            metadata = {"step": str(step), "run_id": self.run_id, "zero_lr_steps": str(self.zero_lr_steps),
                        "zero_lr_parameters": json.dumps(sorted(self.zero_lr_parameters)),
                        "counts_summed": str(int(self.tracker.counts_summed))}
            if layout is not None:
                metadata["layout"] = json.dumps(layout)
            fingerprint = weights_fingerprint(self.tracker)
            if fingerprint is not None:
                metadata["weights_fingerprint"] = fingerprint
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

        self.failures.attempt("save-state", f"saving tracker state to {path}", write)
        self.export(directory, step=step)

    def restore_state(self, directory: str | os.PathLike, *, weights_from: str | None = None,
                      step: int | None = None) -> None:
        """Load the state :meth:`save_state` wrote. Raises if it is missing or belongs to another model.

        ``weights_from``: the checkpoint the model's weights were just loaded from; then the state must have
        been saved with exactly these weights (and at ``step``, if given), else it is another run's and
        is refused (nothing is loaded): continuing from it would give wrong masks without a sign.

        Elastic: state saved by another number of processes (or with tracking split differently) is
        re-cut for this rank from all the saved ranks' files (:meth:`GradTracker.load_resharded`)."""
        path = self.state_path(directory)
        metadata = _metadata(path) if path.is_file() else None
        if metadata is not None and weights_from is not None:
            _check_same_checkpoint(path, metadata, self.tracker, weights_from, step)
        layout = self.tracker.layout()
        if metadata is not None and (layout is None or "layout" not in metadata
                                     or _as_layout(metadata["layout"]) == layout):
            self.tracker.load_state_tensors(load_file(str(path)), source=str(path))
        else:
            files = _saved_state_files(Path(directory))
            if not files:
                raise FileNotFoundError(f"{path}: no gradtrace tracker state in this checkpoint, so the masks "
                                        "cannot continue from it")
            parts = []
            for file in files:
                saved = _metadata(file)
                if "layout" not in saved:
                    raise ValueError(f"{file}: saved without its layout (by an older gradtrace, or from shards "
                                     "that are no contiguous runs): it can be resumed only by the same ranks")
                parts.append(SavedPart(load_file(str(file)), _as_layout(saved["layout"]),
                                       saved.get("counts_summed") == "1", str(file)))
            self.tracker.load_resharded(parts)
            metadata = _metadata(files[0])
        saved_id = metadata.get("run_id")
        self.zero_lr_steps = int(metadata.get("zero_lr_steps") or 0)
        saved_zero_lr = metadata.get("zero_lr_parameters")  # absent in states saved before it existed
        if saved_zero_lr is not None:
            self.zero_lr_parameters = set(json.loads(saved_zero_lr)) & set(self.tracker.parameter_names)
        elif self.zero_lr_steps < self.tracker.steps:
            self.zero_lr_parameters = set()
        if saved_id:
            self.info["run_id"] = saved_id  # the resumed run continues its own log and exports

    def finish(self, step: int, *, interrupted: str | None = None) -> Path | None:
        """Final measurement and export; tells each sink the run ended.

        ``interrupted``: why training stopped before its end (an exception, ``KeyboardInterrupt``); the
        masks of the steps taken are written all the same, and the summary and ``end`` record say so."""
        masks_path = self.export(step=step, interrupted=interrupted)
        if not self.is_main_process:
            return masks_path
        summary = self.last_summary or {}
        marked = {"interrupted": True, "interrupted_by": interrupted} if interrupted else {}
        self._append({"event": "end", "time": time.time(), "step": step,
                      "masks": str(masks_path) if masks_path else None, **marked})
        for sink in list(self.sinks):
            self.failures.attempt(f"sink-{sink.name}-finish", f"{sink.name} finish", sink.finish, summary, self.run_dir)
        return masks_path


def interruption() -> str:
    """Why the process is exiting early, as said at exit: the uncaught exception, if there is one."""
    err = getattr(sys, "last_value", None)  # set by the interpreter for an uncaught exception
    return f"{type(err).__name__}: {err}" if err is not None else "the process exited before training ended"


def several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def weights_fingerprint(tracker: GradTracker) -> str | None:
    """A hash of the tracked parameters' names, shapes, dtypes and of the raw bits of their values (one
    64-bit sum per parameter, read from the host once): tells apart the weights of two checkpoints.
    ``None`` with several processes, where each holds another part (an elastic resume re-cuts them)."""
    if several_processes():
        return None
    named = tracker.named_parameters()
    with torch.no_grad():
        sums = [p.detach().reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
            p.element_size()]).sum(dtype=torch.int64).cpu() for _, p in named]
    digest = hashlib.sha256()
    for (name, param), value in zip(named, sums, strict=True):
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{int(value)};".encode())
    return digest.hexdigest()[:32]


def _check_same_checkpoint(path: Path, metadata: dict[str, str], tracker: GradTracker, checkpoint: str,
                           step: int | None) -> None:
    """Refuse tracker state saved with other weights (or at another step) than the checkpoint resumed."""
    saved_step = metadata.get("step")
    if step is not None and saved_step is not None and int(saved_step) != step:
        raise ValueError(f"{path}: tracker state of step {saved_step}, but the Trainer resumed step {step} "
                         f"from {checkpoint}: it belongs to another checkpoint")
    saved = metadata.get("weights_fingerprint")
    current = weights_fingerprint(tracker) if saved else None
    if saved and current and saved != current:
        raise ValueError(f"{path}: this tracker state was saved with other weights than those the Trainer "
                         f"resumed from {checkpoint} (run {metadata.get('run_id', '?')}): it belongs to "
                         "another run's checkpoint, and continuing from it would give wrong masks")


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _as_layout(text: str) -> dict[str, tuple[int, int]]:
    return {name: (int(start), int(length)) for name, (start, length) in json.loads(text).items()}


def _saved_state_files(directory: Path) -> list[Path]:
    """Every rank's tracker-state file of the one run saved in ``directory``, rank 0 first."""
    single = directory / STATE_NAME
    stem = STATE_NAME.removesuffix(".safetensors")
    ranked = sorted(directory.glob(f"{stem}-rank*-of-*.safetensors"))
    worlds = {file.stem.rsplit("-of-", 1)[1] for file in ranked}
    if (single.is_file() and ranked) or len(worlds) > 1:
        raise ValueError(f"{directory} holds tracker states saved by different numbers of processes "
                         f"({sorted(worlds | ({'1'} if single.is_file() else set()))}): which one to resume?")
    if single.is_file():
        return [single]
    if not ranked:
        return []
    world = int(worlds.pop())
    files = [directory / f"{stem}-rank{rank}-of-{world}.safetensors" for rank in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: the tracker state of {len(missing)} of {world} ranks is missing "
                                f"({missing[:3]})")
    return files
