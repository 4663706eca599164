"""DeepSpeed ZeRO-0/1/2/3: read the gradient inside the engine, right before its optimizer step.

Why inside: the engine owns the gradient. Through accelerate (so ``transformers.Trainer`` and TRL),
``accelerator.backward`` runs ``engine.backward`` and, at the accumulation boundary, ``engine.step()``: the
gradient is reduced, applied and freed before the Trainer's ``on_pre_optimizer_step`` (``.grad`` is
``None`` there). Under ZeRO-2 the reduced gradient never exists in ``.grad`` at all.

How: :func:`attach_to_deepspeed` wraps the ``step`` of the optimizer the engine calls. Before the real
step the reduced gradient (accumulated over micro-batches, averaged over ranks) is folded into the
tracker; after it, :meth:`GradTracker.observe_update` reads the updated values. Where the gradient is read:

- stage 0: ``.grad`` (whole parameters, split among the ranks as under DDP);
- ZeRO-1/2: the parameters are replicated and updated in place; with split tracking each rank tracks
  the fragments of its own optimizer partition (``param._hp_mapping``) and reads their gradient there,
  without communication; ``split=False`` reads full gradients with ``safe_get_full_grad`` (a collective);
- ZeRO-3: each rank tracks its partition of every parameter (``ds_tensor``) and reads its gradient
  partition with ``safe_get_local_grad``. Offload to the CPU is followed; offload to NVMe is refused.

What DeepSpeed's step will do is foreseen with its own checks (:class:`_StepPlan`): a step it skips for
an overflow sets no mask bit and adds no sum and is counted (``skipped_overflow_steps``); when the sums
are kept they are unscaled and clipped with DeepSpeed's own loss scale, norm and formula. The collectives
this costs per step and what was tested: ``docs/distributed.md``.

``deepspeed`` is imported only when a function here is called with a DeepSpeed object; the rest of
gradtrace reaches this module through :mod:`gradtrace.integrations.gradient_sources`.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from gradtrace.integrations.failures import Failures
from gradtrace.tracking import sharding
from gradtrace.tracking.tracker import GradTracker

__all__ = [
    "DeepSpeedHandle",
    "attach_to_deepspeed",
    "check_supported",
    "engine_of",
    "find_zero_optimizer",
    "is_deepspeed_object",
    "zero_stage",
]


# accelerate's wrappers: what a Trainer callback receives as ``optimizer`` (the first) under DeepSpeed.
_ACCELERATE_WRAPPERS = ("DeepSpeedOptimizerWrapper", "DeepSpeedEngineWrapper")


def _from_deepspeed(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "deepspeed"


def is_deepspeed_object(obj: Any) -> bool:
    """Whether ``obj`` is a DeepSpeed engine or optimizer, or accelerate's wrapper of one.

    Cheap and import-free: decides from the classes' modules, so it can be asked of any optimizer.
    """
    if obj is None:
        return False
    if _from_deepspeed(obj) or type(obj).__name__ in _ACCELERATE_WRAPPERS:
        return True
    # accelerate's DeepSpeedOptimizerWrapper(.optimizer) and DeepSpeedEngineWrapper(.engine)
    inner = getattr(obj, "engine", None) or getattr(obj, "optimizer", None)
    return inner is not None and inner is not obj and _from_deepspeed(inner)


def engine_of(obj: Any) -> Any | None:
    """The DeepSpeedEngine if ``obj`` is one or accelerate's DeepSpeedEngineWrapper of one, else None."""
    engine = getattr(obj, "engine", obj)
    return engine if callable(getattr(engine, "zero_optimization_stage", None)) else None


def find_zero_optimizer(obj: Any) -> Any:
    """The optimizer whose ``step`` the DeepSpeed engine calls, from what the caller has at hand.

    Accepts a ``DeepSpeedEngine`` (its ``.optimizer``), accelerate's ``DeepSpeedEngineWrapper``
    (``.engine.optimizer``), accelerate's ``DeepSpeedOptimizerWrapper`` (``.optimizer``; what
    ``Trainer`` callbacks receive as ``optimizer``) or the ZeRO optimizer itself.
    """
    engine = engine_of(obj)
    if engine is not None:
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is None:
            raise ValueError("this DeepSpeed engine has no optimizer (inference engine?); nothing to track")
        return optimizer
    inner = getattr(obj, "optimizer", None)
    if inner is not None and (_from_deepspeed(inner) or type(obj).__name__ == "DeepSpeedOptimizerWrapper"):
        return inner  # accelerate's DeepSpeedOptimizerWrapper (ZeRO-0 in fp32: the client torch optimizer)
    if _from_deepspeed(obj):
        return obj
    raise TypeError(f"not a DeepSpeed engine or optimizer: {type(obj).__module__}.{type(obj).__qualname__}")


def zero_stage(obj: Any, params: list[torch.nn.Parameter] | None = None) -> int:
    """The ZeRO stage (0-3) of a DeepSpeed engine/optimizer (or their accelerate wrappers).

    From the engine when given one; else from the optimizer's class and, as a cross-check, from the
    parameters (ZeRO-3 gives each parameter a ``ds_id``).
    """
    engine = engine_of(obj)
    if engine is not None:
        return int(engine.zero_optimization_stage())
    if params is not None and any(hasattr(p, "ds_id") for p in params):
        return 3
    optimizer = find_zero_optimizer(obj)
    name = type(optimizer).__name__
    if name == "DeepSpeedZeroOptimizer_Stage3" or hasattr(optimizer, "get_fp32_grad_for_param"):
        return 3
    if name == "DeepSpeedZeroOptimizer":
        return 2 if getattr(optimizer, "partition_gradients", False) else 1
    return 0


def check_supported(engine_or_optimizer: Any, model: torch.nn.Module | Iterable[torch.nn.Parameter] | None = None) -> int:
    """The ZeRO stage (0-3), after checking that gradtrace can track it: raises ``TypeError`` if
    ``engine_or_optimizer`` is no DeepSpeed object, ``ValueError`` for an engine without optimizer.

    Cheap; call it before building a tracker.
    """
    params = list(model.parameters() if isinstance(model, torch.nn.Module) else model or [])
    find_zero_optimizer(engine_or_optimizer)  # TypeError if it is none of the accepted objects
    stage = zero_stage(engine_or_optimizer, params)
    return 3 if any(hasattr(p, "ds_id") for p in params) else stage


class _FullGradients(Mapping):
    """``{name: reduced gradient}``, each fetched from DeepSpeed only when the tracker asks for it.

    ZeRO-0/1/2: the full gradient. ``safe_get_full_grad`` is a collective there (an all-reduce per
    parameter): every rank asks for the same parameters in the same order, which the tracker's fixed
    parameter order guarantees. ZeRO-1/2 with ``fragments=True`` (the tracker tracks each rank's
    optimizer partition: :func:`partition_spans`): the fragment of the gradient in this rank's partition,
    read where DeepSpeed keeps it (no communication). ZeRO-3 (``local=True``): the rank's partition of the
    gradient, from ``safe_get_local_grad`` (no communication), narrowed to the valid part so that it is
    laid out like :func:`gradtrace.tracking.sharding.local` of the parameter.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], scale: torch.Tensor | float | None, *,
                 local: bool = False, fragments: bool = False):
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        self._get = safe_get_local_grad if local else _fragment_grad if fragments else safe_get_full_grad
        self._local = local
        self._fragments = fragments
        self._params = params
        self._inverse = None if scale is None else 1.0 / scale

    def __getitem__(self, name: str) -> torch.Tensor | None:
        param = self._params[name]
        grad = self._get(param)
        if grad is None:
            return None
        if isinstance(self._inverse, torch.Tensor) and self._inverse.device != grad.device:
            # offload_optimizer: gradient partitions on the CPU, the norm (and so the factor) maybe not
            self._inverse = self._inverse.to(grad.device)
        if self._local:
            # ZeRO-3's partition buffer itself (fp32: ``.float()`` copies nothing): never modified here.
            grad = grad.reshape(-1).narrow(0, 0, sharding.local(param).numel())
            return grad if self._inverse is None else grad.mul(self._inverse)
        if self._inverse is None:
            return grad
        # The same operation DeepSpeed applies to its flat partitions (unscale_and_clip_grads), in fp32 as
        # there: unscaling an fp16 gradient in fp16 would round small values, or flush them to 0 (a lost
        # mask bit). Never in place on the parameter's own .grad (stage 0 keeps the gradient there) nor on
        # a fragment (a view of the partition DeepSpeed is about to apply).
        if grad.is_floating_point() and grad.element_size() < 4:
            return grad.float().mul_(self._inverse)
        in_place = grad is not param.grad and not self._fragments
        return grad.mul_(self._inverse) if in_place else grad.mul(self._inverse)

    def get(self, name: str, default: Any = None) -> torch.Tensor | None:
        # Mapping.get would swallow a KeyError raised inside DeepSpeed; only unknown names default.
        return self[name] if name in self._params else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def _fragment_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """ZeRO-1/2: the reduced gradient of ``param``'s fragment in this rank's optimizer partition, flat (the
    part of the parameter :func:`partition_spans` names), or ``None`` when the partition holds none of it.
    What ``safe_get_full_grad`` contributes from this rank to its all-reduce, without the all-reduce."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel() != address.numel:  # a full accumulation buffer (bf16): its part
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment


def partition_spans(params: Mapping[str, torch.nn.Parameter]) -> dict[str, tuple[int, int]] | None:
    """ZeRO-1/2: ``{name: (start, length)}``, the run of each flattened parameter in this rank's optimizer
    partition (``(0, 0)`` when none), as DeepSpeed maps it (``param._hp_mapping``); ``None`` if some
    parameter carries no such mapping (not stepped by the ZeRO optimizer, another DeepSpeed version)."""
    if not all(hasattr(p, "_hp_mapping") and (p._hp_mapping is None or hasattr(p, "_index_in_param_group"))
               for p in params.values()):
        return None
    spans = {}
    for name, param in params.items():
        mapping = param._hp_mapping
        address = mapping.lp_fragment_address if mapping is not None else None
        spans[name] = (int(address.start), int(address.numel)) if address is not None else (0, 0)
    return spans


def _scaled_norm(optimizer: Any) -> Callable[[], torch.Tensor] | None:
    """How the optimizer's ``step`` computes the (loss-scaled) global gradient norm, or ``None`` if unknown.

    ZeRO-1/2: ``scaled_global_norm``. ZeRO-3: ``step`` combines ``_get_norm_groups()`` with
    ``combine_grad_norm_groups``; both only read the partitioned gradients (one scalar all-reduce per
    parameter group). Not under Muon, whose step replaces the gradient before taking the norm.
    """
    if hasattr(optimizer, "scaled_global_norm"):
        return optimizer.scaled_global_norm
    if hasattr(optimizer, "_get_norm_groups") and not getattr(optimizer, "use_muon", False):
        def norm() -> torch.Tensor:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            return combine_grad_norm_groups(optimizer._get_norm_groups())

        return norm
    return None


def _invalid(norm: torch.Tensor | float) -> bool:
    """DeepSpeed's ``is_invalid_grad_norm``: inf/NaN, or the -1 its norm helpers return for them."""
    norm = torch.as_tensor(norm)
    return bool((~torch.isfinite(norm) | norm.lt(0)).any())


def _scale_after_update(optimizer: Any) -> float:
    """The loss scale DeepSpeed's ZeRO ``step`` divides by: it updates its loss scaler (``_update_scale``)
    *before* ``unscale_and_clip_grads``, so on the step where a dynamic scale grows, the gradient (scaled
    by the old scale) is divided by the new one. Asked of a copy of the scaler, which is left as it is."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None or getattr(optimizer, "custom_loss_scaler", False) or not hasattr(scaler, "update_scale"):
        return optimizer.loss_scale
    probe = copy.copy(scaler)  # its fields are numbers: the copy's update leaves the scaler untouched
    probe.update_scale(False)
    return probe.cur_scale


def _stage0_nonfinite(optimizer: Any) -> bool | None:
    """Stage 0 under fp16/bf16 (DeepSpeed's ``FP16_Optimizer``): whether a gradient of its low-precision
    parameters holds NaN/inf, which makes the norm its ``step`` checks invalid and the step skipped. The
    engine has all-reduced these gradients already, so every rank answers the same. ``None`` for other
    optimizers."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None or not hasattr(optimizer, "overflow_checker"):
        return None
    finite = [torch.isfinite(p.grad).all() for group in groups for p in group if p.grad is not None]
    return bool(finite) and not bool(torch.stack(finite).all())  # one host sync, not one per parameter


def _stage0_scale(optimizer: Any) -> float | None:
    """Stage 0 under fp16/bf16 (``FP16_Optimizer``, ``FP16_UnfusedOptimizer``): the factor its ``step``
    divides the gradient by, or ``None`` for 1 or another optimizer. Like ZeRO's, their ``step`` updates
    the loss scale (``_update_scale``) before ``unscale_and_clip_grads``: asked of a copy of the scale's
    state. The clipping norm is DeepSpeed's own (``get_weight_norm`` of each group's non-expert gradients)."""
    config = getattr(optimizer, "loss_scale_config", None)
    if config is None or getattr(optimizer, "fp16_groups", None) is None or not hasattr(optimizer, "_update_scale"):
        return None
    probe = types.SimpleNamespace(loss_scale_config=copy.copy(config), verbose=False)
    type(optimizer)._update_scale(probe, False)
    loss_scale = float(probe.loss_scale_config.cur_scale)
    clip_grad = float(getattr(optimizer, "clip_grad", 0.0))
    if clip_grad > 0.0:
        from deepspeed.moe.utils import split_params_grads_into_shared_and_expert_params
        from deepspeed.runtime.utils import get_global_norm, get_weight_norm

        norms = []
        for group in optimizer.fp16_groups:
            shared, _ = split_params_grads_into_shared_and_expert_params(group)
            norms.append(get_weight_norm(shared, mpu=optimizer.mpu) if shared else 0.0)
        clip = ((get_global_norm(norm_list=norms) / loss_scale) + 1e-6) / clip_grad
        if clip > 1:
            return float(clip * loss_scale)
    return None if loss_scale == 1.0 else loss_scale


class _StepPlan:
    """What DeepSpeed's ``step`` is about to do, known before it runs: whether it will skip the step for an
    overflow (``skip``: ``None`` when not known here) and the factor it will divide the gradient by
    (``scale``: ``None`` when nothing, or when the sums are not kept).

    The skip is decided with DeepSpeed's own checks, as its ``step`` makes them. ZeRO-1/2: ``has_overflow``
    (a read of the gradient partitions and one scalar all-reduce) where its ``step`` checks the gradient
    (``check_grad_overflow``: fp16, and bf16 unless switched off) or skips on an invalid norm (not bf16);
    ZeRO-3: an invalid global norm (its fp16 overflow check implies one; ``has_overflow`` itself is not
    asked, as it resets the tracker of overflows seen while offloading); stage 0 under fp16/bf16: a NaN/inf
    in its parameters' gradients. The norm is computed once, and only where the skip or the scale needs it.
    """

    def __init__(self, optimizer: Any, stage: int, wants_scale: bool):
        self.skip: bool | None = None
        self.scale: torch.Tensor | float | None = None
        zero = all(hasattr(optimizer, attr) for attr in ("clip_grad", "loss_scale"))
        scaled_norm = _scaled_norm(optimizer) if zero else None
        norm: torch.Tensor | None = None
        if stage >= 3 and scaled_norm is not None:
            norm = scaled_norm()
            self.skip = _invalid(norm)
        elif stage in (1, 2) and hasattr(optimizer, "has_overflow"):
            bf16 = getattr(optimizer, "dtype", None) == torch.bfloat16
            checks = bool(getattr(optimizer, "check_grad_overflow", True))
            norm_checked = bool(getattr(optimizer, "compute_grad_norm", True)) and (checks or not bf16)
            self.skip = bool(optimizer.has_overflow(optimizer.partition_gradients)) if checks or norm_checked else False
        elif stage == 0:
            self.skip = _stage0_nonfinite(optimizer)
            if wants_scale and not self.skip:
                self.scale = _stage0_scale(optimizer)
        if self.skip or not wants_scale or scaled_norm is None:
            return
        loss_scale = _scale_after_update(optimizer)
        clip_grad = float(optimizer.clip_grad)
        if clip_grad <= 0.0:
            self.scale = None if loss_scale == 1.0 else loss_scale
            return
        norm = scaled_norm() if norm is None else norm
        # Mirrors ``unscale_and_clip_grads`` of ZeRO-1/2 and ZeRO-3 (the same formula).
        clip = torch.clamp(((norm / loss_scale) + 1e-6) / clip_grad, min=1.0)
        # An invalid norm means overflow: DeepSpeed skips the step (ZeRO-1/2 in bf16 without the check
        # applies it unclipped), and the gradient is only unscaled here. No host sync.
        valid = torch.isfinite(norm) & norm.ge(0)
        self.scale = torch.where(valid, clip * loss_scale, torch.full_like(clip, float(loss_scale)))


class DeepSpeedHandle:
    """Returned by :func:`attach_to_deepspeed`; :meth:`remove` restores the optimizer's own ``step``."""

    def __init__(self, tracker: GradTracker, optimizer: Any, stage: int, failures: Failures):
        self.tracker = tracker
        self.optimizer = optimizer
        self.stage = stage
        self.failures = failures
        failures.when_switched_off(self.remove)
        self._params = dict(tracker.named_parameters())
        # ZeRO-1/2 with tracking split among the ranks: each tracks the fragments of its own partition
        self._fragments = False
        if 1 <= stage <= 2 and tracker.spans:
            spans = partition_spans(self._params)
            if spans is not None:
                tracker.use_spans(spans)
                self._fragments = True
        self._had_own_step = "step" in vars(optimizer)
        self._original_step = optimizer.step
        self._active = True
        # Asked before each step whether to count the step's nonzero gradient elements (the density
        # curve); an integration that knows which steps it will log replaces it, to skip that pass.
        self.wants_detail: Callable[[], bool] = lambda: True
        # Called after each tracked step, once its update is observed (gradtrace.trace logs there).
        self.after_step: Callable[[], None] | None = None
        optimizer.step = self._step

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Stop tracking: the optimizer's ``step`` is what it was before. Idempotent."""
        if not self._active:
            return
        self._active = False
        if vars(self.optimizer).get("step") == self._step:
            if self._had_own_step:
                self.optimizer.step = self._original_step
            else:
                del self.optimizer.step

    def _fail(self, err: Exception) -> None:
        """The run's failure policy: raise when strict, else switch tracking off (this hook removes itself;
        the real step still runs)."""
        self.failures.fail("tracking in DeepSpeed's step", err)

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._active:
            return self._original_step(*args, **kwargs)
        plan = None
        try:
            plan = _StepPlan(self.optimizer, self.stage, self.tracker.config.tracks_sums)
            if plan.skip:
                self.tracker.skip_step(detail=self.wants_detail())
            else:
                self.tracker.observe_gradients(_FullGradients(self._params, plan.scale, local=self.stage >= 3,
                                                              fragments=self._fragments),
                                               detail=self.wants_detail())
        except Exception as err:
            self._fail(err)
        result = self._original_step(*args, **kwargs)
        if self._active:
            try:
                self._check_plan(plan)
                self.tracker.observe_update()
                if self.after_step is not None:
                    self.after_step()
            except Exception as err:
                self._fail(err)
        return result

    def _check_plan(self, plan: _StepPlan | None) -> None:
        """After the real step: DeepSpeed's ``overflow`` says whether it skipped the step. A skip that was
        not foreseen (an optimizer whose checks are not mirrored here, e.g. ``BF16_Optimizer``) is counted,
        but the step's gradient is in the masks already: warned once."""
        skipped = getattr(self.optimizer, "overflow", None)
        if plan is None or not isinstance(skipped, bool) or plan.skip is None and not skipped:
            return
        if skipped and not plan.skip:
            self.tracker.skip_step(observed=True)
            self.failures.warn_once("deepspeed-unforeseen", f"DeepSpeed skipped optimizer step {self.tracker.steps} "
                                    f"for an overflow that gradtrace did not foresee ({type(self.optimizer).__name__}): "
                                    "it is counted in skipped_overflow_steps, but its finite gradient elements set "
                                    "mask bits")
        elif plan.skip and not skipped:
            self.failures.warn_once("deepspeed-missed", f"gradtrace foresaw an overflow at optimizer step "
                                    f"{self.tracker.steps} that DeepSpeed ({type(self.optimizer).__name__}) did not "
                                    "skip: that step's gradient is missing from the masks")


def _refuse_nvme_offload(optimizer: Any) -> None:
    """ZeRO-3's NVMe offload swaps partitions out of memory between steps: their ``ds_tensor`` is no
    stable place to keep state beside, nor to read updated values from."""
    swapped = [option for option, attr in (("offload_optimizer", "swap_optimizer"),
                                           ("offload_param", "params_in_nvme_and_cpu"))
               if getattr(optimizer, attr, False)]
    if swapped:
        raise ValueError(f"gradtrace does not support DeepSpeed ZeRO-3 with {' and '.join(swapped)} on NVMe "
                         "(partitions are swapped out of memory between steps); offload to \"cpu\" is supported")


def attach_to_deepspeed(tracker: GradTracker, engine_or_optimizer: Any, *,
                        failures: Failures | None = None) -> DeepSpeedHandle:
    """Track ``tracker``'s parameters through a DeepSpeed ZeRO-0/1/2/3 engine's optimizer steps.

    Args:
        tracker: built on the unwrapped model (``engine.module``, or the ``model`` a Trainer callback
            receives), so its parameter names are the module's.
        engine_or_optimizer: the ``DeepSpeedEngine``, its ZeRO optimizer, or accelerate's wrapper of
            either (a Trainer callback's ``optimizer`` argument is accelerate's
            ``DeepSpeedOptimizerWrapper``).
        failures: the run's failure policy (:class:`~gradtrace.integrations.failures.Failures`): says the
            hook's warnings once, and if tracking fails inside the step, raises (``strict``) or switches
            tracking off: the hook removes itself and the real step still runs. Default: a strict one, so
            the exception propagates (stops training).

    Every rank must attach: reading the full gradient is a collective (one all-reduce per parameter, in
    the tracker's fixed order; under ZeRO-3 the norm and the tracker's own reductions are), so a failure
    on one rank only would leave the others waiting in it until the process group's timeout. Returns a
    handle whose ``remove()`` detaches. Under ZeRO-3 the tracker must have been built on the partitioned
    module (it then keeps state for the local partitions only: ``tracker.sharded``). Under ZeRO-1/2 with
    split tracking, attaching hands each rank the fragments of its optimizer partition (the tracker's
    state restarts for them): attach before restoring a checkpoint's tracker state.
    """
    stage = check_supported(engine_or_optimizer, [p for _, p in tracker.named_parameters()])
    if stage >= 3 and not all(sharding.is_zero3(p) for _, p in tracker.named_parameters()):
        raise ValueError("ZeRO-3: build the GradTracker on the engine's partitioned module (after "
                         "deepspeed.initialize), so that it tracks each rank's partitions")
    optimizer = find_zero_optimizer(engine_or_optimizer)
    _refuse_nvme_offload(optimizer)
    if isinstance(getattr(optimizer.step, "__self__", None), DeepSpeedHandle):
        raise RuntimeError("this DeepSpeed optimizer is already tracked by gradtrace; remove() that handle first")
    return DeepSpeedHandle(tracker, optimizer, stage, failures if failures is not None else Failures(strict=True))
