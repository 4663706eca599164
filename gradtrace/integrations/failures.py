"""How gradtrace meets its own failures, the same way in every adapter: never by crashing training.

- A failed *action* (writing the run log or masks, a sink, the weight-sync observer) is said once per key
  and skipped; the caller may drop the part that failed (a sink, the observer).
- A failed *event* (reading a step's gradient, a Trainer event) leaves the tracker's state half-updated:
  the instrument is switched off for the rest of the run (its hooks removed, nothing more written) and
  says so once.
- ``strict=True`` (tests) raises instead, at the point of failure.

One :class:`Failures` serves a run: the Trainer callback's events, :func:`gradtrace.trace`'s optimizer
hooks, the DeepSpeed step hook and the session's writes all go through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


class GradTraceWarning(RuntimeWarning):
    """gradtrace degraded (a sink or a write failed) but training goes on."""


class Failures:
    """One run's failure policy: warn once per key, switch off on a failed event, raise when ``strict``."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.switched_off = False
        self._said: set[str] = set()
        self._on_switch_off: list[Callable[[], None]] = []

    def warn_once(self, key: str, message: str) -> None:
        """Say ``message`` (as a :class:`GradTraceWarning`), unless something under ``key`` was said already."""
        if key not in self._said:
            self._said.add(key)
            warnings.warn(f"gradtrace: {message}", GradTraceWarning, stacklevel=3)

    def attempt(self, key: str, what: str, action: Callable[..., Any], *args: Any,
                consequence: str = "training continues", dropped: Callable[[], None] | None = None) -> Any:
        """``action(*args)``; if it fails, call ``dropped`` (the caller gives up the part that failed), say
        "``what`` failed (...); ``consequence``" once per ``key`` and return ``None``."""
        try:
            return action(*args)
        except Exception as err:
            if self.strict:
                raise
            if dropped is not None:
                dropped()
            self.warn_once(key, f"{what} failed ({type(err).__name__}: {err}); {consequence}")
            return None

    def guard(self, where: str, event: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an event unless the instrument is switched off; if it fails, :meth:`fail`."""
        if self.switched_off:
            return None
        try:
            return event(*args, **kwargs)
        except Exception as err:
            self.fail(where, err)
            return None

    def fail(self, where: str, err: Exception) -> None:
        """An event failed: raise ``err`` when strict, else switch the instrument off and say so once."""
        if self.strict:
            raise err
        if self.switched_off:
            return
        self.switched_off = True
        unstopped = []
        for stop in self._on_switch_off:
            try:
                stop()
            except Exception as stop_err:  # the others still stop
                unstopped.append(f"{type(stop_err).__name__}: {stop_err}")
        also = f" (stopping it also failed: {'; '.join(unstopped)})" if unstopped else ""
        warnings.warn(f"gradtrace: {where} failed ({type(err).__name__}: {err}); tracking is switched off for "
                      f"the rest of this run, training continues{also}", GradTraceWarning, stacklevel=3)

    def when_switched_off(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` (remove a hook, release a claim) when a failed event switches the instrument off."""
        self._on_switch_off.append(stop)
