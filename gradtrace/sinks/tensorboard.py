"""Send summaries to TensorBoard: event files in the log dir the Trainer's ``TensorBoardCallback`` writes.

TensorBoard reads every event file of a directory as one run, so the sink writes its own file beside the
Trainer's (``$TENSORBOARD_LOGGING_DIR``, or the newest ``<output_dir>/runs/<date_host>``) and its charts
appear in the Trainer's run, on the same global-step axis. Shown: the scalars (SCALARS tab), the layer x
step and layer x kind images (IMAGES), the cancellation-ratio histogram (HISTOGRAMS); as text (TEXT), the
run summary (``gradtrace/run_summary``: the counters and any anatomy warning at the first logging step,
every final value at the end) and the per-matrix values (:func:`per_matrix_markdown`: four narrow tables,
so that the TEXT tab, which breaks words anywhere, keeps every number whole). TensorBoard has no artifacts:
the masks file stays in the run dir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradtrace.formats.run_dir import SUMMARY_NAME
from gradtrace.formats.run_log import read_run_log
from gradtrace.sinks.payload import (
    GLOBAL_SECTION,
    HISTOGRAM_KEY,
    TABLE_KEY,
    LiveCharts,
    anatomy_warnings,
    final_summary,
)
from gradtrace.views.run_data import is_estimate, matrix_columns, percent, sampling_stride

SUMMARY_TAG = f"{GLOBAL_SECTION}/run_summary"  # a text: TensorBoard's time series shows no text cards
TEXT_TABLE_ROWS = 2000  # the TEXT tab renders a markdown table; past this many matrices it is cut (the run log has all)


def trainer_log_dir(output_dir: str | os.PathLike) -> str:
    """Where ``transformers``' TensorBoardCallback writes: ``$TENSORBOARD_LOGGING_DIR``, else the newest
    ``<output_dir>/runs/*`` holding an event file (it opens it in ``on_train_begin``), else ``runs/gradtrace``."""
    chosen = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if chosen:
        return os.path.expanduser(chosen)
    runs = Path(output_dir) / "runs"
    candidates = [d for d in runs.glob("*") if d.is_dir() and any(d.glob("events.out.tfevents.*"))]
    if candidates:
        return str(max(candidates, key=lambda d: d.stat().st_mtime))
    return str(runs / "gradtrace")


def summary_text(values: dict[str, Any], warnings: str | None = None) -> str:
    """A run summary as TensorBoard's markdown: one row per value, then the anatomy warnings."""
    lines = ["| name | value |", "|---|---|"]
    lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in values.items()]
    if warnings:
        lines += ["", "**anatomy warnings**", "", *(f"- {line}" for line in warnings.splitlines())]
    return "\n".join(lines)


# The per-matrix values as a few narrow tables: TensorBoard's TEXT tab lets a word break anywhere
# (``word-break: break-word``), so a table wider than its card had its numbers broken mid-digit; at its 16 px
# text a card holds a matrix name and about three number columns.
TABLES = (
    ("sparsity per matrix", ("gradient_sparsity", "update_sparsity")),
    ("update sparsity within a tolerance", ("update_sparsity_abs_", "update_sparsity_rel_")),
    ("where each matrix's elements went: changed or not", ("no_gradient", "changed_without_gradient", "updated",
                                                           "ever_changed")),
    ("where each matrix's elements went: a gradient, yet unchanged", ("cancelled", "absorbed", "zero_lr")),
)
LEFT_OUT = ("numel", "gradient_unchanged")  # the elements are a column of their own; cancelled + absorbed + zero_lr


def _header(metric: str) -> str:
    """A column header that wraps between words only: ``update_sparsity_abs_1e-05`` -> ``abs 1e-05``,
    ``gradient_sparsity`` -> ``gradient``, ``changed_without_gradient`` -> ``changed without gradient``."""
    return metric.removeprefix("update_sparsity_").replace("_sparsity", "").replace("_", " ")


def per_matrix_markdown(per_matrix: Mapping[str, Mapping[str, Any]], stride: int | None = None,
                        rows: int = TEXT_TABLE_ROWS) -> str:
    """The final per-matrix values as markdown for TensorBoard: :data:`TABLES`, each a matrix column and a few
    values in % of the matrix's elements with two decimals (the first also the number of elements); an
    estimate from sampled gradient sums (``stride``: :func:`~gradtrace.views.run_data.sampling_stride`) reads
    ``≈``. Narrow tables rather than one wide one: every number stays whole."""
    columns = [c for c in matrix_columns(per_matrix) if c not in LEFT_OUT]
    groups = [(title, [c for c in columns if any(c == n or (n.endswith("_") and c.startswith(n)) for n in names)])
              for title, names in TABLES]  # a name ending in "_": the tolerance variants, named by their tolerance
    placed = {c for _, metrics in groups for c in metrics}
    groups[-1][1].extend(c for c in columns if c not in placed)  # a value this list does not know: shown last

    def table(metrics: list[str], with_elements: bool) -> list[str]:
        head = ["matrix", *(["elements"] if with_elements else []), *(_header(m) for m in metrics)]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name, values in list(per_matrix.items())[:rows]:
            cells = [name, *([f"{int(values.get('numel', 0)):,}"] if with_elements else [])]
            for metric in metrics:
                shown = percent(values.get(metric)).removesuffix("%")
                cells.append(("≈" if is_estimate(values, metric, stride) else "") + shown)
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    parts: list[str] = []
    for index, (title, metrics) in enumerate(groups):
        if metrics:
            parts += [*([""] if parts else []), f"**{title}** (% of its elements)", "", *table(metrics, index == 0)]
    if stride is not None and any(is_estimate(v, m, stride) for v in per_matrix.values() for m in columns):
        parts += ["", f"≈ estimated from the gradient sums kept on every {stride}th element "
                      '(cancellation="sampled")']
    return "\n".join(parts)


def _run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``info`` (its tracker settings), from ``summary.json`` or else the run log; ``{}`` if neither."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_NAME).read_text(encoding="utf-8")).get("info") or {}
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return read_run_log(run_dir)["info"] or {}
    except (OSError, ValueError):
        return {}


def png_summary(tag: str, png: bytes, height: int, width: int) -> Any:
    """An image event holding ``png`` as it is: ``SummaryWriter.add_image`` takes pixels and encodes them
    again (slowly, at PIL's default compression), while the event stores PNG bytes anyway."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class TensorBoardSink:
    """Writes gradtrace's charts as TensorBoard events.

    Args:
        log_dir: the run directory, or a function returning it (called at the first log, once the
            Trainer's callback has opened its own).
        charts: what to show (:class:`~.payload.LiveCharts`); may be shared with other sinks.
    """

    name = "TensorBoard"

    def __init__(self, log_dir: str | os.PathLike | Callable[[], str], *, charts: LiveCharts | None = None):
        self._log_dir = log_dir
        self.charts = charts or LiveCharts()
        self._writer: Any | None = None
        self._summary_written = False

    @property
    def log_dir(self) -> str | None:
        return self._writer.log_dir if self._writer is not None else None

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            log_dir = self._log_dir() if callable(self._log_dir) else str(self._log_dir)
            self._writer = SummaryWriter(log_dir=log_dir, filename_suffix=".gradtrace")
        return self._writer

    def log(self, summary: dict[str, Any], step: int) -> None:
        import numpy as np

        writer = self._open()
        frame = self.charts.frame(summary)
        for key, value in frame.scalars.items():
            writer.add_scalar(key, value, step)
        if not self._summary_written:  # once: the counters' start, and the warnings that will not change
            writer.add_text(SUMMARY_TAG, summary_text(frame.counters, anatomy_warnings(summary)), step)
            self._summary_written = True
        for key, png in frame.images.items():
            height, width = frame.drawn[key].shape
            writer._get_file_writer().add_summary(png_summary(key, png, height, width), step)  # noqa: SLF001
        if frame.histogram is not None:
            counts, edges = frame.histogram
            # add_histogram_raw wants bucket right edges and min/max/sum/sum of squares of the values;
            # with only the counts kept, each element counts at its bucket's centre.
            centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
            total = sum(counts)
            writer.add_histogram_raw(HISTOGRAM_KEY, min=edges[0], max=edges[-1], num=total,
                                     sum=float(np.dot(counts, centres)),
                                     sum_squares=float(np.dot(counts, np.square(centres))),
                                     bucket_limits=edges[1:], bucket_counts=counts, global_step=step)
        writer.flush()

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """The final values and the per-matrix table as markdown texts, then close the event file."""
        if not summary:
            return
        writer = self._open()
        writer.add_text(SUMMARY_TAG, summary_text(final_summary(summary), anatomy_warnings(summary)), summary["step"])
        table = per_matrix_markdown(summary["per_matrix"], sampling_stride(_run_info(run_dir)))
        if len(summary["per_matrix"]) > TEXT_TABLE_ROWS:
            table += f"\n\n{len(summary['per_matrix']) - TEXT_TABLE_ROWS} more rows in {Path(run_dir) / SUMMARY_NAME}"
        writer.add_text(TABLE_KEY, table, summary["step"])
        writer.close()
        self._writer = None
