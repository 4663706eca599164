"""Rank of the update matrices ΔW = W₁ − W₀ between two checkpoints, with a random-support baseline.

Mukherjee et al. (arXiv 2505.11711, Table 2) report the mean over 2-D update matrices of
``rank(ΔW) / min(m, n)`` with ``torch.linalg.matrix_rank`` at its default tolerance (~99.2–99.8 % for
RL runs): sparse updates are nonetheless nearly full rank. But almost *any* unstructured sparse support
of that density gives a full-rank matrix, so each matrix is reported beside a baseline: the rank of a
matrix with random normal values on exactly the nonzero positions of ΔW. A gap between the two says
the update's *values* are low-rank; no gap says the rank is explained by the support alone.

Streaming: one tensor pair at a time (:class:`~gradtrace.masks.diff.CheckpointPair`); the SVD
needs a few fp32 copies of the matrix being ranked, so ``max_dim`` skips huge ones (with a note).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gradtrace.anatomy.naming import kind_of
from gradtrace.masks.diff import CheckpointPair
from gradtrace.masks.fp8 import arithmetic_dtype


@dataclass(frozen=True)
class MatrixRank:
    """Rank of one update matrix ΔW and of its random-support baseline."""

    name: str
    shape: tuple[int, int]
    nonzero: int  # elements of ΔW that are not exactly 0 (in fp32)
    rank: int
    random_rank: int | None  # None when the baseline was not computed

    @property
    def full(self) -> int:
        """The largest possible rank, min(m, n)."""
        return min(self.shape)

    @property
    def rank_fraction(self) -> float | None:
        return self.rank / self.full if self.full else None

    @property
    def random_rank_fraction(self) -> float | None:
        return None if self.random_rank is None or not self.full else self.random_rank / self.full

    @property
    def density(self) -> float:
        """Fraction of nonzero elements of ΔW."""
        return self.nonzero / (self.shape[0] * self.shape[1]) if self.shape[0] * self.shape[1] else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "nonzero": self.nonzero, "density": self.density,
                "rank": self.rank, "rank_fraction": self.rank_fraction,
                "random_rank": self.random_rank, "random_rank_fraction": self.random_rank_fraction}


def update_delta(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """ΔW = tuned − base in float32 (float64 stays float64): exact for bf16/fp16 weights of similar magnitude,
    and for plain float8 ones (no block scales), which are widened to float32 first."""
    dtype = arithmetic_dtype(base.dtype)
    return tuned.to(dtype) - base.to(dtype)


def matrix_rank(delta: torch.Tensor) -> int:
    """``torch.linalg.matrix_rank`` at its default tolerance (σ_max · max(m, n) · eps of the dtype)."""
    return int(torch.linalg.matrix_rank(delta))


def random_support_rank(delta: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Rank of a matrix with standard normal values on the nonzero positions of ``delta``, zeros elsewhere."""
    support = delta != 0
    values = torch.randn(int(support.sum()), generator=generator, dtype=delta.dtype)
    random = torch.zeros_like(delta)
    random[support] = values.to(delta.device)
    return int(torch.linalg.matrix_rank(random))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass
class RankResult:
    """Per-matrix ranks of a checkpoint pair and their means (the paper's Table 2 figure)."""

    base: str
    tuned: str
    matrices: dict[str, MatrixRank]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def summarise(matrices: Mapping[str, MatrixRank]) -> dict[str, Any]:
        """Unweighted means over matrices of rank / min(m, n) and of the random-support baseline."""
        ranks = list(matrices.values())
        return {"matrices": len(ranks),
                "mean_rank_fraction": _mean([m.rank_fraction for m in ranks]),
                "mean_random_rank_fraction": _mean([m.random_rank_fraction for m in ranks]),
                "mean_density": _mean([m.density for m in ranks])}

    def per_kind(self) -> dict[str, dict[str, Any]]:
        kinds: dict[str, dict[str, MatrixRank]] = {}
        for name, m in self.matrices.items():
            kinds.setdefault(kind_of(name), {})[name] = m
        return {k: self.summarise(v) for k, v in sorted(kinds.items())}

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "tuned": self.tuned,
                "global": self.summarise(self.matrices),
                "per_kind": self.per_kind(),
                "per_matrix": {name: m.to_dict() for name, m in self.matrices.items()},
                "skipped": self.skipped, "notes": self.notes}


def update_ranks(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    max_dim: int | None = None,
    baseline: bool = True,
    seed: int = 0,
    allow_missing: bool = False,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    cache: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float | None = None,
) -> RankResult:
    """Rank of every 2-D floating-point update matrix between two checkpoints.

    ``max_dim`` skips matrices whose larger side exceeds it (the SVD costs O(m·n·min(m,n)) time and a
    few fp32 copies of the matrix); ``baseline`` adds the random-support rank (seeded by ``seed``, so
    reruns agree). ``base`` and ``tuned`` may be hub ids, streamed like ``gradtrace diff``'s
    (``cache``, ``retries``, ``backoff``, ``timeout``: see :func:`~gradtrace.masks.diff.open_source`); fp8
    checkpoints are ranked dequantized. ``progress(bytes done, bytes in all, name)`` is called per
    matrix. Raises :class:`~gradtrace.masks.diff.CheckpointDiffError` on mismatched checkpoints.
    """
    generator = torch.Generator(device=device).manual_seed(seed) if baseline else None
    matrices: dict[str, MatrixRank] = {}
    skipped: list[dict[str, Any]] = []
    with CheckpointPair(base, tuned, allow_missing=allow_missing, device=device, cache=cache, retries=retries,
                        backoff=backoff, timeout=timeout) as pair:
        notes = list(pair.notes)
        candidates = [s for s in pair.specs if s.is_float and len(s.shape) == 2]
        others = len(pair.specs) - len(candidates)
        if others:
            notes.append(f"{others} tensors are not 2-D floating-point matrices (norms, biases, buffers) "
                         "and have no matrix rank")
        todo = []
        for spec in candidates:
            if max_dim is not None and max(spec.shape) > max_dim:
                skipped.append({"name": spec.name, "shape": list(spec.shape), "reason": f"larger than --max-dim {max_dim}"})
            else:
                todo.append(spec)
        total_bytes, done_bytes = sum(pair.nbytes(s) for s in todo), 0
        for spec, a, b in pair.stream(todo):
            if progress is not None:
                progress(done_bytes, total_bytes, spec.name)
            done_bytes += pair.nbytes(spec)
            delta = update_delta(a, b)
            del a, b
            if not bool(torch.isfinite(delta).all()):
                # The SVD fails on NaN/inf; a diverged run has no meaningful rank anyway.
                skipped.append({"name": spec.name, "shape": list(spec.shape), "reason": "non-finite values in ΔW"})
                continue
            rank = matrix_rank(delta)
            random_rank = random_support_rank(delta, generator) if baseline else None
            matrices[spec.name] = MatrixRank(spec.name, (spec.shape[0], spec.shape[1]), int((delta != 0).sum()),
                                             rank, random_rank)
            del delta
    if skipped:
        notes.append(f"skipped {len(skipped)} matrices (e.g. {skipped[0]['name']!r} {skipped[0]['shape']}: "
                     f"{skipped[0]['reason']})")
    return RankResult(str(base), str(tuned), matrices, skipped, notes)
