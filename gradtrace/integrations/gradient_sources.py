"""Where a run reads, once per optimizer step, the gradient the step applies: one source per engine.

- :class:`OptimizerHooks`: a torch optimizer (plain PyTorch, DDP, FSDP2, accelerate). Just before
  ``optimizer.step()``, ``.grad`` is exactly what the step applies (accumulated over micro-batches,
  clipped); just after, the parameters hold its result.
- :class:`DeepSpeedStep`: a DeepSpeed engine (ZeRO-0/1/2/3). The engine reduces, applies and frees the
  gradient inside its own step, out of reach of the loop around it: it is read inside the step of the
  optimizer the engine calls (:mod:`gradtrace.integrations.deepspeed`).

:func:`choose_gradient_source` is the one place that tells engines apart; :func:`gradtrace.trace` and the
Trainer callback both ask it, and drive the source they get through the same few calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from torch import nn

from gradtrace.integrations import deepspeed
from gradtrace.integrations.failures import Failures
from gradtrace.integrations.parameters import (
    ParameterWatch,
    describe_selection,
    learning_rates,
    stepped_parameters,
    unwrap_optimizer,
)
from gradtrace.integrations.session import TraceSession

Named = list[tuple[str, nn.Parameter]]


class GradientSource(ABC):
    """Feeds a session's tracker each optimizer step's gradient, and what the step changed.

    ``model`` is the module whose parameter names the tracker uses; ``optimizer`` is the one given (the
    run info describes it). After :meth:`attach`, the source reads every step until :meth:`remove`.
    """

    #: what the run says, once, instead of measuring the weight-sync budget, where this source cannot
    sync_unsupported: str | None = None

    def __init__(self, model: nn.Module, optimizer: Any):
        self.model = model
        self.optimizer = optimizer
        self.session: TraceSession | None = None
        self.wants_detail: Callable[[], bool] = lambda: True

    @abstractmethod
    def parameters(self) -> tuple[Named, list[str]]:
        """``(tracked, not_stepped)``: the ``(name, parameter)`` pairs to track, and the names of trainable
        parameters left out."""

    @abstractmethod
    def selection(self, not_stepped: list[str]) -> dict[str, Any]:
        """What the run info says about which parameters are tracked."""

    def current_parameters(self) -> Callable[[], Named] | None:
        """A function giving the parameters to track now (asked before every step, so that a parameter set
        changed mid-run is noticed), or ``None`` when the set is fixed for the run."""
        return None

    def attach(self, session: TraceSession, *, failures: Failures, wants_detail: Callable[[], bool],
               announced: bool = False, after_step: Callable[[], None] | None = None) -> None:
        """Start reading every optimizer step into ``session``.

        Args:
            failures: the run's failure policy; a failed read switches tracking off (the source stops
                reading), or raises when strict.
            wants_detail: asked before each step whether it will be logged (then the step's nonzero gradient
                elements are counted too: the density curve).
            announced: the training loop calls :meth:`before_step` / :meth:`after_step` around each
                ``optimizer.step()`` itself (the Trainer's ``on_pre_optimizer_step`` / ``on_optimizer_step``,
                which see the gradient the Trainer hands the optimizer, also on steps a loss scaler then
                skips); otherwise the source hooks the step.
            after_step: called after each observed step (``gradtrace.trace`` logs there).
        """
        self.session = session
        self.wants_detail = wants_detail

    @abstractmethod
    def before_step(self) -> None:
        """The step's gradient is final: fold it into the tracker (a loop that announces its steps calls it)."""

    @abstractmethod
    def after_step(self) -> None:
        """The step has run: fold in what it changed (a loop that announces its steps calls it)."""

    @abstractmethod
    def remove(self) -> None:
        """Stop reading: remove any hook. Idempotent."""


class OptimizerHooks(GradientSource):
    """A torch optimizer's step: its step pre-hook reads ``.grad``, its post-hook the updated values.

    The hooks go on the optimizer that really steps: accelerate's ``AcceleratedOptimizer`` calls it only at
    the end of an accumulation cycle (and a loss scaler only on steps it does not skip).
    """

    def __init__(self, model: nn.Module, optimizer: Any):
        super().__init__(model, optimizer)
        self._inner = unwrap_optimizer(optimizer)
        self._handles: list[Any] = []
        self._after: Callable[[], None] | None = None

    def parameters(self) -> tuple[Named, list[str]]:
        return stepped_parameters(self.model, self.optimizer)

    def selection(self, not_stepped: list[str]) -> dict[str, Any]:
        return describe_selection(not_stepped, self.optimizer)

    def current_parameters(self) -> Callable[[], Named]:
        return ParameterWatch(self.model, self.optimizer)

    def attach(self, session: TraceSession, *, failures: Failures, wants_detail: Callable[[], bool],
               announced: bool = False, after_step: Callable[[], None] | None = None) -> None:
        if not announced and not hasattr(self._inner, "register_step_pre_hook"):
            raise TypeError(f"gradtrace.trace needs a torch optimizer (or a wrapper holding one as .optimizer); "
                            f"got {type(self.optimizer).__name__}")
        super().attach(session, failures=failures, wants_detail=wants_detail)
        self._after = after_step
        # Switched off, the hooks do nothing (the guard) until remove(): removing them at once, from inside
        # torch's loop over the step's hooks, would break that loop ("OrderedDict mutated during iteration").
        if not announced:
            self._handles = [
                self._inner.register_step_pre_hook(
                    lambda *_: failures.guard("tracking before the optimizer step", self.before_step)),
                self._inner.register_step_post_hook(
                    lambda *_: failures.guard("tracking after the optimizer step", self.after_step)),
            ]

    def before_step(self) -> None:
        session = self.session
        session.check_parameters()
        session.note_learning_rates(learning_rates(self._inner))
        session.tracker.observe_gradients(detail=self.wants_detail())

    def after_step(self) -> None:
        self.session.tracker.observe_update()
        self.session.observe_sync()
        if self._after is not None:
            self._after()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DeepSpeedStep(GradientSource):
    """A DeepSpeed engine: the gradient is read inside the step of the optimizer the engine calls.

    ``model`` is the engine (its ``.module`` is tracked) or the module it wraps; ``optimizer`` is the
    engine's optimizer, accelerate's wrapper of it (what a Trainer callback receives), or ``None`` with
    an engine. The loop's own optimizer-step events come after the engine's step: nothing is left to do
    there.
    """

    sync_unsupported = ("sync_dtype is not supported under DeepSpeed yet; the weight-sync budget is not "
                        "measured in this run")

    def __init__(self, model: nn.Module, optimizer: Any):
        engine = deepspeed.engine_of(model)
        if engine is not None and optimizer is not None and optimizer is not engine \
                and unwrap_optimizer(optimizer) is not unwrap_optimizer(engine.optimizer):
            raise ValueError("gradtrace.trace(engine, optimizer, ...): the optimizer must be the engine's own "
                             "(engine.optimizer, as deepspeed.initialize returns it)")
        self._target = engine if engine is not None else optimizer
        module = engine.module if engine is not None else model
        # a clear error for anything DeepSpeed-like that cannot be tracked, before any state is allocated
        deepspeed.check_supported(self._target, module)
        super().__init__(module, optimizer)
        self.handle: deepspeed.DeepSpeedHandle | None = None

    def parameters(self) -> tuple[Named, list[str]]:
        # the engine's optimizer holds flat partitions, not the model's parameters
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad], []

    def selection(self, not_stepped: list[str]) -> dict[str, Any]:
        return describe_selection(not_stepped, None)

    def attach(self, session: TraceSession, *, failures: Failures, wants_detail: Callable[[], bool],
               announced: bool = False, after_step: Callable[[], None] | None = None) -> None:
        # Before any tracker state is restored: under ZeRO-1/2 attaching decides which part each rank keeps.
        self.handle = deepspeed.attach_to_deepspeed(session.tracker, self._target, failures=failures)
        super().attach(session, failures=failures, wants_detail=wants_detail)
        self.handle.wants_detail = wants_detail
        self.handle.after_step = after_step

    def before_step(self) -> None:
        """Nothing: the engine's step, which ran before the loop's optimizer-step events, was read inside."""

    def after_step(self) -> None:
        """Nothing: the update was read inside the engine's step as well."""

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def choose_gradient_source(model: nn.Module, optimizer: Any, *, deepspeed_configured: bool = False) -> GradientSource:
    """The gradient source for this engine.

    :class:`DeepSpeedStep` when ``model`` or ``optimizer`` is a DeepSpeed engine or optimizer (or
    accelerate's wrapper of one), when the model's parameters are ZeRO-3 partitions, or when the caller
    knows the run is configured for DeepSpeed (``deepspeed_configured``: a Trainer's ``deepspeed`` setting;
    then anything that is no DeepSpeed object is refused with a clear error); else :class:`OptimizerHooks`.
    """
    partitioned = isinstance(model, nn.Module) and any(hasattr(p, "ds_id") for p in model.parameters())
    if (deepspeed_configured or partitioned or deepspeed.is_deepspeed_object(model)
            or deepspeed.is_deepspeed_object(optimizer)):
        return DeepSpeedStep(model, optimizer)
    return OptimizerHooks(model, optimizer)
