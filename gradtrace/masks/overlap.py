"""Overlap between the subnetworks of two or more runs, from their masks files.

With I₁, I₂ the sets of updated elements and s₁, s₂ the runs' update sparsities (Mukherjee et al.,
arXiv 2505.11711, §5 and App. E):

- ``o₁ = |I₁ ∩ I₂| / |I₁|`` (chance for independent random masks of the same sizes: ``1 − s₂``),
- ``o₂ = |I₁ ∩ I₂| / |I₂|`` (chance ``1 − s₁``),
- Jaccard ``|I₁ ∩ I₂| / |I₁ ∪ I₂|`` (chance ``pq / (p + q − pq)`` with densities p, q; Zhu et al.).

All counts come from the bit-packed bytes (AND + popcount), never from unpacked booleans, so
comparing two 7 B-parameter masks costs ~1 GB of reads and no 8× expansion. Groups (per layer, per
module kind, per tower, per routed expert of a MoE model) sum the counts first, then take the ratios, so
chance values are those of the group. A fused expert tensor's experts are its slices along dim 0, counted
on rows of the packed bytes (a slice of a whole number of bytes, as in every real model; otherwise that
tensor alone is unpacked).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gradtrace.anatomy.experts import ExpertLayout, expert_layout
from gradtrace.anatomy.grouping import by_expert, by_kind, by_layer, by_tower, total
from gradtrace.anatomy.parameter_names import matching_key
from gradtrace.formats.bitpack import popcount, unpack_bits
from gradtrace.formats.masks_file import MaskFileError, PackedMask, read_packed_masks

# Bytes per popcount call: off the CPU the lookup widens each byte to int64, so this bounds the temporary at 128 MB.
_POPCOUNT_CHUNK = 1 << 24

MaskSource = str | os.PathLike | Mapping[str, Mapping[str, PackedMask | torch.Tensor]]


class OverlapError(ValueError):
    """Masks that cannot be compared: different models (names, shapes) or a missing kind."""


def _label(source: MaskSource, index: int) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<masks #{index + 1}>"


def load_kind(source: MaskSource, kind: str = "update", *, label: str | None = None) -> dict[str, PackedMask]:
    """``{parameter name: PackedMask}`` of one kind from a masks file or an in-memory ``{kind: {name: mask}}``."""
    label = label or _label(source, 0)
    if isinstance(source, (str, os.PathLike)):
        packed, _header = read_packed_masks(source)
    else:
        packed = {k: {n: m if isinstance(m, PackedMask) else PackedMask.from_bool(m) for n, m in v.items()}
                  for k, v in source.items()}
    if kind not in packed:
        raise OverlapError(f"{label}: no {kind!r} masks (it has {sorted(packed)})")
    return packed[kind]


def count_bits(bits: torch.Tensor, numel: int) -> int:
    """Set bits among the first ``numel`` bits of a packed mask (padding bits of the last byte ignored)."""
    full = numel // 8
    count = 0
    for start in range(0, full, _POPCOUNT_CHUNK):
        count += int(popcount(bits[start:min(full, start + _POPCOUNT_CHUNK)]))
    tail = numel % 8
    if tail:
        count += int(popcount(bits[full:full + 1] & ((1 << tail) - 1)))
    return count


def count_and(a: torch.Tensor, b: torch.Tensor, numel: int) -> int:
    """``|A ∩ B|`` of two packed masks of ``numel`` bits, chunked so the AND stays small."""
    count = 0
    step = _POPCOUNT_CHUNK
    for start in range(0, len(a), step):
        stop = min(len(a), start + step)
        # Bits of the chunk that are real elements (the final chunk may end in padding).
        count += count_bits(a[start:stop] & b[start:stop], min(numel - 8 * start, 8 * (stop - start)))
    return count


def _aligned(masks: Sequence[dict[str, PackedMask]]) -> list[dict[str, PackedMask]]:
    """The masks keyed alike: as they are when their names agree, else by :func:`matching_key` when that
    makes them agree one to one (live masks of a PEFT run vs ``diff`` masks of its saved adapter, masks
    recorded with and without DDP's ``module.``...)."""
    if all(m.keys() == masks[0].keys() for m in masks):
        return list(masks)
    rekeyed = [{matching_key(name): mask for name, mask in m.items()} for m in masks]
    if all(len(r) == len(m) for r, m in zip(rekeyed, masks, strict=True)) and \
            all(r.keys() == rekeyed[0].keys() for r in rekeyed):
        return rekeyed
    return list(masks)


def _check_same_model(a: Mapping[str, PackedMask], b: Mapping[str, PackedMask], label_a: str, label_b: str) -> None:
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise OverlapError(f"{label_a} and {label_b} cover different parameters "
                           f"({len(only_a)} only in the first, e.g. {only_a[:2]}; "
                           f"{len(only_b)} only in the second, e.g. {only_b[:2]}): masks of different models?")
    for name, mask in a.items():
        if mask.shape != b[name].shape:
            raise OverlapError(f"parameter {name!r} has shape {list(mask.shape)} in {label_a} but "
                               f"{list(b[name].shape)} in {label_b}: masks of different models?")


def overlap_stats(counts: Mapping[str, float]) -> dict[str, float | int | None]:
    """Ratios from summed counts ``numel`` (n), ``updated_1`` (|I₁|), ``updated_2`` (|I₂|), ``intersection``.

    Returns o₁ as ``"overlap"`` with its chance value ``"chance"`` (= 1 − s₂), o₂ as ``"overlap_2"`` /
    ``"chance_2"``, ``"jaccard"`` / ``"jaccard_chance"``, and both sparsities; all fractions, ``None``
    where undefined (an empty set in a denominator).
    """
    n, a, b, both = (int(counts.get(k, 0)) for k in ("numel", "updated_1", "updated_2", "intersection"))
    p, q = (a / n, b / n) if n else (None, None)
    union = a + b - both
    jaccard_chance = None
    if p is not None and q is not None and p + q - p * q > 0:
        jaccard_chance = p * q / (p + q - p * q)
    return {
        "overlap": both / a if a else None,
        "chance": q,
        "overlap_2": both / b if b else None,
        "chance_2": p,
        "jaccard": both / union if union else None,
        "jaccard_chance": jaccard_chance,
        "sparsity_1": 1 - p if p is not None else None,
        "sparsity_2": 1 - q if q is not None else None,
        "numel": n,
        "updated_1": a,
        "updated_2": b,
        "intersection": both,
    }


def pair_counts(a: Mapping[str, PackedMask], b: Mapping[str, PackedMask]) -> dict[str, dict[str, int]]:
    """Per-parameter ``{"numel", "updated_1", "updated_2", "intersection"}`` of two same-model masks."""
    counts = {}
    for name, mask_a in a.items():
        n = mask_a.numel
        counts[name] = {"numel": n, "updated_1": count_bits(mask_a.bits, n),
                        "updated_2": count_bits(b[name].bits, n),
                        "intersection": count_and(mask_a.bits, b[name].bits, n)}
    return counts


def _per_expert_counts(mask: PackedMask, experts: int) -> np.ndarray:
    """Set bits of each expert's slice (dim 0) of a fused expert tensor's packed mask."""
    n = mask.numel
    if (n // experts) % 8 == 0:  # every slice a whole number of bytes: popcount rows of the packed bytes
        rows = mask.bits[: n // 8].reshape(experts, -1).contiguous().numpy()
        return np.bitwise_count(rows).sum(axis=1, dtype=np.int64)
    return unpack_bits(mask.bits, n).reshape(experts, -1).sum(dim=1).numpy()


def pair_slice_counts(a: Mapping[str, PackedMask], b: Mapping[str, PackedMask],
                      layout: ExpertLayout) -> dict[str, list[dict[str, int]]]:
    """:func:`pair_counts` per expert of each fused expert tensor: ``{name: [counts of expert 0, ...]}``."""
    out = {}
    for name, experts in layout.fused.items():
        both = PackedMask(a[name].bits & b[name].bits, a[name].shape)
        ua, ub, ab = (_per_expert_counts(m, experts) for m in (a[name], b[name], both))
        size = a[name].numel // experts
        out[name] = [{"numel": size, "updated_1": int(ua[e]), "updated_2": int(ub[e]), "intersection": int(ab[e])}
                     for e in range(experts)]
    return out


def _grouped(per_param: Mapping[str, Mapping[str, int]], a: Mapping[str, PackedMask] | None = None,
             b: Mapping[str, PackedMask] | None = None) -> dict[str, Any]:
    layout = expert_layout({name: mask.shape for name, mask in a.items()}) if a is not None else ExpertLayout()
    out = {
        "global": overlap_stats(total(per_param)),
        "per_layer": {k: overlap_stats(v) for k, v in by_layer(per_param).items()},
        "per_kind": {k: overlap_stats(v) for k, v in by_kind(per_param, layout.kind).items()},
        "per_tower": {k: overlap_stats(v) for k, v in by_tower(per_param).items()},
    }
    if a is not None and b is not None:
        experts = by_expert(per_param, pair_slice_counts(a, b, layout), layout.listed, layout.groups)
        if experts:
            out["per_expert"] = {k: overlap_stats(v) for k, v in experts.items()}
    return out


def pair_overlap(a: MaskSource, b: MaskSource, kind: str = "update") -> dict[str, Any]:
    """Overlap of two runs: ``{"kind", "runs", "global", "per_layer", "per_kind", "per_tower"}`` and, for a MoE
    model, ``"per_expert"`` (``"<layer>/<expert>"``); see :func:`overlap_stats`.

    Raises :class:`OverlapError` if the masks belong to different models or lack ``kind``, and
    :class:`~gradtrace.formats.masks_file.MaskFileError` if a file is unreadable.
    """
    label_a, label_b = _label(a, 0), _label(b, 1)
    masks_a, masks_b = _aligned([load_kind(a, kind, label=label_a), load_kind(b, kind, label=label_b)])
    _check_same_model(masks_a, masks_b, label_a, label_b)
    return {"kind": kind, "runs": [label_a, label_b], **_grouped(pair_counts(masks_a, masks_b), masks_a, masks_b)}


def overlap_matrix(sources: Sequence[MaskSource], kind: str = "update") -> dict[str, Any]:
    """Pairwise overlap of several runs.

    ``"matrix"`` holds k×k lists: ``overlap[i][j] = |Iᵢ ∩ Iⱼ| / |Iᵢ|`` with ``chance[i][j] = 1 − sⱼ``,
    and the symmetric ``jaccard`` / ``jaccard_chance``; ``"pairs"`` holds every i < j pair's full
    result (global, per layer, per kind); ``"sparsity"`` each run's update sparsity.
    """
    if len(sources) < 2:
        raise OverlapError("overlap needs at least two masks files")
    labels = [_label(s, i) for i, s in enumerate(sources)]
    masks = _aligned([load_kind(s, kind, label=lab) for s, lab in zip(sources, labels, strict=True)])
    for i in range(1, len(masks)):
        _check_same_model(masks[0], masks[i], labels[0], labels[i])
    k = len(masks)
    matrix: dict[str, list[list[float | None]]] = {
        key: [[None] * k for _ in range(k)] for key in ("overlap", "chance", "jaccard", "jaccard_chance")}
    pairs = []
    sparsity: list[float | None] = [None] * k
    for i in range(k):
        for j in range(i + 1, k):
            grouped = _grouped(pair_counts(masks[i], masks[j]), masks[i], masks[j])
            pairs.append({"runs": [labels[i], labels[j]], "index": [i, j], **grouped})
            g = grouped["global"]
            matrix["overlap"][i][j], matrix["chance"][i][j] = g["overlap"], g["chance"]
            matrix["overlap"][j][i], matrix["chance"][j][i] = g["overlap_2"], g["chance_2"]
            matrix["jaccard"][i][j] = matrix["jaccard"][j][i] = g["jaccard"]
            matrix["jaccard_chance"][i][j] = matrix["jaccard_chance"][j][i] = g["jaccard_chance"]
            sparsity[i], sparsity[j] = g["sparsity_1"], g["sparsity_2"]
    for i in range(k):
        density = None if sparsity[i] is None else 1 - sparsity[i]
        matrix["overlap"][i][i] = 1.0 if density else None
        matrix["jaccard"][i][i] = 1.0 if density else None
        matrix["chance"][i][i] = density
        # An independent random mask of the same density: E|I ∩ I'| / |I| = p, E[J] = p² / (2p − p²).
        matrix["jaccard_chance"][i][i] = density / (2 - density) if density else None
    return {"kind": kind, "runs": labels, "sparsity": sparsity, "matrix": matrix, "pairs": pairs}


def overlap_report(sources: Sequence[MaskSource], kind: str = "update") -> dict[str, Any]:
    """:func:`pair_overlap` for two sources, :func:`overlap_matrix` for more."""
    if len(sources) == 2:
        return pair_overlap(sources[0], sources[1], kind)
    return overlap_matrix(sources, kind)


__all__ = ["MaskFileError", "MaskSource", "OverlapError", "count_and", "count_bits", "load_kind",
           "overlap_matrix", "overlap_report", "overlap_stats", "pair_counts", "pair_overlap",
           "pair_slice_counts"]
