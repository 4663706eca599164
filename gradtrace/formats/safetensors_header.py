"""The safetensors header, parsed and checked before one byte of tensor data is trusted.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then the data::

    {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}, "__metadata__": {"format": "pt"}}

``data_offsets`` are ``[begin, end)`` relative to the first data byte. This module holds the one check
of that header used for every checkpoint read, from disk or from the hub, so both refuse the same
files with the same words: a header that is not a JSON object, an entry without ``dtype`` / ``shape``
/ ``data_offsets``, an unknown dtype, a byte range that is not the tensor's size (dtype size × number
of elements), ranges that overlap or leave a hole, a range past the end of the file. Like the
safetensors library itself, the data must be exactly the tensors' bytes laid end to end.

The dtype tables it reads are in :mod:`gradtrace.formats.dtypes`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from gradtrace.formats.dtypes import DTYPE_BITS

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the header size
METADATA_KEY = "__metadata__"

class SafetensorsHeaderError(ValueError):
    """A safetensors header that cannot be trusted; the message names the file (and the tensor)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header; ``begin`` / ``end`` are byte offsets from the first data byte."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def header_length(prefix: bytes, where: str, file_size: int | None = None) -> int:
    """The JSON header's length from a file's first 8 bytes, refused when it cannot be one."""
    if len(prefix) != 8:
        raise SafetensorsHeaderError(f"{where}: not a safetensors file ({len(prefix)} bytes, shorter than "
                                     "the 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix)
    limit = MAX_HEADER_BYTES if file_size is None else min(MAX_HEADER_BYTES, file_size - 8)
    if not 0 < length <= limit:
        size = "" if file_size is None else f" in a file of {file_size} bytes"
        raise SafetensorsHeaderError(f"{where}: not a safetensors file (header length {length}{size})")
    return length


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(raw: bytes, where: str, data_size: int | None = None) -> dict[str, TensorEntry]:
    """``{name: TensorEntry}`` (sorted by name, as safetensors lists them) from a header's JSON bytes.

    ``data_size`` is the number of bytes after the header (file size − 8 − header length) when known;
    then the tensors must end exactly there. Raises :class:`SafetensorsHeaderError` naming ``where``
    and the tensor.
    """
    try:
        header = json.loads(bytes(raw))
    except ValueError as err:  # UnicodeDecodeError is one too
        raise SafetensorsHeaderError(f"{where}: unreadable safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{where}: the safetensors header is a JSON {type(header).__name__}, "
                                     "not an object of tensors")
    entries: dict[str, TensorEntry] = {}
    for name in sorted(header):
        entry = header[name]
        if name == METADATA_KEY:
            if not isinstance(entry, dict):
                raise SafetensorsHeaderError(f"{where}: {METADATA_KEY} is not an object")
            continue
        tensor = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsHeaderError(f"{tensor}: its header entry is not an object")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        if missing:
            raise SafetensorsHeaderError(f"{tensor}: its header entry has no {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise SafetensorsHeaderError(f"{tensor}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise SafetensorsHeaderError(f"{tensor}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise SafetensorsHeaderError(f"{tensor}: data_offsets {offsets!r} are not [begin, end] with "
                                         "0 <= begin <= end")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise SafetensorsHeaderError(
                f"{tensor}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but {dtype}{shape} "
                f"is {bits / 8:g} bytes")
        entries[name] = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    position, previous = 0, None
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = (f"overlaps {previous.name!r} (bytes {previous.begin}-{previous.end})" if entry.begin < position
                    else f"leaves bytes {position}-{entry.begin} unaccounted for")
            raise SafetensorsHeaderError(f"{where}: tensor {entry.name!r} (data_offsets [{entry.begin}, "
                                         f"{entry.end}]) {what}")
        position, previous = entry.end, entry
    if data_size is not None and position != data_size:
        last = f" (tensor {previous.name!r} ends at {position})" if previous else ""
        raise SafetensorsHeaderError(
            f"{where}: the header lays out {position} bytes of tensor data{last} but the file holds "
            f"{data_size}: " + ("it is truncated, or its offsets point past its end" if position > data_size
                                else "bytes follow the last tensor"))
    return entries


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The checked header of a safetensors file on disk (reads the header only, never the data)."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = header_length(handle.read(8), where, size)
            raw = handle.read(length)
    except OSError as err:
        raise SafetensorsHeaderError(f"{where}: cannot read ({err.strerror or err})") from err
    return parse_header(raw, where, size - 8 - length)
