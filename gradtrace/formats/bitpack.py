"""Bit-packed boolean masks: 1 bit per element, stored as uint8, least significant bit first.

The layout is numpy's ``packbits(..., bitorder="little")`` on the flattened tensor, so element ``i``
lives in byte ``i // 8`` at bit ``i % 8``. Packing runs on the mask's own device with a handful of
tensor ops and no host synchronisation, so it can sit in the per-step hot path.
"""

from __future__ import annotations

import numpy as np
import torch

# Multiplying eight 0/1 bytes, read as one little-endian int64, by this constant moves byte k's bit to
# bit 56 + k with no two partial products overlapping (so no carries): the top byte is the packed byte.
_GATHER_MAGIC = 0x0102040810204080
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT_TABLE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def packed_length(numel: int) -> int:
    """Bytes needed to hold ``numel`` bits."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor of any shape into ``packed_length(mask.numel())`` uint8 bytes."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    tail = flat.numel() % 8
    if tail:
        flat = torch.cat([flat, flat.new_zeros(8 - tail)])
    flat = flat.contiguous()
    if flat.storage_offset() % 8:  # viewing bytes as int64 needs an 8-aligned start (a bool slice may not be)
        flat = flat.clone()
    words = flat.view(torch.uint8).view(torch.int64)
    return (words * _GATHER_MAGIC).bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def or_pack_into(packed: torch.Tensor, mask: torch.Tensor) -> None:
    """``packed |= pack_bits(mask)``, in place: accumulate "ever true" across calls."""
    packed.bitwise_or_(pack_bits(mask))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat boolean tensor of ``numel`` elements."""
    shifts = _BIT_SHIFTS.to(packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits, as a 0-d int64 tensor on ``packed``'s device (no host sync)."""
    if packed.device.type == "cpu":  # NumPy's popcount instruction; the table lookup widens every byte
        return torch.tensor(count_set_bits(packed.reshape(-1).numpy()), dtype=torch.int64)
    table = _POPCOUNT_TABLE.to(packed.device)
    return table[packed.long()].sum(dtype=torch.int64)


def count_set_bits(packed: np.ndarray) -> int:
    """Set bits in a uint8 array, counted on 64-bit words where it can."""
    words = packed.size // 8
    total = int(np.bitwise_count(packed[:words * 8].view(np.uint64)).sum(dtype=np.int64)) if words else 0
    if packed.size % 8:
        total += int(np.bitwise_count(packed[words * 8:]).sum(dtype=np.int64))
    return total
