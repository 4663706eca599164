"""The CPU fast path of the tracker's per-step work: NumPy, one cache-sized chunk at a time.

On the CPU, torch's boolean kernels are several times slower than NumPy's, and every full-size
temporary is a fresh allocation whose pages fault in on first touch. So a CPU gradient is read once, in
chunks whose temporaries stay in the core's cache. Per chunk, on the raw bits of the IEEE floats: one
integer mask clearing the sign bit (then a value is zero iff its bits are 0, and finite iff they are
below those of +inf), one max-reduction, one compare and ``numpy.packbits`` (its ``bitorder="little"``
is gradtrace's layout, see :mod:`gradtrace.formats.bitpack`), and the copy of the elements that carry gradient
sums. A parameter whose bitmap is already full (every element has had a gradient, as for most weight
matrices after the first step) skips the compare and the packing.

A gradient holding any NaN/inf contributes nothing (the tracker's rule), which is only known once the
whole tensor is read: the packed bits and the sampled values go to scratch buffers first and are folded
into the state after the last chunk. Results are bit-identical to the torch path; tests/tracking/test_tracker.py
compares the two on edge values and chunk boundaries. :meth:`CpuScanner.fold_changes` does the same for
the exact per-step change detector of ``ever_changed`` mode (:meth:`GradTracker.observe_update`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

# Elements per chunk: 128 Ki elements keep a chunk's working set (its bits, their magnitudes, the booleans:
# 640 KiB for bf16, 1.1 MiB for float32) inside a core's L2 cache (2 MiB on the machine this was tuned on);
# larger chunks spill, smaller ones pay more Python per element.
# A multiple of 8, so every chunk but a parameter's last packs into whole bytes.
CHUNK_ELEMENTS = 1 << 17

# Gradient dtypes this path handles: their raw-bits integer type and the bits of +inf. float64 goes the
# torch path: casting a huge finite float64 to the float32 sums would make an inf the torch path zeroes.
RAW_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}
_SIGN_CLEARED = {2: 0x7FFF, 4: 0x7FFFFFFF}  # by element size: every bit but the sign


def supports(grad: torch.Tensor) -> bool:
    """Whether ``grad`` can take this path: a dense, contiguous, non-empty CPU bf16/fp16/fp32 tensor.

    Also for parameter values (:meth:`CpuScanner.fold_changes`). Only numeric shifts and masks touch the
    raw bits here, so byte order does not matter (unlike :func:`gradtrace.formats.bitpack.pack_bits`).
    """
    return (grad.device.type == "cpu" and grad.dtype in RAW_BITS and grad.layout == torch.strided
            and grad.is_contiguous() and grad.numel() > 0)


class Folded(NamedTuple):
    """What one gradient told the tracker (all host values: the CPU path never needs a device sync)."""

    any_nonzero: bool  # some element is nonzero (NaN/inf count as nonzero)
    finite: bool  # every element is finite; if not, nothing was folded into the state
    nonzero: int | None  # nonzero elements this step, when counted
    full: bool  # the bitmap now has every element's bit set


def _as_float32(raw: np.ndarray, dtype: torch.dtype, out: np.ndarray) -> None:
    """Write the values whose raw bits are ``raw`` (a strided view) into float32 ``out``, exactly."""
    if dtype == torch.bfloat16:  # bfloat16 is the top half of a float32: shift the bits into place
        np.left_shift(raw, 16, out=out.view(np.int32), dtype=np.int32)
    elif dtype == torch.float16:
        out[:] = raw.view(np.float16)
    else:
        out[:] = raw.view(np.float32)


def _finite_and_nonzero(grad: torch.Tensor) -> bool:
    """``True`` only if every element of ``grad`` is finite and some element is nonzero; ``False`` means "not
    known": the exact pass decides. IEEE arithmetic carries any NaN or inf into the sum; a finite sum that
    overflows, or one that is zero (all zeros, or values that cancel), gives ``False`` as well."""
    total = float(torch.sum(grad))
    return total != 0 and math.isfinite(total)


class ScratchBuffers:
    """Reusable NumPy buffers, one per use and dtype, grown to the largest request: the fast paths'
    temporaries, so that a step allocates (and page-faults in) nothing once the first one has run."""

    def __init__(self):
        self._buffers: dict[tuple[str, Any], np.ndarray] = {}

    def get(self, use: str, size: int, dtype: type) -> np.ndarray:
        # Keyed by dtype too, so a model mixing bf16 and fp32 parameters does not reallocate. A tuple, not a
        # formatted name: np.dtype(...).name costs microseconds, and this runs a few times per parameter per step.
        key = (use, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[key] = np.empty(size, dtype)
        return buffer[:size]


class CpuScanner:
    """Folds CPU gradients into packed bitmaps and gradient sums; owns the reusable scratch buffers.

    Scratch grows to the largest parameter seen: ``numel / 8`` bytes of packed bits and, in sampled mode,
    ``4 * numel / stride`` bytes of sampled values, plus a few chunk-sized buffers.
    """

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS):
        if chunk_elements <= 0 or chunk_elements % 8:
            raise ValueError(f"chunk_elements must be a positive multiple of 8, not {chunk_elements}")
        self.chunk = chunk_elements
        self._scratch = ScratchBuffers().get

    def finite(self, grad: torch.Tensor) -> bool:
        """Whether every element of ``grad`` is finite: the largest sign-cleared bit pattern, chunk by chunk,
        below that of +inf (the first pass of :meth:`fold`, alone; many times cheaper than torch's
        ``isfinite`` on bf16)."""
        raw = grad.detach().reshape(-1).view(RAW_BITS[grad.dtype]).numpy()
        magnitude_max = _SIGN_CLEARED[raw.itemsize]
        magnitude = self._scratch("magnitude", min(self.chunk, raw.size), raw.dtype)
        for start in range(0, raw.size, self.chunk):
            block = raw[start:start + self.chunk]
            mag = magnitude[:block.size]
            np.bitwise_and(block, magnitude_max, out=mag)
            if int(mag.max()) >= _INF_BITS[grad.dtype]:
                return False
        return True

    def fold(self, grad: torch.Tensor, bits: torch.Tensor, *, full: bool, count: bool,
             sums: tuple[torch.Tensor, torch.Tensor] | None = None, stride: int = 1,
             sample_start: int = 0) -> Folded:
        """Fold one gradient into ``bits`` (its packed "ever nonzero" bitmap) and ``sums``.

        ``full``: the caller knows ``bits`` is already all ones, so it is neither recomputed nor written.
        ``sums``: ``(signed, absolute)`` float32 accumulators of elements ``sample_start::stride``.
        ``count``: also count this step's nonzero elements.
        """
        dtype = grad.dtype
        raw = grad.detach().reshape(-1).view(RAW_BITS[dtype]).numpy()  # zero-copy; numpy has no bfloat16
        numel = raw.size
        if full and not count and _finite_and_nonzero(grad):
            # The common step of a dense model: nothing to pack or count, so the one question is "finite?",
            # answered by a sum (one vectorised read, no temporaries, about twice the speed of the pass below).
            if sums is not None:
                samples = None
                if stride > 1:
                    taken = raw[sample_start::stride]
                    samples = self._scratch("samples", taken.size, np.float32)
                    _as_float32(taken, dtype, samples)
                with np.errstate(over="ignore"):
                    self._add_sums(grad, sums, samples)
            return Folded(any_nonzero=True, finite=True, nonzero=None, full=True)
        chunk = self.chunk
        magnitude_max = _SIGN_CLEARED[raw.itemsize]  # the mask that clears the sign bit
        magnitude = self._scratch("magnitude", min(chunk, numel), raw.dtype)
        nonzero = self._scratch("nonzero", min(chunk, numel), np.bool_)
        packed = None if full else self._scratch("packed", (numel + 7) // 8, np.uint8)
        sampled = sums is not None and stride > 1  # stride 1 ("full" mode) adds whole tensors at the end
        samples = self._scratch("samples", len(range(sample_start, numel, stride)), np.float32) if sampled else None

        peak = 0
        nonzero_count = 0
        for start in range(0, numel, chunk):
            end = min(start + chunk, numel)
            block = raw[start:end]
            mag = magnitude[:end - start]
            np.bitwise_and(block, magnitude_max, out=mag)
            peak = max(peak, int(mag.max()))
            if not full:
                flags = nonzero[:end - start]
                np.not_equal(mag, 0, out=flags)
                packed[start // 8:(end + 7) // 8] = np.packbits(flags, bitorder="little")
                if count:
                    nonzero_count += int(np.count_nonzero(flags))
            elif count:
                nonzero_count += int(np.count_nonzero(mag))
            if sampled:
                # First sampled index at or after `start`; the block is still in cache.
                first = sample_start + max(0, -(-(start - sample_start) // stride)) * stride
                if first < end:
                    taken = block[first - start::stride]
                    k = (first - sample_start) // stride
                    _as_float32(taken, dtype, samples[k:k + taken.size])

        finite = peak < _INF_BITS[dtype]
        if finite:
            state = bits.numpy()
            if not full:
                np.bitwise_or(state, packed, out=state)
                tail = numel % 8
                full = bool(state[-1] == ((1 << tail) - 1 if tail else 0xFF)) and (
                    state.size == 1 or int(state[:-1].min()) == 0xFF)
            if sums is not None:
                with np.errstate(over="ignore"):  # a sum overflowing to inf is kept, silently, as torch does
                    self._add_sums(grad, sums, samples)
        return Folded(any_nonzero=peak != 0, finite=finite, nonzero=nonzero_count if count else None, full=full)

    def fold_changes(self, values: torch.Tensor, last: torch.Tensor, changed_bits: torch.Tensor) -> int:
        """``ever_changed`` mode after an optimizer step: set the bits of the elements of ``values`` whose raw
        bits differ from ``last`` (the values after the previous step, flat, same dtype), copy the new values
        into ``last``, return how many changed. Exact: a bitwise compare of every element."""
        raw = values.detach().reshape(-1).view(RAW_BITS[values.dtype]).numpy()
        previous = last.view(RAW_BITS[last.dtype]).numpy()
        state = changed_bits.numpy()
        numel = raw.size
        flags = self._scratch("nonzero", min(self.chunk, numel), np.bool_)
        changed = 0
        for start in range(0, numel, self.chunk):
            end = min(start + self.chunk, numel)
            differs = flags[:end - start]
            np.not_equal(raw[start:end], previous[start:end], out=differs)
            changed += int(np.count_nonzero(differs))
            packed = state[start // 8:(end + 7) // 8]
            np.bitwise_or(packed, np.packbits(differs, bitorder="little"), out=packed)
            previous[start:end] = raw[start:end]
        return changed

    def _add_sums(self, grad: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor],
                  samples: np.ndarray | None) -> None:
        signed, absolute = (tensor.numpy() for tensor in sums)
        if samples is not None:
            np.add(signed, samples, out=signed)
            np.abs(samples, out=samples)
            np.add(absolute, samples, out=absolute)
            return
        # Every element ("full" mode): a second pass, now that the gradient is known to be finite.
        raw = grad.detach().reshape(-1).view(RAW_BITS[grad.dtype]).numpy()
        values = self._scratch("values", min(self.chunk, raw.size), np.float32)
        for start in range(0, raw.size, self.chunk):
            end = min(start + self.chunk, raw.size)
            block = values[:end - start]
            _as_float32(raw[start:end], grad.dtype, block)  # exact, as torch's widening
            np.add(signed[start:end], block, out=signed[start:end])
            np.abs(block, out=block)
            np.add(absolute[start:end], block, out=absolute[start:end])
