"""gradtrace: see, live during training, which parameters a fine-tuning run really touches.

The core (:class:`GradTracker`, :func:`trace`, masks I/O) imports neither transformers nor W&B;
``GradTraceCallback`` (transformers / TRL) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from gradtrace.config import TrackerConfig
from gradtrace.loop import Tracer, trace
from gradtrace.masks_file import MaskFileError, Masks, load_masks, save_masks
from gradtrace.run_log import read_run_log
from gradtrace.session import GradTraceWarning, TraceSession
from gradtrace.summary import summarize
from gradtrace.tracker import GradTracker, Measurement

__version__ = "0.1.0"

__all__ = [
    "GradTraceCallback",
    "GradTraceWarning",
    "GradTracker",
    "MaskFileError",
    "Masks",
    "Measurement",
    "TraceSession",
    "Tracer",
    "TrackerConfig",
    "load_masks",
    "read_run_log",
    "save_masks",
    "summarize",
    "trace",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import gradtrace` in a plain PyTorch loop does not import transformers.
    if name == "GradTraceCallback":
        from gradtrace.callback import GradTraceCallback

        return GradTraceCallback
    if name == "SubnetworkCallback":
        from gradtrace.subnetwork import SubnetworkCallback

        return SubnetworkCallback
    raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")
