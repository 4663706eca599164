"""gradtrace in a plain PyTorch loop: hook the optimizer, and every step is tracked.

    tracer = gradtrace.trace(model, optimizer, "runs/my-run", log_every=10)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()          # gradtrace reads the clipped gradient just before the step
        optimizer.zero_grad()
    tracer.finish()               # masks.safetensors + summary.json in runs/my-run

or ``with gradtrace.trace(...) as tracer:`` around the loop: it finishes at the end of the block, and
when an exception (``KeyboardInterrupt`` too) leaves it, still writes the masks of the steps taken,
marked interrupted. A tracer never finished writes them at exit (``atexit``) the same way.

The optimizer's step pre-hook sees ``.grad`` exactly as the step will apply it (accumulated over any
micro-batches and clipped), and the post-hook sees the result of the step. A DeepSpeed engine is traced
the same way, ``gradtrace.trace(engine, engine.optimizer, ...)``: the gradient is read inside the engine's
step (:mod:`gradtrace.integrations.gradient_sources` chooses where).
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradtrace.integrations.failures import Failures, GradTraceWarning
from gradtrace.integrations.gradient_sources import GradientSource, choose_gradient_source
from gradtrace.integrations.opening import SinkChoice, open_session
from gradtrace.integrations.session import TraceSession, interruption
from gradtrace.sinks.payload import LAYER_STEP_METRICS, LiveCharts
from gradtrace.sinks.select import normalize_report_to
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.tracker import GradTracker


class Tracer:
    """A tracked plain loop; returned by :func:`trace`."""

    def __init__(self, session: TraceSession, source: GradientSource, log_every: int | None):
        self.session = session
        self.log_every = log_every
        self._source = source
        source.attach(session, failures=session.failures, wants_detail=self._logs_next_step,
                      after_step=self._log_if_due)
        session.start(step=0)
        self._finished = False
        atexit.register(self._finish_at_exit)

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if not self._finished:
            self.finish(interrupted=f"{kind.__name__}: {err}" if kind is not None else None)

    @property
    def tracker(self) -> GradTracker:
        return self.session.tracker

    @property
    def step(self) -> int:
        """Optimizer steps seen so far."""
        return self.session.tracker.steps

    def _logs_next_step(self) -> bool:
        """Whether the coming step will be logged (then its gradient density is counted too)."""
        return not self.log_every or (self.step + 1) % self.log_every == 0

    def _log_if_due(self) -> None:
        if self.log_every and self.step % self.log_every == 0:
            self.session.log(self.step)

    def log(self) -> dict[str, Any]:
        """Measure and log now; returns the summary."""
        return self.session.log(self.step)

    def save_state(self, directory: str | os.PathLike) -> None:
        """Save tracker state (to resume from) and masks into ``directory``, e.g. beside your checkpoint."""
        self.session.save_state(directory, step=self.step)

    def load_state(self, directory: str | os.PathLike) -> None:
        """Resume from what :meth:`save_state` wrote: the same masks, and the same run in the run log."""
        self.session.restore_state(directory)
        self.session.start(step=self.step, resumed_from=str(directory))

    def finish(self, *, interrupted: str | None = None) -> str | None:
        """Final masks and summary; removes the optimizer hooks. Returns the masks file's path (``None``
        when tracking was switched off by a failure: its state stopped mid-step, nothing more is written).

        ``interrupted``: why the loop stopped early; the summary and the run log's ``end`` record say it."""
        self._finished = True
        atexit.unregister(self._finish_at_exit)
        self._source.remove()
        if self.session.failures.switched_off:
            return None
        path = self.session.finish(self.step, interrupted=interrupted)
        return str(path) if path else None

    def _finish_at_exit(self) -> None:
        """The process exits with the tracer unfinished (an uncaught exception, or no ``finish()``)."""
        if self._finished or self.session.failures.switched_off:
            return
        # Gathering the masks needs every rank, which may be gone; and a collective issued while the
        # interpreter ends can deadlock it (docs/distributed.md, "Ending a distributed run").
        if self.session.processes > 1:
            warnings.warn("gradtrace: the process exits with the tracer unfinished; under several processes "
                          "its masks are not written at exit", GradTraceWarning, stacklevel=1)
            return
        try:
            self.finish(interrupted=interruption())
        except Exception as err:
            warnings.warn(f"gradtrace: writing the masks at exit failed ({type(err).__name__}: {err})",
                          GradTraceWarning, stacklevel=1)


def trace(model: nn.Module, optimizer: torch.optim.Optimizer, output_dir: str | os.PathLike, *,
          config: TrackerConfig | None = None, log_every: int | None = 10,
          report_to: str | list[str] | None = None, wandb: bool = True, heatmaps: bool = True,
          per_layer_curves: bool = False, layer_step_metrics: Iterable[str] = LAYER_STEP_METRICS,
          strict: bool = False, is_main_process: bool = True,
          split: bool | None = None, sync_dtype: str | None = None, sync_every: int = 1,
          **info: Any) -> Tracer:
    """Start tracking ``model``'s trainable parameters that ``optimizer`` steps, through its steps.

    ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer`` after ``accelerator.prepare``): the
    hooks go on the optimizer inside, which steps once per accumulation cycle.

    A DeepSpeed engine (ZeRO-0/1/2/3): ``trace(engine, engine.optimizer, ...)`` (``optimizer`` may also be
    ``None``) on every rank, after ``deepspeed.initialize``. The gradient is read inside the engine's
    optimizer step, each parameter named as in ``engine.module``; ``engine.step()`` drives it as
    ``optimizer.step()`` does a plain loop. See :mod:`gradtrace.integrations.deepspeed`.

    Logs every ``log_every`` optimizer steps to ``output_dir/log.jsonl`` and to the trackers in
    ``report_to`` (``"wandb"``, ``"mlflow"``, ``"trackio"``: the run active at the first log;
    ``"tensorboard"``: ``$TENSORBOARD_LOGGING_DIR`` or ``output_dir/tensorboard``). Default: W&B,
    MLflow and trackio, each only while you have a run of it open. ``wandb=False`` leaves W&B out;
    ``heatmaps`` / ``per_layer_curves`` / ``layer_step_metrics`` as for :class:`~gradtrace.GradTraceCallback`. Under DDP every rank
    calls ``trace`` and the ranks divide the tracking among them (``split``, see :class:`GradTracker`). Extra keyword
    arguments (e.g. ``max_grad_norm=1.0``) are recorded in the run's info. ``sync_dtype`` /
    ``sync_every``: the weight-sync budget, as for :class:`~gradtrace.GradTraceCallback` (default off;
    not under DeepSpeed). ``strict``: raise when gradtrace itself fails; by default a failure is said once
    and training goes on (a failed step read switches tracking off: no masks are written then).
    """
    # First: an unknown layer_step_metrics name fails here, before any tracker state is allocated (and
    # is never taken for a run-info keyword).
    charts = LiveCharts(heatmaps=heatmaps, per_layer_curves=per_layer_curves, layer_step_metrics=layer_step_metrics)
    names = (["wandb", "mlflow", "trackio"] if report_to is None
             else normalize_report_to(report_to, strict=True))
    names = [n for n in names if wandb or n != "wandb"]
    source = choose_gradient_source(model, optimizer)
    failures = Failures(strict)
    sinks = SinkChoice(names, step_key="gradtrace/step", charts=charts,
                       tensorboard_dir=os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "tensorboard"),
                       say_problems=report_to is not None)  # the default names only what is open
    session = open_session(source, output_dir, config=config, split=split, sinks=sinks, failures=failures,
                           is_main_process=is_main_process, sync_dtype=sync_dtype, sync_every=sync_every, info=info)
    return Tracer(session, source, log_every)
