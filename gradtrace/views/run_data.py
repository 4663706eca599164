"""What the views show of a run, as plain data: its log and final summary (:func:`load_run`), the
layer x kind and layer x expert grids, the per-matrix and per-expert table rows, labels and percentages.

Shared by the HTML report, ``watch``, the live images and the trackers' tables, so every view shows the same
numbers; nothing here draws (no matplotlib).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradtrace.anatomy.naming import kind_of, layer_key, layer_of, layer_sort_key
from gradtrace.formats.run_dir import SUMMARY_NAME, find_run_dir
from gradtrace.formats.run_log import read_run_log

OUTSIDE_LAYERS = "outside"  # heatmap row of the parameters outside the transformer blocks (embeddings, head)

# Module kinds in the order a block computes them; kinds not listed follow, alphabetically.
_KIND_ORDER = ("embed", "pos_embed", "patch_embed", "q_a", "q_a_norm", "q_b", "q", "kv_a", "kv_a_norm", "kv_b",
               "k", "v", "qkv", "q_norm", "k_norm", "sinks", "o", "gate", "up", "gate_up", "down", "router",
               "expert", "shared_expert", "norm", "lm_head")
# Global curves the report plots (the W&B sink logs every finite global value anyway).
CURVE_METRICS = ("gradient_sparsity", "update_sparsity", "update_sparsity_abs_*", "update_sparsity_rel_*",
                 "cancelled", "absorbed", "changed_without_gradient", "updated", "expert_gradient_density_min",
                 "expert_gradient_density_median", "expert_gradient_density_max")


def metric_keys(values: Mapping[str, Any], patterns: Iterable[str] = CURVE_METRICS) -> list[str]:
    """Keys of ``values`` matching ``patterns`` (``*`` at the end matches the tolerance suffix), in order.

    The tolerance variants are named after the configured tolerance (``update_sparsity_abs_1e-05``), so
    they are found by prefix rather than hard-coded.
    """
    keys: list[str] = []
    for pattern in patterns:
        if pattern.endswith("*"):
            keys.extend(sorted(k for k in values if k.startswith(pattern[:-1]) and k not in keys))
        elif pattern in values:
            keys.append(pattern)
    return keys


def kind_sort_key(kind: str) -> tuple[int, int, str]:
    """Order module kinds as a block computes them (``q`` before ``o`` before ``down``); others after;
    the decoder's kinds before other towers' (``vision.q``)."""
    parts = kind.split(".")
    tower = 1 if parts[0] in ("vision", "audio", "projector") and len(parts) > 1 else 0
    base = parts[tower]
    rank = _KIND_ORDER.index(base) if base in _KIND_ORDER else len(_KIND_ORDER)
    return tower, rank, kind


@dataclass(frozen=True)
class Grid:
    """A layer x module-kind table of one metric: ``values[row][column]`` is a fraction or ``None``.

    Rows are transformer block indices (as strings, ascending) then :data:`OUTSIDE_LAYERS` for the
    parameters outside the blocks; ``None`` marks a (layer, kind) pair with no parameter (or no known
    value, e.g. ``cancelled`` when cancellation tracking is off).
    """

    metric: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]

    def cell(self, row: str, column: str) -> float | None:
        return self.values[self.rows.index(row)][self.columns.index(column)]


def layer_kind_grid(per_matrix: Mapping[str, Mapping[str, Any]], metric: str = "update_sparsity") -> Grid:
    """Aggregate ``summary["per_matrix"]`` into a layer x kind grid, weighting each matrix by ``numel``.

    The summary keeps per-layer and per-kind groups but not their product; since each per-matrix
    fraction is count / numel, the numel-weighted mean of the fractions is exactly the fraction of the
    group's elements. Matrices whose value is unknown (``None``) are left out of their cell.
    """
    sums: dict[tuple[str, str], list[float]] = {}
    layers: set[str] = set()
    outside = False
    for name, values in per_matrix.items():
        layer = layer_key(name)  # towers apart: "3", "vision.3", "projector"
        if layer is None:
            outside = True
        else:
            layers.add(layer)
        row = OUTSIDE_LAYERS if layer is None else layer
        cell = sums.setdefault((row, kind_of(name)), [0.0, 0.0])
        value, numel = values.get(metric), values.get("numel", 0)
        if isinstance(value, (int, float)) and numel:
            cell[0] += value * numel
            cell[1] += numel
    rows = sorted(layers, key=layer_sort_key) + ([OUTSIDE_LAYERS] if outside else [])
    columns = sorted({kind for _, kind in sums}, key=kind_sort_key)
    grid = [[(sums[(r, c)][0] / sums[(r, c)][1]) if (r, c) in sums and sums[(r, c)][1] else None
             for c in columns] for r in rows]
    return Grid(metric, rows, columns, grid)


def expert_grid(per_expert: Mapping[str, Mapping[str, Any]], metric: str = "gradient_sparsity") -> Grid:
    """``summary["per_expert"]`` as a layer x expert grid (rows: MoE layers, columns: expert indices)."""
    cells: dict[tuple[str, str], Any] = {}
    for key, values in per_expert.items():
        layer, _, expert = key.rpartition("/")
        value = values.get(metric)
        cells[(layer, expert)] = value if isinstance(value, (int, float)) else None
    rows = sorted({layer for layer, _ in cells}, key=layer_sort_key)
    columns = sorted({expert for _, expert in cells}, key=int)
    return Grid(metric, rows, columns, [[cells.get((r, c)) for c in columns] for r in rows])


def expert_rows(per_expert: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the per-expert table: layer, expert, numel, then each fraction."""
    fractions = matrix_columns(per_expert)
    rows = [[key.rpartition("/")[0], int(key.rpartition("/")[2]), int(values.get("numel", 0)),
             *(values.get(c) for c in fractions)] for key, values in per_expert.items()]
    return ["layer", "expert", "numel", *fractions], rows


def matrix_columns(per_matrix: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The fraction columns of the per-matrix table, in the summary's order (``numel`` excluded)."""
    columns: list[str] = []
    for values in per_matrix.values():
        columns.extend(k for k in values if k != "numel" and k not in columns)
    return columns


def matrix_rows(per_matrix: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the per-matrix table: name, layer, kind, numel, then each fraction.

    One row per parameter matrix, in model order; ``None`` where a fraction is unknown. Shared by the
    W&B table and the HTML report, so both show the same numbers.
    """
    fractions = matrix_columns(per_matrix)
    rows = [[name, layer_of(name), kind_of(name), int(values.get("numel", 0)), *(values.get(c) for c in fractions)]
            for name, values in per_matrix.items()]
    return ["name", "layer", "kind", "numel", *fractions], rows


ESTIMATED_METRICS = ("cancelled", "absorbed")  # split in the proportion seen on the sampled elements
_DEFAULT_SAMPLING = ("sampled", 64)  # TrackerConfig's default, for a run log that does not say


def sampling_stride(info: Mapping[str, Any]) -> int | None:
    """Every how many elements a run kept gradient sums, when it kept only some; ``None`` when it kept them
    all (``cancellation="full"``, or ``"sampled"`` at stride 1) or none (``"off"``).

    Read from the run's ``info["tracker_config"]``; a run log without one is taken to use the tracker's
    default (``"sampled"``, every 64th element).
    """
    config = info.get("tracker_config") or {}
    mode = config.get("cancellation", _DEFAULT_SAMPLING[0])
    stride = config.get("sample_stride", _DEFAULT_SAMPLING[1])
    return stride if mode == "sampled" and isinstance(stride, int) and stride > 1 else None


def is_estimate(values: Mapping[str, Any], metric: str, stride: int | None) -> bool:
    """Whether ``values[metric]`` (a summary's fractions of one group: global, a layer, a matrix...) is an
    estimate from sampled gradient sums rather than a count.

    ``cancelled`` and ``absorbed`` split the elements that received a gradient but kept their value in the
    proportion seen on the sampled elements (:mod:`gradtrace.tracking.summary`): an estimate when the run
    sampled (``stride``, from :func:`sampling_stride`) and there was something to split; when nothing was
    (``cancelled + absorbed == 0``) both are exactly 0. Every other fraction is counted on every element.
    """
    value = values.get(metric)
    if stride is None or metric not in ESTIMATED_METRICS or not isinstance(value, (int, float)):
        return False
    return sum(values.get(m) or 0.0 for m in ESTIMATED_METRICS) > 0


def percent(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage string (``0.953125`` -> ``"95.31%"``); ``"—"`` when unknown."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return f"{100 * value:.{digits}f}%"


def run_label(run_dir: str | os.PathLike, info: Mapping[str, Any] | None = None) -> str:
    """How a run is named in reports: ``info["label"]`` if set, else its directory name.

    The Trainer callback writes to ``<output_dir>/gradtrace`` by default, where the directory name says
    nothing; the trainer's output directory is used then.
    """
    if info and info.get("label"):
        return str(info["label"])
    path = Path(run_dir).resolve()
    if path.name == "gradtrace" and path.parent.name:
        return path.parent.name
    return path.name


@dataclass
class RunData:
    """One run as the report sees it: its log records and the final summary."""

    path: Path
    label: str
    info: dict[str, Any]
    logs: list[dict[str, Any]]
    final: dict[str, Any]
    ended: bool

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of a global metric, skipping steps where it is unknown."""
        points = [(int(r["step"]), r["global"].get(metric)) for r in self.logs]
        kept = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
        return [s for s, _ in kept], [v for _, v in kept]


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read a run directory (``log.jsonl``, plus ``summary.json`` if the run exported one).

    ``summary.json`` is the final export; it is used as the final summary when it was written after the
    last log record (a run resumed from an earlier checkpoint may have left an older one). Raises
    ``FileNotFoundError`` without a run log and ``ValueError`` when the run has not logged a measurement yet.
    """
    directory = find_run_dir(run_dir)
    log = read_run_log(directory)
    logs = log["logs"]
    info = dict(log["info"])
    final = logs[-1] if logs else None
    summary_path = directory / SUMMARY_NAME
    if summary_path.is_file():
        try:
            exported = json.loads(summary_path.read_text(encoding="utf-8"))
            written = summary_path.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            exported = None  # being rewritten or damaged: the log alone still makes a report
        same_run = (exported or {}).get("info", {}).get("run_id") in (None, info.get("run_id"))
        if exported and "global" in exported and same_run and (
                final is None or (exported.get("step", -1) >= final["step"] and written >= final.get("time", 0))):
            final = exported
            info = info or dict(exported.get("info") or {})
    if final is None:
        raise ValueError(f"{log['path']}: the run has not logged a measurement yet (no 'log' record); "
                         "make the report after its first logging step")
    if not logs:
        logs = [final]
    return RunData(path=directory, label=run_label(directory, info), info=info, logs=logs, final=final,
                   ended=log["end"] is not None)


def evolution_steps(steps: Sequence[int], count: int = 6) -> list[int]:
    """Up to ``count`` logged steps spread evenly from the first to the last (both included)."""
    if len(steps) <= count:
        return list(steps)
    picks = {round(i * (len(steps) - 1) / (count - 1)) for i in range(count)}
    return [steps[i] for i in sorted(picks)]
