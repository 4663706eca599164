"""Read back what an offline W&B run wrote: the ``run-<id>.wandb`` transaction log.

wandb >= 0.2x ships no Python reader, so the tests read the file themselves. Format (checked on files
written by wandb 0.31):

- a 7-byte header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0`` (uint8);
- then a LevelDB-log-format stream in 32 KiB blocks (offsets counted from the start of the file, header
  included). Each chunk: CRC (uint32 LE), length (uint16 LE), type (uint8: FULL=1, FIRST=2, MIDDLE=3,
  LAST=4), data. The CRC is zlib's CRC-32 of the type byte followed by the data (not LevelDB's masked
  CRC-32C). A block's trailing < 7 bytes are zero padding;
- each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Logged media (images, tables) are files under ``files/`` referenced from history entries with ``_type``.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B transaction log, or is damaged."""


def find_run_file(root: str | os.PathLike) -> Path:
    """The single ``wandb/offline-run-*/run-*.wandb`` under ``root`` (the ``dir=`` / ``WANDB_DIR``)."""
    found = sorted(Path(root).glob("wandb/offline-run-*/run-*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one offline run under {root}/wandb, found {[str(f) for f in found]}")
    return found[0]


def iter_chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(type, payload)`` of every chunk after the header, checking each CRC."""
    if data[:len(HEADER)] != HEADER:
        raise WandbFileError(f"bad header {data[:len(HEADER)]!r}, expected {HEADER!r}")
    pos = len(HEADER)
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:
            pos += left  # block trailer: zero padding
            continue
        if pos + CHUNK_HEADER > len(data):
            raise WandbFileError(f"truncated chunk header at offset {pos}")
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if crc == 0 and length == 0 and kind == 0:
            pos += left  # zero-filled rest of a block (preallocated, not yet written)
            continue
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if len(payload) != length:
            raise WandbFileError(f"truncated chunk at offset {pos}")
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise WandbFileError(f"CRC mismatch at offset {pos}")
        yield kind, payload
        pos += CHUNK_HEADER + length


def iter_records(path: str | os.PathLike, chunk_types: list[int] | None = None) -> Iterator[pb.Record]:
    """Every ``Record`` in the file, reassembling records split over blocks (FIRST, MIDDLE..., LAST).

    ``chunk_types``, if given, collects the type of every chunk seen (to check that split records occurred).
    """
    pending: bytes | None = None
    for kind, payload in iter_chunks(Path(path).read_bytes()):
        if chunk_types is not None:
            chunk_types.append(kind)
        if kind == FULL:
            whole = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE and pending is not None:
            pending += payload
            continue
        elif kind == LAST and pending is not None:
            whole, pending = pending + payload, None
        else:
            raise WandbFileError(f"unexpected chunk type {kind}")
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def _set(target: dict[str, Any], item: Any) -> None:
    """Apply one ``HistoryItem`` / ``SummaryItem``: ``key`` or a ``nested_key`` path, JSON value."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class WandbRun:
    """What one offline run recorded."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per wandb.log row
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # paths relative to files_dir
    metrics: list[dict[str, Any]] = field(default_factory=list)  # define_metric records
    chunk_types: list[int] = field(default_factory=list)

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def load_file(self, relative: str) -> bytes:
        return (self.files_dir / relative).read_bytes()


def read_run(root_or_file: str | os.PathLike, *, timeout: float = 30.0) -> WandbRun:
    """Parse history, summary, artifact, files and metric records of a finished offline run.

    ``wandb.finish()`` can return before the writer process has flushed the file (seen with wandb 0.31:
    a 7-byte file right after ``finish()``, the whole run a moment later), so this waits up to
    ``timeout`` seconds for the run's ``exit`` record; records are written in order, so everything
    logged before ``finish()`` precedes it.
    """
    path = Path(root_or_file)
    if path.is_dir():
        path = find_run_file(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(iter_records(path))
        except WandbFileError:
            records = []  # a chunk still being written
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s; was wandb.finish() called?")
        time.sleep(0.05)
    run = WandbRun(path)
    for record in iter_records(path, run.chunk_types):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, item)
            for item in record.summary.remove:
                run.summary.pop(list(item.nested_key)[0] if item.nested_key else item.key, None)
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append({
                "name": artifact.name, "type": artifact.type, "aliases": list(artifact.aliases),
                "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                "files": {entry.path: {"size": entry.size, "digest": entry.digest, "local_path": entry.local_path}
                          for entry in artifact.manifest.contents},
            })
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files)
        elif kind == "metric":
            metric = record.metric
            run.metrics.append({"name": metric.name, "glob_name": metric.glob_name,
                                "step_metric": metric.step_metric})
    return run
