"""Which sinks a run gets: the trackers named in ``report_to`` (the Trainer's, or a keyword's).

``report_to`` is spelt as in ``transformers.TrainingArguments``: a name, a list of names, ``"all"`` or
``"none"``. The trackers gradtrace can show live are :data:`TRACKERS`; other names (``comet_ml``,
``clearml``...) get no gradtrace panels, which :func:`build_sinks` reports as a problem rather than an
error when they come from the Trainer's arguments. A tracker whose package is missing is reported too and
left out: the others, and training, go on.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from typing import Any

from gradtrace.sinks.payload import LiveCharts

# report_to name -> (package to import, extra that installs it)
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}


def normalize_report_to(report_to: str | Iterable[str] | None, *, strict: bool = False) -> list[str]:
    """``report_to`` as a list of names: ``None`` / ``"none"`` -> ``[]``, ``"all"`` -> every installed tracker.

    ``strict`` (a ``report_to=`` keyword given to gradtrace itself): a name gradtrace has no sink for is
    an error, not a note.
    """
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if any(not isinstance(n, str) for n in names):
        raise TypeError(f"report_to: expected tracker names (str), got {names!r}")
    names = [n.strip().lower() for n in names]
    if "none" in names:
        return []
    if "all" in names:
        return [n for n, package in TRACKERS.items() if importlib.util.find_spec(package) is not None]
    unknown = [n for n in names if n not in TRACKERS]
    if strict and unknown:
        raise ValueError(f"report_to: gradtrace has no sink for {unknown}; choose from {list(TRACKERS)}, "
                         "'all' or 'none'")
    return list(dict.fromkeys(names))


def build_sinks(report_to: Iterable[str], *, step_key: str, charts: LiveCharts,
                tensorboard_dir: str | os.PathLike | Callable[[], str]) -> tuple[list[Any], list[str]]:
    """One sink per supported, installed tracker in ``report_to``; and the problems, one line each.

    Args:
        report_to: normalized names (:func:`normalize_report_to`).
        step_key: the W&B x axis (the other trackers take the step with each value).
        charts: shared by all the sinks, so each step's images are rendered once.
        tensorboard_dir: TensorBoard's run directory, or a function returning it at the first log.
    """
    sinks: list[Any] = []
    problems: list[str] = []
    for name in report_to:
        if name not in TRACKERS:
            problems.append(f"report_to={name!r} has no gradtrace sink (gradtrace shows live in "
                            f"{', '.join(TRACKERS)}); its curves stay in the local run log")
            continue
        if importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(f"report_to includes {name!r} but the {TRACKERS[name]} package is not installed "
                            f"(pip install 'gradtrace[{name}]'); gradtrace skips it")
            continue
        if name == "wandb":
            from gradtrace.sinks.wandb import WandbSink

            sinks.append(WandbSink(step_key=step_key, charts=charts))
        elif name == "tensorboard":
            from gradtrace.sinks.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(tensorboard_dir, charts=charts))
        elif name == "mlflow":
            from gradtrace.sinks.mlflow import MlflowSink

            sinks.append(MlflowSink(charts=charts))
        else:
            from gradtrace.sinks.trackio import TrackioSink

            sinks.append(TrackioSink(step_key, charts=charts))
    return sinks, problems
