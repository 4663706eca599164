"""Send summaries to the active Weights & Biases run (the Trainer's, or the user's ``wandb.init``).

Keys: ``gradtrace/<metric>`` for the global curves, ``gradtrace_kind/<kind>/<metric>`` and
``gradtrace_layer/<NN>/<metric>`` for the breakdowns, so W&B's default layout (a section per first
path segment) gives one section per view. Every series is plotted against ``step_key``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BREAKDOWN_METRICS = ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_summary(summary: dict[str, Any]) -> dict[str, float]:
    """The W&B payload for one summary: global curves and per-kind / per-layer breakdowns."""
    payload = {f"gradtrace/{key}": value for key, value in summary["global"].items() if _finite(value)}
    for kind, values in summary["per_kind"].items():
        payload.update({f"gradtrace_kind/{kind}/{m}": values[m] for m in BREAKDOWN_METRICS if _finite(values.get(m))})
    width = max((len(layer) for layer in summary["per_layer"]), default=1)
    for layer, values in summary["per_layer"].items():
        name = layer.zfill(width)  # zero-padded so panels sort in layer order
        payload.update({f"gradtrace_layer/{name}/{m}": values[m] for m in BREAKDOWN_METRICS if _finite(values.get(m))})
    return payload


class WandbSink:
    """Logs to ``run`` or, if none is given, to whatever ``wandb.run`` is active at each log.

    Does nothing while no run is active (W&B not installed, or never initialised): the local run log
    is the record of truth; this is a live view of it.
    """

    name = "W&B"

    def __init__(self, run: Any | None = None, step_key: str = "gradtrace/step"):
        self._explicit_run = run
        self.step_key = step_key
        self._defined_for: Any | None = None

    def _run(self) -> Any | None:
        if self._explicit_run is not None:
            return self._explicit_run
        try:
            import wandb
        except ImportError:
            return None
        return wandb.run

    def _define_metrics(self, run: Any) -> None:
        if self._defined_for is run:
            return
        run.define_metric(self.step_key)
        for prefix in ("gradtrace/*", "gradtrace_kind/*", "gradtrace_layer/*"):
            run.define_metric(prefix, step_metric=self.step_key)
        self._defined_for = run

    def log(self, summary: dict[str, Any], step: int) -> None:
        run = self._run()
        if run is None:
            return
        self._define_metrics(run)
        payload = flatten_summary(summary)
        payload[self.step_key] = step
        run.log(payload)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        run = self._run()
        if run is None or not summary:
            return
        run.summary.update({f"gradtrace/final/{k}": v for k, v in summary["global"].items() if _finite(v)})
