"""The files of a gradtrace run directory, by name: what writers create and readers look for."""

from __future__ import annotations

import os
from pathlib import Path

LOG_NAME = "log.jsonl"  # the local run log (gradtrace.formats.run_log)
MASKS_NAME = "masks.safetensors"  # the exported masks (gradtrace.formats.masks_file)
SUMMARY_NAME = "summary.json"  # the final summary with the run's info
STATE_NAME = "tracker_state.safetensors"  # the tracker's state in a checkpoint, to resume from
EARLIER_RUNS_DIR = "earlier-runs"  # where a fresh run moves the masks and summary of the run before it
TRAINER_SUBDIR = "gradtrace"  # the callback's run directory inside a Trainer's output_dir


def find_run_dir(path: str | os.PathLike) -> Path:
    """The gradtrace run directory ``path`` means: the directory itself, the one holding the file given
    (``log.jsonl``, ``summary.json``, ``masks.safetensors``...), or ``<path>/gradtrace`` for a Trainer's
    ``output_dir``. Raises ``FileNotFoundError`` saying what was expected."""
    given = Path(path)
    directory = given.parent if given.is_file() else given
    if (directory / LOG_NAME).is_file():
        return directory
    if (directory / TRAINER_SUBDIR / LOG_NAME).is_file():
        return directory / TRAINER_SUBDIR
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such file or directory")
    raise FileNotFoundError(
        f"{given}: not a gradtrace run: expected a directory holding {LOG_NAME} (the callback writes one to "
        f"<output_dir>/{TRAINER_SUBDIR}, gradtrace.trace() to the directory you give it), or a file in one")


def find_masks_file(path: str | os.PathLike) -> Path:
    """The masks file ``path`` means: the file itself, ``<dir>/masks.safetensors`` of a run directory, or
    ``<dir>/gradtrace/masks.safetensors`` of a Trainer's ``output_dir``. Raises ``FileNotFoundError``
    saying what was expected."""
    given = Path(path)
    if given.is_file():
        return given
    for candidate in (given / MASKS_NAME, given / TRAINER_SUBDIR / MASKS_NAME):
        if candidate.is_file():
            return candidate
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such masks file or run directory")
    raise FileNotFoundError(f"{given}: no {MASKS_NAME} here nor in {given / TRAINER_SUBDIR} (a run writes its "
                            "masks when it finishes, and into each checkpoint's gradtrace/ folder)")
