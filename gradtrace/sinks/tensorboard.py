"""Send summaries to TensorBoard: event files in the log dir the Trainer's ``TensorBoardCallback`` writes.

TensorBoard reads every event file of a directory as one run, so the sink writes its own file beside the
Trainer's (``$TENSORBOARD_LOGGING_DIR``, or the newest ``<output_dir>/runs/<date_host>``) and its charts
appear in the Trainer's run, on the same global-step axis. Shown: the scalars (SCALARS tab), the layer x
step and layer x kind images (IMAGES), the cancellation-ratio histogram (HISTOGRAMS); as text (TEXT), the
run summary (``gradtrace/run_summary``: the counters and any anatomy warning at the first logging step,
every final value at the end) and the per-matrix table. TensorBoard has no artifacts: the masks file
stays in the run dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradtrace.sinks.payload import (
    GLOBAL_SECTION,
    HISTOGRAM_KEY,
    TABLE_KEY,
    LiveCharts,
    anatomy_warnings,
    final_summary,
)

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
            height, width = frame.pixels[key].shape[:2]
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
        columns, rows = self.charts.table(summary)

        def cell(value: Any) -> str:
            return f"{value:.6g}" if isinstance(value, float) else "" if value is None else str(value)

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows[:TEXT_TABLE_ROWS]]
        if len(rows) > TEXT_TABLE_ROWS:
            lines.append(f"\n{len(rows) - TEXT_TABLE_ROWS} more rows in {Path(run_dir) / 'summary.json'}")
        writer.add_text(TABLE_KEY, "\n".join(lines), summary["step"])
        writer.close()
        self._writer = None
