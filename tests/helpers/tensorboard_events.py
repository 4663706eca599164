"""TensorBoard's own reader over a log folder. Importing this module skips the importing test (or module)
when tensorboard is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorboard")


def tb_events(log_dir: Path):
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0,
                                     event_accumulator.HISTOGRAMS: 0, event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator
