"""The masks file: per-parameter boolean masks, bit-packed in safetensors.

Layout (format ``gradtrace.masks/1``):

- one uint8 tensor per (kind, parameter), named ``"{kind}/{parameter name}"``, holding the flattened
  mask packed LSB-first (see :mod:`gradtrace.formats.bitpack`); kinds are e.g. ``"gradient"`` (ever received a
  nonzero gradient) and ``"update"`` (stored value differs bitwise from the start);
- metadata (strings): ``gradtrace_format``; ``params`` (JSON: name -> shape and dtype); ``kinds``
  (JSON list); ``step``; ``info`` (JSON: tracker config, optimizer settings, dtypes...).

Loading never unpickles, and every inconsistency raises :class:`MaskFileError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradtrace.formats.atomic import write_atomic
from gradtrace.formats.bitpack import pack_bits, packed_length, unpack_bits
from gradtrace.formats.run_dir import find_masks_file

FORMAT = "gradtrace.masks/1"
_MAX_ELEMENTS = (1 << 63) - 1  # torch sizes and element counts are int64


def shape_problem(shape: Any) -> str | None:
    """Why ``shape`` cannot be a mask's shape (a list of non-negative integers whose sizes and product of
    nonzero sizes fit torch's int64), or ``None`` if it can."""
    if not isinstance(shape, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        return f"shape must be a list of integers, not {shape!r}"
    if any(s < 0 for s in shape):
        return f"negative size in shape {list(shape)}"
    if math.prod(s for s in shape if s) > _MAX_ELEMENTS:  # a zero size does not make [0, 2**70] valid
        return f"shape {list(shape)} is too large for a tensor (sizes must fit int64)"
    return None


def bits_problem(bits: Any, shape: tuple[int, ...]) -> str | None:
    """Why ``bits`` cannot be the packed mask of ``shape`` (uint8, 1-D, ``packed_length`` bytes), or ``None``."""
    expected = packed_length(math.prod(shape))
    if (not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1
            or bits.numel() != expected):
        got = (f"{bits.numel()} {bits.dtype} values ({bits.dim()}-D)" if isinstance(bits, torch.Tensor)
               else type(bits).__name__)
        return f"has {got}, expected {expected} uint8 bytes (1-D) for shape {list(shape)}"
    return None


class MaskFileError(ValueError):
    """A masks file is missing, corrupt, or not a gradtrace masks file; the message names the file."""


@dataclass(frozen=True)
class PackedMask:
    """A bit-packed mask and the shape it unpacks to."""

    bits: torch.Tensor  # uint8, packed_length(numel) bytes
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> PackedMask:
        return cls(pack_bits(mask).cpu(), tuple(mask.shape))

    def to_bool(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.numel).reshape(self.shape)


class Masks(dict):
    """``{kind: {parameter name: BoolTensor}}`` as read from a masks file, plus the file's metadata."""

    def __init__(self, masks: Mapping[str, Mapping[str, torch.Tensor]], *, step: int | None,
                 info: dict[str, Any], dtypes: dict[str, str], path: str | None = None):
        super().__init__({kind: dict(per_param) for kind, per_param in masks.items()})
        self.step = step
        self.info = info
        self.dtypes = dtypes
        self.path = path

    @property
    def parameter_names(self) -> list[str]:
        return list(next(iter(self.values()), {}).keys())


def save_masks(
    path: str | os.PathLike,
    masks: Mapping[str, Mapping[str, PackedMask | torch.Tensor]],
    *,
    dtypes: Mapping[str, str] | None = None,
    step: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{kind: {name: mask}}`` atomically; masks may be boolean tensors or :class:`PackedMask`.

    Every kind must cover the same parameters with the same shapes. Anything :func:`load_masks` would
    reject (a packed mask of the wrong length or dtype, a shape that is no tensor's, names that collide in
    the file) raises ``ValueError`` naming the mask, before anything is written.
    """
    kinds = list(masks)
    if not kinds:
        raise ValueError("save_masks needs at least one kind of mask")
    if not all(isinstance(kind, str) and kind for kind in kinds):
        raise ValueError(f"mask kinds must be non-empty strings, not {kinds!r}")
    packed = {kind: {name: m if isinstance(m, PackedMask) else PackedMask.from_bool(m)
                     for name, m in per_param.items()} for kind, per_param in masks.items()}
    for kind, per_param in packed.items():
        for name, mask in per_param.items():
            problem = shape_problem(list(mask.shape)) or bits_problem(mask.bits, tuple(mask.shape))
            if not isinstance(name, str) or not name:
                problem = "parameter names must be non-empty strings"
            if problem:
                raise ValueError(f"save_masks: mask {kind}/{name}: {problem}")
    reference = packed[kinds[0]]
    for kind in kinds[1:]:
        if {n: m.shape for n, m in packed[kind].items()} != {n: m.shape for n, m in reference.items()}:
            raise ValueError(f"mask kind {kind!r} covers other parameters or shapes than {kinds[0]!r}")
    dtypes = dict(dtypes or {})
    params = {name: {"shape": list(m.shape), "dtype": str(dtypes.get(name, ""))} for name, m in reference.items()}
    tensors = {f"{kind}/{name}": m.bits.detach().cpu().contiguous() for kind in kinds for name, m in packed[kind].items()}
    if len(tensors) != len(kinds) * len(reference):  # "a/b" + "c" and "a" + "b/c" name the same tensor
        raise ValueError("save_masks: kind and parameter names collide in the file (\"{kind}/{name}\")")
    metadata = {
        "gradtrace_format": FORMAT,
        "params": json.dumps(params),
        "kinds": json.dumps(kinds),
        "step": "" if step is None else str(int(step)),
        "info": json.dumps(dict(info or {}), default=str),
    }
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_packed_masks(path: str | os.PathLike) -> tuple[dict[str, dict[str, PackedMask]], dict[str, Any]]:
    """Read and validate a masks file without unpacking: ``({kind: {name: PackedMask}}, header)``.

    ``header`` has ``step``, ``info`` and ``dtypes``. Raises :class:`MaskFileError` on anything malformed.
    """
    try:  # a run directory (or a Trainer's output_dir) stands for the masks file in it
        path = str(find_masks_file(path))
    except FileNotFoundError as err:
        raise MaskFileError(str(err)) from None

    def fail(problem: str) -> MaskFileError:
        return MaskFileError(f"{path}: {problem}")

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("gradtrace_format") != FORMAT:
                raise fail(f"not a gradtrace masks file (format {metadata.get('gradtrace_format')!r}, "
                           f"expected {FORMAT!r})")
            try:
                params = json.loads(metadata["params"])
                kinds = json.loads(metadata["kinds"])
                info = json.loads(metadata.get("info") or "{}")
                step = int(metadata["step"]) if metadata.get("step") else None
            except (KeyError, ValueError, TypeError) as err:
                raise fail(f"malformed metadata ({err})") from err
            if not isinstance(params, dict) or not isinstance(kinds, list) or not kinds:
                raise fail("malformed metadata (params must be an object, kinds a non-empty list)")
            expected = {f"{kind}/{name}" for kind in kinds for name in params}
            present = set(handle.keys())
            if present != expected:
                missing, extra = sorted(expected - present), sorted(present - expected)
                raise fail(f"tensors do not match the metadata (missing {missing[:3]}, unexpected {extra[:3]})")
            result: dict[str, dict[str, PackedMask]] = {}
            for kind in kinds:
                result[kind] = {}
                for name, spec in params.items():
                    if not isinstance(spec, dict) or "shape" not in spec:
                        raise fail(f"malformed shape for {name!r}")
                    problem = shape_problem(spec["shape"])
                    if problem:
                        raise fail(f"malformed shape for {name!r}: {problem}")
                    shape = tuple(spec["shape"])
                    bits = handle.get_tensor(f"{kind}/{name}")
                    problem = bits_problem(bits, shape)
                    if problem:
                        raise fail(f"mask {kind}/{name} {problem}")
                    result[kind][name] = PackedMask(bits, shape)
    except MaskFileError:
        raise
    except Exception as err:  # safetensors raises several types for truncated or garbled headers
        raise fail(f"unreadable or corrupt safetensors data ({type(err).__name__}: {err})") from err
    dtypes = {name: spec.get("dtype", "") for name, spec in params.items() if isinstance(spec, dict)}
    return result, {"step": step, "info": info, "dtypes": dtypes}


def load_masks(path: str | os.PathLike) -> Masks:
    """Load a masks file: ``{kind: {parameter name: BoolTensor of the parameter's shape}}``.

    Kinds include ``"gradient"`` and ``"update"``; the returned dict also carries ``.step``, ``.info``
    (the run's config) and ``.dtypes``. Raises :class:`MaskFileError` naming the file if it is missing,
    truncated, corrupt or not a gradtrace masks file.
    """
    packed, header = read_packed_masks(path)
    masks = {kind: {name: m.to_bool() for name, m in per_param.items()} for kind, per_param in packed.items()}
    return Masks(masks, step=header["step"], info=header["info"], dtypes=header["dtypes"], path=str(Path(path)))
