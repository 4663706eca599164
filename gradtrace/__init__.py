"""gradtrace: see, live during training, which parameters a fine-tuning run really touches.

The package is laid out as the pipeline's rooms; imports only go down this list:

- ``formats``: the plain data every room exchanges (masks file, run log, run-directory names);
- ``anatomy``: where a parameter sits (layer, module kind) and grouping by it;
- ``tracking``: the tracker, its state, and summaries of it (no transformers, no W&B);
- ``views`` (report, watch) and ``masks`` (diff, overlap, rank, subnetwork): work from files;
- ``sinks``: where summaries go besides the run log (W&B);
- ``integrations``: the Trainer / TRL callback, the plain loop (also a DeepSpeed engine's);
- ``cli`` and ``demo`` on top.

``GradTraceCallback`` and ``SubnetworkCallback`` (transformers) are imported on first use, so
``import gradtrace`` in a plain PyTorch loop does not import transformers.
"""

from __future__ import annotations

from typing import Any

from gradtrace.formats.masks_file import MaskFileError, Masks, load_masks, save_masks
from gradtrace.formats.run_log import read_run_log
from gradtrace.integrations.failures import GradTraceWarning
from gradtrace.integrations.plain_loop import Tracer, trace
from gradtrace.integrations.session import TraceSession
from gradtrace.masks.subnetwork import restrict_to_subnetwork
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.summary import summarize
from gradtrace.tracking.tracker import GradTracker, Measurement

__version__ = "0.1.0"

__all__ = [
    "GradTraceCallback",
    "GradTraceWarning",
    "GradTracker",
    "MaskFileError",
    "Masks",
    "Measurement",
    "SubnetworkCallback",
    "TraceSession",
    "Tracer",
    "TrackerConfig",
    "load_masks",
    "read_run_log",
    "restrict_to_subnetwork",
    "save_masks",
    "summarize",
    "trace",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import gradtrace` in a plain PyTorch loop does not import transformers.
    if name == "GradTraceCallback":
        from gradtrace.integrations.trainer import GradTraceCallback

        return GradTraceCallback
    if name == "SubnetworkCallback":
        from gradtrace.masks.subnetwork import SubnetworkCallback

        return SubnetworkCallback
    raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")
