"""Where a checkpoint's tensors come from, as the comparison loop sees them: :class:`TensorSource`.

A local ``.safetensors`` file or Hugging Face model folder is a :class:`LocalSource`; a hub repo is a
:class:`gradtrace.masks.hub.HubSource`. Both take every tensor's name, dtype and shape from headers
checked by :func:`gradtrace.formats.safetensors_header.parse_header`, so a file is refused with the
same words wherever it is read from. This module sits below both :mod:`.diff` and :mod:`.hub`, which
import it and not each other (the diff opens the hub module lazily, only for a hub id).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from gradtrace.formats.dtypes import is_float, itemsize
from gradtrace.formats.safetensors_header import SafetensorsHeaderError, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"


class CheckpointDiffError(ValueError):
    """Two checkpoints cannot be compared (missing file, different names, shapes or dtypes)."""


def checkpoint_index(path: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name of a checkpoint to the ``.safetensors`` file holding it.

    ``path`` is a ``.safetensors`` file or a folder with one, several (then their names must not
    overlap) or a ``model.safetensors.index.json`` listing shards.
    """
    root = Path(path)
    if root.is_file():
        return {name: root for name in _header_of(root)}
    if not root.is_dir():
        raise CheckpointDiffError(f"{root}: no such checkpoint (expected a folder or a .safetensors file)")
    indexes = sorted(root.glob("*.safetensors.index.json"))
    if indexes:
        index = root / INDEX_NAME if (root / INDEX_NAME).exists() else indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            mapping = {str(name): root / str(file) for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointDiffError(f"{index}: unreadable shard index ({err})") from err
        for file in sorted(set(mapping.values())):
            if not file.is_file():
                raise CheckpointDiffError(f"{index}: lists shard {file.name}, which does not exist")
        return mapping
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in root.iterdir())[:8]
        raise CheckpointDiffError(f"{root}: no *.safetensors file in this folder (found {found}); "
                                  "convert .bin checkpoints with save_pretrained(safe_serialization=True)")
    mapping = {}
    for file in files:
        for name in _header_of(file):
            if name in mapping:
                raise CheckpointDiffError(f"{root}: tensor {name!r} is in both {mapping[name].name} and "
                                          f"{file.name} (add a {INDEX_NAME} to say which is meant)")
            mapping[name] = file
    return mapping


def _header_of(file: Path) -> dict[str, TensorEntry]:
    try:
        return read_header(file)
    except SafetensorsHeaderError as err:
        raise CheckpointDiffError(f"not a readable safetensors file: {err}") from err


@dataclass(frozen=True)
class TensorSpec:
    """A tensor both checkpoints hold, as read from their headers (no data read)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling, e.g. "BF16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of its data in one checkpoint."""
        return int(self.numel * itemsize(self.dtype))

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)


class TensorSource(Protocol):
    """Where one checkpoint's tensors come from: a local folder or file (:class:`LocalSource`) or a hub
    repo read with HTTP range requests (:class:`gradtrace.masks.hub.HubSource`). The comparison loop
    sees only this."""

    label: str  # as the user named it ("path/to/ckpt", "org/name@rev"): the key of the results
    identity: str  # what it resolved to (absolute path, "org/name@<commit>"): keys resume state, masks info
    streamed: bool  # reads cost a network round trip, so the next tensor is worth reading ahead
    bytes_read: int  # bytes of tensor data read so far

    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor's name, shape and dtype, from the headers alone."""
        ...

    def config(self) -> dict[str, Any] | None:
        """The checkpoint's ``config.json`` (``None`` when it has none)."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, on the source's device."""
        ...


class LocalSource:
    """A checkpoint on disk: a ``.safetensors`` file or a Hugging Face model folder.

    Each :meth:`read` opens the shard afresh and closes it at once: a tensor from ``safe_open`` is a
    view of the file's memory map, and pages read through a handle kept open stay resident until it
    closes (measured: +1 tensor per tensor read), whereas a closed handle's tensor releases its pages
    when the tensor is freed.
    """

    streamed = False

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", label: str | None = None,
                 identity: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.identity = identity or str(self.path.resolve())
        self.device = device
        self.bytes_read = 0
        self._files = checkpoint_index(self.path)
        self._specs: dict[str, TensorSpec] | None = None

    def specs(self) -> dict[str, TensorSpec]:
        if self._specs is None:
            headers = {file: _header_of(file) for file in sorted(set(self._files.values()))}
            specs = {}
            for name, file in self._files.items():
                entry = headers[file].get(name)
                if entry is None:
                    raise CheckpointDiffError(f"{self.label}: the shard index puts tensor {name!r} in {file.name}, "
                                              "which does not hold it")
                specs[name] = TensorSpec(name, entry.shape, entry.dtype)
            self._specs = specs
        return self._specs

    def config(self) -> dict[str, Any] | None:
        file = self.path / "config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointDiffError(f"{file}: unreadable ({err})") from err

    def _open(self, file: Path) -> Any:
        try:
            return safe_open(str(file), framework="pt", device=self.device)
        except Exception as err:  # safetensors raises several exception types for unreadable files
            raise CheckpointDiffError(f"{file}: cannot open ({type(err).__name__}: {err})") from err

    def read(self, name: str) -> torch.Tensor:
        file = self._files[name]
        try:
            with self._open(file) as handle:
                tensor = handle.get_tensor(name)
        except CheckpointDiffError:
            raise
        except Exception as err:
            raise CheckpointDiffError(f"{file}: cannot read tensor {name!r} ({type(err).__name__}: {err})") from err
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor
