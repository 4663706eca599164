"""The torch kernels of the tracker: any device, any dtype; the reference the NumPy path is held to.

Everything here queues tensor ops on the tensors' devices and never reads a value back to the host.
"""

from __future__ import annotations

import functools

import torch

from gradtrace.tracking.config import TrackerConfig

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. Asynchronous only towards an accelerator: a device-to-host copy with
    ``non_blocking=True`` returns before the data has arrived, and the CPU would read it unsynchronised."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def is_float8(dtype: torch.dtype) -> bool:
    """float8 / float4 formats: no ``isfinite``, no arithmetic, no stable meaning of "storage-dtype delta"."""
    return str(dtype).startswith(("torch.float8", "torch.float4"))


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of equal width, for bitwise comparison."""
    return tensor.view(_INT_VIEW[tensor.element_size()])


@functools.cache
def _inf_bits(dtype: torch.dtype) -> int:
    """The bit pattern of +inf in ``dtype``, as an integer of the same width."""
    return int(torch.tensor(float("inf"), dtype=dtype).view(_INT_VIEW[dtype.itemsize]).item())


def scan_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's gradient in three facts: ``(nonzero, any_nonzero, all_finite)``.

    ``nonzero`` is the elementwise mask ``grad != 0`` and ``any_nonzero`` its ``any()``, NaN/inf counted
    as nonzero (the caller drops a gradient that is not ``all_finite``); the flags are 0-d booleans on
    its device. For IEEE floats it works on the raw bits: with the sign cleared, a value is zero iff its
    bits are 0 and finite iff they are below those of +inf, so one integer mask, one compare and one
    max-reduction do it, several times cheaper than ``isfinite``/``ne`` on bf16, whose float ops
    convert every element.
    """
    width = grad.element_size()
    if not grad.is_floating_point() or width not in (2, 4, 8) or grad.dtype == torch.float8_e4m3fn:
        nonzero = grad.ne(0)
        return nonzero, nonzero.any(), torch.isfinite(grad).all()
    bits = grad.view(_INT_VIEW[width])
    magnitude = bits & torch.iinfo(bits.dtype).max  # clears the sign bit: -0.0 -> 0, -x -> x
    if magnitude.numel() == 0:
        nothing = magnitude.ne(0)
        return nothing, nothing.any(), nothing.all()
    peak = magnitude.amax()
    return magnitude.ne(0), peak.ne(0), peak.lt(_inf_bits(grad.dtype))


def add_sums(sampled: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor], finite: torch.Tensor | None) -> None:
    """Add a gradient's sampled elements to ``(signed, absolute)`` sums, NaN/inf as 0; ``finite`` (a 0-d
    flag) zeroes a dropped gradient."""
    sampled = torch.nan_to_num(sampled.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if finite is not None:
        sampled.mul_(finite)
    sums[0].add_(sampled)
    sums[1].add_(sampled.abs_())


def update_masks(current: torch.Tensor, reference: torch.Tensor, config: TrackerConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(updated, updated_abs, updated_rel)`` of flat ``current`` values against their ``reference`` (on
    the same device): bitwise; beyond ``abs_tolerance`` in the storage dtype (like the paper's script);
    beyond ``rel_tolerance`` of the larger magnitude, in float32."""
    updated = raw_bits(current).ne(raw_bits(reference))
    delta = current - reference  # in the storage dtype, like the paper's script
    updated_abs = delta.abs().le(config.abs_tolerance).logical_not_()
    cur32, ref32 = current.float(), reference.float()
    bound = torch.maximum(cur32.abs(), ref32.abs()).mul_(config.rel_tolerance)
    updated_rel = (cur32 - ref32).abs().le(bound).logical_not_()
    return updated, updated_abs, updated_rel
