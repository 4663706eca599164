"""Dtype tables shared by every reader: safetensors' dtype names, and integer views for bitwise compares.

- ``DTYPE_BITS`` / ``TORCH_NAME``: what each safetensors dtype string (``"BF16"``, ``"F8_E4M3"``…) is.
- :func:`raw_bits`: a tensor's memory viewed as integers of the same width, so that "unchanged" means
  bit-identical (``-0.0`` differs from ``0.0``, a NaN payload from another), never float equality.
"""

from __future__ import annotations

import torch

# Bits per element of each safetensors dtype (the sub-byte ones pack several elements per byte).
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
              "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
              "U32": 32, "U16": 16, "U8": 8, "BOOL": 8}

# torch's name of each dtype torch can hold one element of per stored element (sub-byte ones: none).
TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
              "U16": "uint16", "U8": "uint8", "BOOL": "bool"}

# Integer dtype of each element width in bytes: a tensor viewed as these compares bit for bit.
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def is_float(st_dtype: str) -> bool:
    """``F64`` … ``F4`` and ``BF16`` are floating point; integers and ``BOOL`` are not."""
    return st_dtype.startswith("F") or st_dtype == "BF16"


def torch_dtype(st_dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype, ``None`` when this torch has none for it."""
    name = TORCH_NAME.get(st_dtype)
    return getattr(torch, name, None) if name else None


def itemsize(st_dtype: str) -> float:
    """Bytes per element (a fraction for the sub-byte dtypes); 1 for a dtype not in the table."""
    return DTYPE_BITS.get(st_dtype, 8) / 8


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of equal width, for bitwise comparison."""
    return tensor.view(INT_VIEW[tensor.element_size()])
