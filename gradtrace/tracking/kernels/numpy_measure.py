"""The CPU fast path of :meth:`GradTracker.measure`: NumPy, one cache-sized chunk at a time.

``measure()`` compares every parameter with its reference copy. The torch path does it with a dozen
full-size temporaries per parameter (the difference, its absolute value, two float32 copies, their
absolute values, the maximum, the bound, three boolean masks, the unpacked gradient bitmap), each a
fresh allocation whose pages fault in on first touch and each a pass over main memory: about 1 s on a
52M-parameter bf16 model. Here a CPU parameter and its reference are read through zero-copy views
(``int16`` for the 16-bit dtypes: NumPy has no bfloat16), in chunks whose temporaries stay in a core's
L2 cache, and the counts that involve the gradient bitmap are popcounts of packed bytes.

The results are bit-identical to the torch path; tests/tracking/test_cpu_measure.py compares the two on edge
values, in every mode, across chunk boundaries and on a trained model. What the torch path computes, and
how this module reproduces it:

- ``updated``: the raw bits differ (-0.0 vs +0.0 is a change, identical NaN bits are not).
- ``updated_abs``: torch's ``current - reference`` in bf16/fp16 is the float32 difference rounded to the
  dtype (to nearest, ties to even), and ``.le(abs_tolerance)`` compares it with the tolerance *cast to
  the dtype* (bf16(1e-5) = 1.0014e-05, and a difference equal to it is within tolerance). Rounding is
  monotonic, so "rounded |d| <= cast tolerance" is "float32 |d| <= T" for one float32 ``T`` per dtype
  and tolerance, found once by bisection with torch's own rounding as the oracle (:func:`abs_threshold`):
  no rounding to emulate per element, and ties, subnormals and overflow are exactly torch's (the test
  suite checks that torch's bf16/fp16 subtraction is the rounded float32 one). A NaN difference (NaN, or
  inf - inf) compares false: changed.
- ``updated_rel``: float32 throughout. torch multiplies by the tolerance cast to float32 (not by the
  double, rounded afterwards), so this path multiplies by ``np.float32(rel_tolerance)``.
- the sampled columns and the histogram: the same float32 divisions, products and comparisons as the
  torch code, with the scalars cast to float32 as torch does. A NaN ratio (signed and absolute sums both
  overflowed to inf) goes to the last bin, as it now does in the torch path (whose ``.long()`` of NaN
  made a negative index, so ``index_add_`` raised).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch

from gradtrace.formats.bitpack import count_set_bits
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.kernels.numpy_scan import RAW_BITS, ScratchBuffers

# Bytes of the parameter per chunk (as many of the reference): 64 Ki bf16/fp16 or 32 Ki fp32 elements,
# whose working set (the two slices, three float32 arrays, two boolean masks: 0.7-1.1 MiB) stays in a
# core's L2 cache. Measured on the 52M-parameter model: chunks twice as large are 15-25% slower (the set
# spills), half as large no faster (more Python per element). Chunks are whole bytes of the bitmaps.
CHUNK_BYTES = 1 << 17

_TINY = np.float32(torch.finfo(torch.float32).tiny)  # the torch path's clamp_min on the absolute sums


def supports(current: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a parameter's local data and its reference can take this path: both dense, contiguous
    CPU tensors of the same bf16/fp16/fp32 dtype and size."""
    return (current.device.type == "cpu" and reference.device.type == "cpu" and current.dtype in RAW_BITS
            and reference.dtype == current.dtype and current.layout == torch.strided
            and reference.layout == torch.strided and current.is_contiguous() and reference.is_contiguous()
            and current.numel() == reference.numel())


@functools.cache
def abs_threshold(dtype: torch.dtype, tolerance: float) -> np.float32:
    """The float32 ``T`` with: ``|d|`` rounded to ``dtype`` is ``<= tolerance`` (cast to ``dtype``, as torch
    compares) exactly when the float32 difference ``|d| <= T``.

    Found by bisection over the bit patterns of +0.0 ... +inf (ordered like their values), asking torch
    itself whether each candidate, rounded to ``dtype``, passes the torch path's test: so the threshold
    follows torch's rounding (ties to even, subnormals, overflow to inf) without restating it. For float32
    it is the tolerance cast to float32. -inf when nothing passes (a NaN tolerance), +inf when all does.
    """

    def within(bits: int) -> bool:
        value = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
        return bool(value.to(dtype).abs().le(tolerance))

    low, high = 0, 0x7F800000  # +0.0 and +inf
    if not within(low):
        return np.float32(-np.inf)
    if within(high):
        return np.float32(np.inf)
    while high - low > 1:  # within(low) and not within(high)
        middle = (low + high) // 2
        if within(middle):
            low = middle
        else:
            high = middle
    return np.array(low, dtype=np.int32).view(np.float32)[()]


def float32_scalar(value: float) -> np.float32:
    """A Python float as torch uses it against a float32 tensor (``mul``, ``le``): cast to float32."""
    return np.float32(value)


class CpuMeasurer:
    """Computes :meth:`GradTracker.measure`'s per-parameter rows for CPU parameters; owns the scratch
    buffers (a few chunk-sized arrays, reused across parameters) and the histogram they add into.

    One instance per ``measure()`` call: the histogram starts at zero.
    """

    def __init__(self, histogram_bins: int, chunk_elements: int | None = None):
        if chunk_elements is not None and (chunk_elements <= 0 or chunk_elements % 8):
            raise ValueError(f"chunk_elements must be a positive multiple of 8, not {chunk_elements}")
        self.chunk = chunk_elements  # None: CHUNK_BYTES of each parameter
        self.histogram = np.zeros(histogram_bins, dtype=np.int64)
        self._scratch = ScratchBuffers().get

    def row(self, current: torch.Tensor, reference: torch.Tensor, state: Mapping[str, torch.Tensor],
            config: TrackerConfig, *, sample_start: int = 0) -> list[int]:
        """The parameter's counts, in ``COUNT_FIELDS`` order; its sampled elements' ratios go into
        :attr:`histogram`. ``state`` is the parameter's tracker state (bitmaps and sums on the CPU)."""
        return self._scan(current, reference, state, config, sample_start=sample_start, histogram=self.histogram)

    def row_and_masks(self, current: torch.Tensor, reference: torch.Tensor, state: Mapping[str, torch.Tensor],
                      config: TrackerConfig, *, sample_start: int = 0) -> tuple[list[int], tuple[torch.Tensor, ...]]:
        """:meth:`row` and :meth:`update_masks` in one pass: what per-expert counts of a fused expert
        tensor are computed from (gradtrace.tracking.slices)."""
        length = (current.numel() + 7) // 8
        masks = tuple(np.empty(length, dtype=np.uint8) for _ in range(3))
        row = self._scan(current, reference, state, config, sample_start=sample_start, histogram=self.histogram,
                         masks=masks)
        return row, tuple(torch.from_numpy(mask) for mask in masks)

    def update_masks(self, current: torch.Tensor, reference: torch.Tensor, state: Mapping[str, torch.Tensor],
                     config: TrackerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed ``updated``, ``updated_abs`` and ``updated_rel`` masks (``bitpack`` layout)."""
        length = (current.numel() + 7) // 8
        masks = tuple(np.empty(length, dtype=np.uint8) for _ in range(3))
        self._scan(current, reference, state, config, masks=masks, sampled=False)
        return tuple(torch.from_numpy(mask) for mask in masks)

    def _scan(self, current: torch.Tensor, reference: torch.Tensor, state: Mapping[str, torch.Tensor],
              config: TrackerConfig, *, sample_start: int = 0, histogram: np.ndarray | None = None,
              masks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, sampled: bool = True) -> list[int]:
        """The row (the sampled columns only if ``sampled``), and the packed update masks into ``masks``."""
        dtype = current.dtype
        current = current.detach().reshape(-1)
        reference = reference.detach().reshape(-1)
        current_raw = current.view(RAW_BITS[dtype]).numpy()  # zero-copy
        reference_raw = reference.view(RAW_BITS[dtype]).numpy()
        numel = current_raw.size
        packed_length = (numel + 7) // 8
        chunk = self.chunk or max(8, CHUNK_BYTES // current.element_size() // 8 * 8)
        chunk = min(chunk, max(numel, 1))
        gradient_bits = state["gradient_bits"].numpy()
        threshold = abs_threshold(dtype, config.abs_tolerance)
        rel = float32_scalar(config.rel_tolerance)
        # float32 scratch: the operands widened to float32 as the torch path does (16-bit dtypes), then
        # their magnitudes and the bound of the relative test; and |d|.
        first = self._scratch("first", chunk, np.float32)
        second = self._scratch("second", chunk, np.float32)
        delta = self._scratch("delta", chunk, np.float32)
        if dtype == torch.float16:
            first_t, second_t = torch.from_numpy(first), torch.from_numpy(second)
        changed = self._scratch("changed", chunk, np.bool_)
        within = self._scratch("within", chunk, np.bool_)
        # The "raw bits differ" mask, packed for the whole parameter: its popcount, its AND with the
        # gradient bitmap and its sampled bits are then a few operations on numel / 8 bytes.
        updated_bits = masks[0] if masks is not None else self._scratch("updated_bits", packed_length, np.uint8)
        abs_within = rel_within = 0

        with np.errstate(all="ignore"):  # inf - inf, overflowing products: IEEE results, as in torch
            for start in range(0, numel, chunk):
                end = min(start + chunk, numel)
                n = end - start
                packed_slice = slice(start // 8, (end + 7) // 8)
                differs = changed[:n]
                np.not_equal(current_raw[start:end], reference_raw[start:end], out=differs)
                updated_bits[packed_slice] = np.packbits(differs, bitorder="little")  # padding bits 0

                if dtype == torch.bfloat16:  # bfloat16 is the top half of a float32: widen, shift into place
                    cur, ref = first[:n], second[:n]
                    for raw, out in ((current_raw, cur), (reference_raw, ref)):
                        bits = out.view(np.int32)
                        np.copyto(bits, raw[start:end])  # two simple passes beat one casting left_shift
                        np.left_shift(bits, 16, out=bits)
                elif dtype == torch.float16:  # torch's conversion kernel: exact, ~7x faster than NumPy's cast
                    cur, ref = first[:n], second[:n]
                    first_t[:n].copy_(current[start:end])
                    second_t[:n].copy_(reference[start:end])
                else:
                    cur = current_raw[start:end].view(np.float32)
                    ref = reference_raw[start:end].view(np.float32)
                diff = delta[:n]
                np.subtract(cur, ref, out=diff)  # the float32 difference torch rounds to the dtype
                np.abs(diff, out=diff)
                ok = within[:n]
                np.less_equal(diff, threshold, out=ok)  # NaN: False, i.e. changed
                abs_within += int(np.count_nonzero(ok))
                if masks is not None:
                    _pack_inverted(ok, masks[1][packed_slice])

                # max(|cur|, |ref|) * rel, the bound of the relative test, in the scratch (free again)
                bound = np.abs(cur, out=first[:n])
                np.maximum(bound, np.abs(ref, out=second[:n]), out=bound)
                np.multiply(bound, rel, out=bound)
                np.less_equal(diff, bound, out=ok)
                rel_within += int(np.count_nonzero(ok))
                if masks is not None:
                    _pack_inverted(ok, masks[2][packed_slice])

        tail = numel % 8
        if masks is not None and tail:  # bitpack's padding is 0, also in the inverted masks
            for mask in masks[1:]:
                mask[-1] &= (1 << tail) - 1
        updated = count_set_bits(updated_bits)
        both = self._scratch("both", packed_length, np.uint8)
        gradient_and_updated = count_set_bits(np.bitwise_and(updated_bits, gradient_bits, out=both))
        gradient = count_set_bits(gradient_bits[:numel // 8])
        if tail:  # unpack_bits ignores the padding bits, set or not
            gradient += count_set_bits(gradient_bits[numel // 8:numel // 8 + 1] & ((1 << tail) - 1))
        # The torch path's popcount counts the whole bitmap, padding included.
        ever = count_set_bits(state["ever_changed_bits"].numpy()) if config.ever_changed else 0
        sampled_counts = [0, 0, 0, 0]
        if sampled and config.tracks_sums:
            sampled_counts = self._sampled(gradient_bits, updated_bits, state["signed_sum"].numpy(),
                                           state["abs_sum"].numpy(), config, sample_start, numel, histogram)
        return [numel, gradient, updated, numel - abs_within, numel - rel_within, gradient_and_updated, ever,
                *sampled_counts]

    def _sampled(self, gradient_bits: np.ndarray, updated_bits: np.ndarray, signed: np.ndarray,
                 absolute: np.ndarray, config: TrackerConfig, sample_start: int, numel: int,
                 histogram: np.ndarray | None) -> list[int]:
        """``[sampled, gradient, gradient and unchanged, cancelled]`` counts of the elements with gradient
        sums (``sample_start::stride``), whose ratios go into ``histogram``; chunks of sampled elements."""
        stride = config.stride
        total = len(range(sample_start, numel, stride))
        epsilon = float32_scalar(config.cancel_epsilon)
        bins = config.histogram_bins
        counts = [total, 0, 0, 0]
        chunk = min(self.chunk or CHUNK_BYTES // 4, max(total, 1))  # of float32 sums
        magnitude = self._scratch("first", chunk, np.float32)
        scaled = self._scratch("second", chunk, np.float32)
        unchanged = self._scratch("changed", chunk, np.bool_)
        cancelled = self._scratch("within", chunk, np.bool_)
        with np.errstate(all="ignore"):
            for k in range(0, total, chunk):
                n = min(chunk, total - k)
                position = sample_start + k * stride
                gradient = _bits_at(gradient_bits, position, stride, n)
                np.greater(gradient, _bits_at(updated_bits, position, stride, n), out=unchanged[:n])  # g & ~u
                # |Σg| <= ε Σ|g|
                signed_abs = np.abs(signed[k:k + n], out=magnitude[:n])
                total_abs = absolute[k:k + n]
                np.less_equal(signed_abs, np.multiply(total_abs, epsilon, out=scaled[:n]), out=cancelled[:n])
                np.logical_and(cancelled[:n], unchanged[:n], out=cancelled[:n])
                counts[1] += int(np.count_nonzero(gradient))
                counts[2] += int(np.count_nonzero(unchanged[:n]))
                counts[3] += int(np.count_nonzero(cancelled[:n]))
                if histogram is None:
                    continue
                # (|Σg| / max(Σ|g|, tiny)).clamp(0, 1) * bins, truncated, at most bins - 1. The ratio is >= 0
                # or NaN, so fmin (1 for NaN) is both the clamp and the torch path's NaN -> 1. The product is
                # in [0, bins], where capping at bins - 1 before truncating equals capping after, and is a
                # float32 operation instead of an int64 one (bins - 1 is exact in float32 below 2**24).
                ratio = np.maximum(total_abs, _TINY, out=scaled[:n])
                np.divide(signed_abs, ratio, out=ratio)
                np.fmin(ratio, 1, out=ratio)
                np.multiply(ratio, float32_scalar(bins), out=ratio)
                np.minimum(ratio, float32_scalar(bins - 1), out=ratio)
                bucket = ratio.astype(np.int32)  # truncates, as .long(); int32 indexes 3x faster than int64
                histogram += np.bincount(bucket[gradient], minlength=bins)
        return counts


def _bits_at(packed: np.ndarray, position: int, stride: int, count: int) -> np.ndarray:
    """Bits ``position, position + stride, ...`` (``count`` of them) of a packed bitmap, as booleans."""
    if stride % 8 == 0:  # the same bit of every (stride / 8)-th byte: no unpacking
        picked = packed[position // 8::stride // 8][:count] >> (position % 8)
        return np.bitwise_and(picked, 1, out=picked).view(np.bool_)
    last = position + (count - 1) * stride
    bits = np.unpackbits(packed[position // 8:last // 8 + 1], bitorder="little")
    return bits[position % 8::stride][:count].view(np.bool_)


def _pack_inverted(within: np.ndarray, out: np.ndarray) -> None:
    """Pack ``~within`` into ``out``: packing first and inverting bytes is 8x fewer element operations."""
    out[:] = np.packbits(within, bitorder="little")
    np.invert(out, out=out)
