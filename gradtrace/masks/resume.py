"""Resume state of an interrupted diff: the tensors already compared, one JSON line each.

A diff of two 671B-parameter hub checkpoints reads ~1.3 TB; a dropped connection after the retries
must not cost what was already read. After each tensor, its unchanged counts (and, when masks are
written, its bit-packed masks, base64) are appended as one line and flushed. Appending one line is
the atomic step: a line cut short by a crash does not parse and is ignored on resume, so that tensor
is simply compared again. The first line is a key (both checkpoints as resolved — a hub revision
pinned to its commit — and the criteria); a state file written for another diff is refused by name.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gradtrace.formats.masks_file import PackedMask


class ResumeStateError(ValueError):
    """A resume file belongs to another diff or cannot be read."""


class ResumeState:
    """Append-only record of finished tensors at ``path``, for the diff identified by ``key``."""

    def __init__(self, path: str | os.PathLike, key: Mapping[str, Any]):
        self.path = Path(path)
        self.key = dict(key)

    def load(self) -> dict[str, tuple[dict[str, int], dict[str, PackedMask]]]:
        """``{tensor: (counts, masks)}`` already finished (empty when there is no state yet)."""
        if not self.path.exists():
            return {}
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # cut short by a crash: later appends start on a fresh line
            with open(self.path, "a") as handle:
                handle.write("\n")
        lines = text.splitlines()
        try:
            first = json.loads(lines[0]) if lines else {}
        except ValueError:
            first = {}
        if first.get("key") != self.key:
            raise ResumeStateError(f"{self.path}: resume state of another diff ({first.get('key')}); this one is "
                                   f"{self.key}. Delete the file or name another one with --resume")
        done: dict[str, tuple[dict[str, int], dict[str, PackedMask]]] = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:  # the line a crash cut short: that tensor is compared again
                continue
            masks = {kind: PackedMask(torch.frombuffer(bytearray(base64.b64decode(bits)), dtype=torch.uint8),
                                      tuple(entry["shape"]))
                     for kind, bits in entry.get("masks", {}).items()}
            done[entry["name"]] = ({k: int(v) for k, v in entry["counts"].items()}, masks)
        return done

    def append(self, name: str, shape: tuple[int, ...], counts: Mapping[str, int],
               masks: Mapping[str, PackedMask]) -> None:
        """Record one finished tensor (the key line first, if the file is new)."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        entry = {"name": name, "shape": list(shape), "counts": dict(counts),
                 "masks": {kind: base64.b64encode(m.bits.numpy().tobytes()).decode() for kind, m in masks.items()}}
        with open(self.path, "a") as handle:
            if new:
                handle.write(json.dumps({"key": self.key}) + "\n")
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        """The diff finished: its result is the output, the state is no longer needed."""
        self.path.unlink(missing_ok=True)
