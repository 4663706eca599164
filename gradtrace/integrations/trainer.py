"""``GradTraceCallback``: gradtrace for ``transformers.Trainer`` and every TRL trainer built on it.

A thin adapter: it maps Trainer events onto a :class:`~gradtrace.integrations.session.TraceSession`.

- ``on_train_begin``: start tracking the trainable parameters the optimizer steps (after PEFT/accelerate
  wrapping; :mod:`gradtrace.integrations.parameters`), read from the gradient source of the Trainer's
  engine (:mod:`gradtrace.integrations.gradient_sources`); when resuming, restore the tracker state saved
  with the checkpoint the Trainer resumed from (refused when it was saved with other weights: another
  run's). One run directory takes one callback at a time.
- ``on_pre_optimizer_step``: the gradient is accumulated over micro-batches and clipped here, and is
  exactly what ``optimizer.step()`` applies: fold it into the masks (after noticing any change of the
  parameter set since the last step). Under DeepSpeed the engine has applied and freed it already,
  inside ``accelerator.backward``: its source read it inside the engine's step, and does nothing here.
- ``on_optimizer_step``: record what the step changed (``ever_changed`` mode, the weight-sync budget).
- ``on_step_end`` / ``on_epoch_end``: measure and log on the trainer's logging steps (``logging_strategy``
  "steps" or "epoch").
- ``on_save``: save tracker state, masks and summary into ``checkpoint-N/gradtrace/``.
- ``on_train_end``: final masks and summary into the run directory. Training stopped by an exception
  (``KeyboardInterrupt`` too) has no event: the masks of the steps taken are written at exit (``atexit``),
  marked interrupted.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from gradtrace.integrations.failures import Failures, GradTraceWarning
from gradtrace.integrations.gradient_sources import GradientSource, choose_gradient_source
from gradtrace.integrations.opening import SinkChoice, open_session
from gradtrace.integrations.session import TraceSession, interruption
from gradtrace.sinks.payload import LAYER_STEP_METRICS, LiveCharts
from gradtrace.sinks.select import normalize_report_to
from gradtrace.sinks.tensorboard import trainer_log_dir
from gradtrace.sync.patch import sync_dtype as parse_sync_dtype
from gradtrace.tracking.config import TrackerConfig
from gradtrace.tracking.tracker import GradTracker

CHECKPOINT_SUBDIR = "gradtrace"


class _RunDirClaims:
    """Which callback is writing into which run directory now, in this process.

    Two callbacks with one directory (two on one trainer, or two trainers sharing an ``output_dir``) would
    overwrite each other's log, masks and checkpoint state: the second is refused. A claim counts while
    its training goes on: the same ``train()`` call (its ``TrainerState``), or another thread that is
    still alive; a run interrupted earlier in this thread (a notebook cell stopped) holds nothing."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders: dict[str, tuple[Any, Any, threading.Thread]] = {}

    def claim(self, run_dir: str, callback: Any, state: Any) -> None:
        key = os.path.realpath(run_dir)
        with self._lock:
            held = self._holders.get(key)
            if held is not None and held[0] is not callback:
                other, other_state, thread = held
                if other_state is state or (thread is not threading.current_thread() and thread.is_alive()):
                    where = "on this trainer" if other_state is state else f"in thread {thread.name!r}"
                    raise ValueError(f"{run_dir} is already the run directory of another GradTraceCallback "
                                     f"training now ({where}); both would overwrite the same log, masks and "
                                     "checkpoint state: give each its own GradTraceCallback(output_dir=...)")
            self._holders[key] = (callback, state, threading.current_thread())

    def release(self, callback: Any) -> None:
        with self._lock:
            for key in [k for k, held in self._holders.items() if held[0] is callback]:
                del self._holders[key]


RUN_DIR_CLAIMS = _RunDirClaims()


def _is_trainer(obj: Any) -> bool:
    """A ``transformers.Trainer`` (TRL's trainers included), without importing the Trainer module."""
    return any(c.__name__ == "Trainer" and c.__module__ == "transformers.trainer" for c in type(obj).__mro__)


def _guarded(method):
    """Run a callback event under the run's failure policy: on error, tracking is switched off for the rest
    of the run with one warning, rather than training crashed (``strict``: raised)."""

    @functools.wraps(method)
    def wrapper(self: GradTraceCallback, args, state, control, **kwargs):
        self.failures.guard(method.__name__, method, self, args, state, control, **kwargs)
        return control

    return wrapper


class GradTraceCallback(TrainerCallback):
    """Track which parameters receive gradients and which change, live, from one callback.

    Args:
        output_dir: where the run log, masks and summary go; default ``<TrainingArguments.output_dir>/gradtrace``.
        config: a :class:`TrackerConfig`; keyword arguments (e.g. ``cancellation="full"``) build one.
        log_every: measure every this many optimizer steps; default: on the trainer's logging steps.
        report_to: the trackers to show gradtrace's charts in (``"wandb"``, ``"tensorboard"``, ``"mlflow"``,
            ``"trackio"``, a list, ``"all"`` or ``"none"``); default: the Trainer's ``args.report_to``,
            into the run each Trainer integration opened. W&B is also used whenever a run is active
            (your own ``wandb.init``), unless ``wandb=False``.
        wandb: allow W&B (``False``: never log to it, whatever ``report_to`` says).
        heatmaps: also log the images (layer x step per metric, layer x kind); see README for their cost.
        per_layer_curves: also log one scalar series per layer and metric (``gradtrace_layer/<NN>/...``).
        layer_step_metrics: the per-layer metrics drawn as layer x step images (``gradtrace_layer_step/<metric>``),
            any of :data:`~gradtrace.sinks.payload.BREAKDOWN_METRICS`; default the two sparsities. An unknown
            name is a ``ValueError`` here, not at the first logging step.
        resume_from: a checkpoint directory to restore tracker state from when the trainer resumes;
            default the checkpoint the Trainer resumed from (``train(resume_from_checkpoint=...)``, any
            path or ``True``). State saved with other weights than those resumed is refused.
        split: under DDP and DeepSpeed ZeRO-0/1/2 the ranks divide the tracking among them (each keeps the
            state of a share of the parameters; ZeRO-1/2: of its optimizer partition); ``False``: every rank
            tracks everything. See :class:`GradTracker`.
        sync_dtype: measure the weight-sync budget (:mod:`gradtrace.sync`): what each optimizer step changes
            bitwise in this dtype (``"bfloat16"``: the cast an inference engine receives; ``"storage"``: as
            stored), and the patch bytes per encoding. Keeps the previous values on the host (2 B per
            parameter in bf16). Default ``None``: off.
        sync_every: the sync interval in optimizer steps, for the ``window_changed`` fraction and bytes.
        strict: raise instead of warning when gradtrace itself fails (for tests).
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, config: TrackerConfig | None = None, *,
                 log_every: int | None = None, report_to: str | list[str] | None = None, wandb: bool = True,
                 heatmaps: bool = True, per_layer_curves: bool = False,
                 layer_step_metrics: Iterable[str] = LAYER_STEP_METRICS,
                 resume_from: str | os.PathLike | None = None, split: bool | None = None,
                 strict: bool = False, sync_dtype: str | None = None, sync_every: int = 1,
                 **config_kwargs: Any):
        if config is not None and config_kwargs:
            raise TypeError("pass either config=TrackerConfig(...) or its fields as keywords, not both")
        self.config = config or TrackerConfig(**config_kwargs)
        self.output_dir = output_dir
        self.log_every = log_every
        self.report_to = None if report_to is None else normalize_report_to(report_to, strict=True)
        self.use_wandb = wandb
        self.charts = LiveCharts(heatmaps=heatmaps, per_layer_curves=per_layer_curves,
                                 layer_step_metrics=layer_step_metrics)
        self.resume_from = resume_from
        self.split = split
        self.strict = strict
        parse_sync_dtype(sync_dtype)  # an unknown dtype fails here, not at the first step
        self.sync_dtype, self.sync_every = sync_dtype, sync_every
        self.session: TraceSession | None = None
        self.gradient_source: GradientSource | None = None
        # One policy for the events below, the session's writes and the gradient source's hooks. Once an
        # event fails, tracking stays off: no more events, no claim on the run directory, nothing at exit.
        self.failures = Failures(strict)
        self.failures.when_switched_off(functools.partial(RUN_DIR_CLAIMS.release, self))
        self.failures.when_switched_off(functools.partial(atexit.unregister, self._finish_interrupted))

    @property
    def tracker(self) -> GradTracker | None:
        return self.session.tracker if self.session else None

    @property
    def summary(self) -> dict[str, Any] | None:
        """The latest summary (global / per_layer / per_kind / per_matrix fractions)."""
        return self.session.last_summary if self.session else None

    @property
    def run_dir(self) -> str | None:
        return str(self.session.run_dir) if self.session else None

    @_guarded
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("the Trainer passed no model to on_train_begin")
        # the Trainer's own DeepSpeed setting: anything there that cannot be tracked is refused clearly
        configured = bool(getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None))
        source = choose_gradient_source(model, optimizer, deepspeed_configured=configured)
        run_dir = self.output_dir or os.path.join(args.output_dir, "gradtrace")
        if state.is_world_process_zero:  # the main process writes; other ranks share its directory
            RUN_DIR_CLAIMS.claim(str(run_dir), self, state)
        mixed = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "no"
        info = dict(
            max_grad_norm=args.max_grad_norm,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            mixed_precision=mixed,
            world_size=args.world_size,
            model_class=type(model).__name__,
            model_name=getattr(getattr(model, "config", None), "_name_or_path", None),
            trainer_output_dir=args.output_dir,
        )
        self.session = open_session(source, run_dir, config=self.config, split=self.split, sinks=self._sinks(args),
                                    failures=self.failures, is_main_process=state.is_world_process_zero,
                                    sync_dtype=self.sync_dtype, sync_every=self.sync_every, info=info)
        self._train_state = state
        # The Trainer announces each optimizer step (on_pre_optimizer_step / on_optimizer_step, below).
        # Asked before the step, when global_step is still the previous one; `state` is the Trainer's own.
        source.attach(self.session, failures=self.failures, announced=True,
                      wants_detail=lambda: self._logs_at(args, state.global_step + 1))
        self.gradient_source = source
        resumed_from = None
        if state.global_step > 0:  # after attaching: under ZeRO-1/2 that decides which part each rank keeps
            checkpoint, how = self._resumed_checkpoint(args, state)
            resumed_from = os.path.join(checkpoint, CHECKPOINT_SUBDIR)
            try:
                self.session.restore_state(resumed_from, weights_from=checkpoint, step=state.global_step)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err} (the checkpoint is {how})") from err
        self.session.start(step=state.global_step, resumed_from=resumed_from)
        # transformers has no event for training that stops on an exception: the masks of the steps taken
        # are written at exit instead (after the traceback), unless on_train_end comes first.
        atexit.register(self._finish_interrupted)

    def _resumed_checkpoint(self, args, state) -> tuple[str, str]:
        """The checkpoint the Trainer resumed from, and how it was found (for messages).

        transformers passes callbacks neither the trainer nor the checkpoint: ``train()`` resolves
        ``resume_from_checkpoint`` (``True``: the newest in ``output_dir``; or any path, e.g. another run's)
        into a local of its training loop. That local is read from the loop's frame, the one sure answer;
        failing that, ``args.resume_from_checkpoint``, then ``<output_dir>/checkpoint-<global step>``. The
        state found there must match the resumed weights (:meth:`TraceSession.restore_state`) anyway.
        """
        if self.resume_from:
            return str(self.resume_from), f"{self.resume_from} (GradTraceCallback(resume_from=...))"
        frame = sys._getframe(1)
        while frame is not None:
            if _is_trainer(frame.f_locals.get("self")) and isinstance(frame.f_locals.get("resume_from_checkpoint"), str):
                path = frame.f_locals["resume_from_checkpoint"]
                return path, f"{path}, the one the Trainer resumed from"
            frame = frame.f_back
        given = getattr(args, "resume_from_checkpoint", None)
        if isinstance(given, str) and os.path.isdir(given):
            return given, f"{given}, from TrainingArguments.resume_from_checkpoint"
        guess = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return guess, (f"{guess}, guessed from output_dir and the global step: the Trainer's own choice "
                       "was not found")

    def _sinks(self, args) -> SinkChoice:
        """The trackers to show the charts in: ``report_to`` (or the Trainer's), each into the Trainer's run."""
        names = self.report_to if self.report_to is not None else normalize_report_to(args.report_to)
        if self.report_to is None and "wandb" not in names:
            names = [*names, "wandb"]  # a run you opened yourself (wandb.init) still gets the panels, as before
        if not self.use_wandb:
            names = [n for n in names if n != "wandb"]
        return SinkChoice(names, step_key="train/global_step", charts=self.charts,
                          tensorboard_dir=lambda: trainer_log_dir(args.output_dir))

    @_guarded
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradient_source.before_step()

    @_guarded
    def on_optimizer_step(self, args, state, control, **kwargs):
        self.gradient_source.after_step()

    def _logs_at(self, args, step: int) -> bool:
        """Whether ``step`` will be a logging step (then the step's gradient density is counted too)."""
        if self.log_every:
            return step % self.log_every == 0
        if str(getattr(args, "logging_strategy", "steps")).split(".")[-1].lower() != "steps":
            return True  # epoch-based logging: cannot tell in advance, so count every step
        return step % max(1, int(args.logging_steps)) == 0 or (step == 1 and bool(args.logging_first_step))

    @_guarded
    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.log_every == 0 if self.log_every else control.should_log
        if due:
            self._log(state.global_step)

    @_guarded
    def on_epoch_end(self, args, state, control, **kwargs):
        # logging_strategy="epoch" sets should_log at the end of each epoch, after on_step_end has run.
        if not self.log_every and control.should_log:
            self._log(state.global_step)

    def _log(self, step: int) -> None:
        if self.summary is None or self.summary["step"] != step:  # once per step
            self.session.log(step)

    @_guarded
    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.session.save_state(os.path.join(checkpoint, CHECKPOINT_SUBDIR), step=state.global_step)

    @_guarded
    def on_train_end(self, args, state, control, **kwargs):
        self.gradient_source.remove()
        atexit.unregister(self._finish_interrupted)
        try:
            self.session.finish(state.global_step)
        finally:
            RUN_DIR_CLAIMS.release(self)

    def _finish_interrupted(self) -> None:
        """At exit, when training stopped on an exception (or ``KeyboardInterrupt``, ``sys.exit``) before
        ``on_train_end``: write the masks and summary of the steps taken, marked interrupted, and the run
        log's ``end`` record saying why. Not under several processes: gathering the masks needs every rank,
        which may be gone (the checkpoints keep theirs)."""
        atexit.unregister(self._finish_interrupted)
        if self.failures.switched_off or self.session is None:
            return
        reason = interruption()
        if self.session.processes > 1:  # the world it started in: it may be destroyed by now
            warnings.warn(f"gradtrace: training stopped ({reason}); under several processes the masks since "
                          "the last checkpoint are not written at exit", GradTraceWarning, stacklevel=1)
            return
        try:
            self.session.finish(self._train_state.global_step, interrupted=reason)
        except Exception as err:
            warnings.warn(f"gradtrace: writing the masks of the interrupted run failed ({type(err).__name__}: "
                          f"{err})", GradTraceWarning, stacklevel=1)
        finally:
            RUN_DIR_CLAIMS.release(self)
