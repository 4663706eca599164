"""Opening a traced run, one way for every adapter: tracker, run info, sinks, session and sync observer.

:func:`gradtrace.trace` and the Trainer callback differ in what they know (the Trainer's arguments, a
``report_to`` default, the W&B x axis), not in how a run is built from it: :func:`open_session`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradtrace.integrations.failures import Failures
from gradtrace.integrations.gradient_sources import GradientSource
from gradtrace.integrations.run_info import run_info
from gradtrace.integrations.session import TraceSession
from gradtrace.sinks.payload import LiveCharts
from gradtrace.sinks.select import build_sinks
from gradtrace.sync.observer import SyncObserver
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.tracker import GradTracker


@dataclass
class SinkChoice:
    """Where a run's summaries go besides its run log (:func:`gradtrace.sinks.select.build_sinks`).

    ``names``: normalized ``report_to`` names; ``step_key``: the W&B x axis; ``tensorboard_dir``: a path, or
    a function giving it at the first log; ``say_problems``: warn about names that get no sink (a tracker
    not installed, or without a gradtrace sink).
    """

    names: list[str]
    step_key: str
    charts: LiveCharts
    tensorboard_dir: str | os.PathLike | Callable[[], str]
    say_problems: bool = True


def open_session(source: GradientSource, run_dir: str | os.PathLike, *, config: TrackerConfig | None,
                 split: bool | None, sinks: SinkChoice, failures: Failures, is_main_process: bool,
                 sync_dtype: str | None = None, sync_every: int = 1, info: dict[str, Any] | None = None
                 ) -> TraceSession:
    """A session over a new tracker of the parameters ``source`` reads, not started yet.

    ``info``: what only the adapter knows about the run (e.g. ``max_grad_norm``), recorded in its run info
    beside the tracker's and optimizer's description. ``sync_dtype`` / ``sync_every``: the weight-sync
    budget (:mod:`gradtrace.sync`), where the source supports it (else said once).
    """
    named, not_stepped = source.parameters()
    tracker = GradTracker(named, config, layout_model=source.model, split=split)
    built, problems = build_sinks(sinks.names, step_key=sinks.step_key, charts=sinks.charts,
                                  tensorboard_dir=sinks.tensorboard_dir)
    for problem in problems if sinks.say_problems else []:
        failures.warn_once(f"sink-choice-{problem}", problem)
    info = run_info(tracker, source.optimizer, **(info or {}), parameter_selection=source.selection(not_stepped))
    session = TraceSession(tracker, run_dir, sinks=built, info=info, failures=failures,
                           is_main_process=is_main_process)
    if sync_dtype is not None and source.sync_unsupported:
        failures.warn_once("sync", source.sync_unsupported)
    elif sync_dtype is not None:
        session.sync = SyncObserver(tracker.named_parameters(), sync_dtype, every=sync_every)
    current = source.current_parameters()
    if current is not None:
        session.follow_parameters(current)
    return session
