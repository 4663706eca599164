"""The fold: each optimizer step's gradients and updates into the tracker's state, on the device.

:class:`Folding` is the per-step half of :class:`~gradtrace.tracking.tracker.GradTracker`:
:meth:`~Folding.observe_gradients` once per optimizer step while ``.grad`` holds the gradient the
optimizer is about to apply, :meth:`~Folding.observe_update` right after ``optimizer.step()``. Both only
queue tensor ops on the parameters' devices (no host sync); per parameter they read its
:class:`~gradtrace.tracking.engines.base.Placement` and take the kernel its backend picks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.formats.bitpack import or_pack_into, pack_bits
from gradtrace.tracking.engines.base import Placement
from gradtrace.tracking.kernels import torch_path
from gradtrace.tracking.state import COUNTER_INDEX

_to = torch_path.to_device


class _StepFlags:
    """One step's per-parameter facts from the CPU path, combined on the host as they come."""

    def __init__(self):
        self.seen = self.some_nonzero = self.some_nonfinite = False
        self.discarded = self.nonzero = 0

    def add(self, any_nonzero: bool, finite: bool, numel: int, nonzero: int | None) -> None:
        self.seen = True
        if finite:
            self.some_nonzero |= any_nonzero
            self.nonzero += nonzero or 0
        else:  # dropped whole for this step
            self.some_nonfinite = True
            self.discarded += numel


class Folding:
    """Folding steps into the state (a part of GradTracker, which sets up what it reads)."""

    @torch.no_grad()
    def observe_gradients(self, grads: Mapping[str, torch.Tensor | None] | None = None, *,
                          detail: bool = True) -> None:
        """Fold one optimizer step's gradients into the state.

        By default reads each tracked parameter's ``.grad``. Engines that keep gradients elsewhere
        (DeepSpeed's partitioned buffers) pass ``grads``: ``{parameter name: gradient}``, each laid out
        like the parameter's local data. A missing or ``None`` gradient means the parameter received no
        gradient this step.

        A parameter whose gradient holds any NaN/inf at this step contributes nothing from it (no mask
        bit, no sum): such a step is skipped by a loss scaler, or the run has diverged. Those steps and
        the discarded elements are counted. ``detail=False`` skips counting this step's nonzero
        elements (the gradient-density curve), a full pass over the mask; integrations ask for it on
        the steps that will be logged. In a sharded run a NaN/inf in any rank's shard of a parameter drops
        the whole parameter on every rank, as in a single process (one more small all-reduce per step).
        """
        stride = self.config.stride
        device = self._primary
        # Per-parameter flags are gathered and combined once after the loop: a few ops per step rather
        # than a few per parameter, which is what a small model's step time is made of. The CPU path
        # gives host values, the torch path 0-d tensors on the parameters' devices (no host sync).
        host = _StepFlags()
        any_nonzero, all_finite, numels, counts = [], [], [], []
        shard_finite = self._shard_finite(grads)
        host_shard_finite: list[int] | None = None
        placements = self._placements
        for name, param in self._params:
            placement = placements[name]
            grad = self._local_gradient(name, placement, param, grads)  # asked for every one, in order (DeepSpeed)
            if grad is None or not placement.keeps:
                continue
            weight = placement.weight
            state = self.state[name]
            sums = (state["signed_sum"], state["abs_sum"]) if self.config.tracks_sums else None
            listed = placement.sample_index is not None
            if self._backend.scans(grad):
                if name in shard_finite:
                    if host_shard_finite is None:
                        host_shard_finite = shard_finite["*"].tolist()
                    if not host_shard_finite[shard_finite[name]]:  # dropped whole, as in one process
                        host.add(False, False, grad.numel() * weight, None)
                        continue
                folded = self._backend.scanner.fold(grad, state["gradient_bits"], full=name in self._full_bitmaps,
                                                count=detail, sums=None if listed else sums, stride=stride,
                                                sample_start=placement.sample_start)
                if folded.full:
                    self._full_bitmaps.add(name)
                if listed and sums is not None and folded.finite:
                    torch_path.add_sums(self._sampled(placement, grad.reshape(-1)), sums, None)
                host.add(folded.any_nonzero, folded.finite, grad.numel() * weight, (folded.nonzero or 0) * weight)
                continue
            nonzero, has_nonzero, finite = torch_path.scan_gradient(grad)
            if name in shard_finite:  # a NaN/inf in any rank's shard drops the whole parameter
                finite = _to(shard_finite["*"][shard_finite[name]], grad.device).bool()
            state["gradient_bits"].bitwise_or_(pack_bits(nonzero).mul_(finite))  # NaN/inf: no bit at all
            if sums is not None:
                torch_path.add_sums(self._sampled(placement, grad.reshape(-1)), sums, finite)
            nonzero_count = torch.count_nonzero(nonzero) if detail else None
            if detail and not weight:  # another rank counts this part
                nonzero_count = nonzero_count.mul(0)
            if grad.device != device:  # model spread over several devices: the flags meet on one
                has_nonzero, finite = _to(has_nonzero, device), _to(finite, device)
                if detail:
                    nonzero_count = _to(nonzero_count, device)
            any_nonzero.append(has_nonzero)
            all_finite.append(finite)
            numels.append(grad.numel() * weight)
            if detail:
                counts.append(nonzero_count)
        # [some nonzero gradient, some NaN/inf, discarded elements, nonzero elements this step]
        if host.seen:
            totals = torch.tensor([host.some_nonzero, host.some_nonfinite, host.discarded, host.nonzero],
                                  dtype=torch.int64, device=device)
        else:  # no host-to-device copy when every gradient took the torch path (GPU)
            totals = torch.zeros(4, dtype=torch.int64, device=device)
        if numels:
            finite = torch.stack(all_finite)
            on_device = torch.stack([
                (torch.stack(any_nonzero) & finite).any(),
                finite.logical_not().any(),
                (finite.logical_not() * self._numel_vector(numels)).sum(),
                (torch.stack(counts) * finite).sum() if detail else torch.zeros((), dtype=torch.int64, device=device),
            ])
            totals[:2] = torch.maximum(totals[:2], on_device[:2])
            totals[2:] += on_device[2:]
        flags = totals[:2]
        if self._group is not None:
            # Whether the step was all-zero, or held a NaN, is a question about every shard together:
            # one 2-element all-reduce, no host sync on GPU.
            flags = _to(flags, self._collective_device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            flags = _to(flags, device)
        self.steps += 1
        counters = self.counters
        # all-zero: no finite nonzero element and no NaN/inf (an all-NaN step is a non-finite step, not a zero one)
        counters[COUNTER_INDEX["zero_gradient_steps"]] += (1 - flags[0]) * (1 - flags[1])
        counters[COUNTER_INDEX["nonfinite_gradient_steps"]] += flags[1]
        counters[COUNTER_INDEX["discarded_gradient_elements"]] += totals[2]
        if detail:
            counters[COUNTER_INDEX["density_nonzero"]] = totals[3]
            counters[COUNTER_INDEX["density_step"]] = self.steps

    @torch.no_grad()
    def skip_step(self, *, observed: bool = False, detail: bool = True) -> None:
        """Count one optimizer step that the optimizer skipped for an overflow (DeepSpeed's fp16 loss
        scaler, or its bf16 overflow check): it applied nothing, so it sets no mask bit and adds no sum.

        Call it instead of :meth:`observe_gradients` when the skip is known before the gradient is read.
        ``observed=True`` counts a step whose gradient :meth:`observe_gradients` has already folded in
        (the skip became known only afterwards): it is counted as skipped but not as a second step. With
        ``detail`` the step's gradient density is recorded as 0 (nothing was applied). Every rank calls
        it for the same steps (the counter is replicated, not summed).
        """
        counters = self.counters
        counters[COUNTER_INDEX["skipped_overflow_steps"]] += 1
        if observed:
            return
        self.steps += 1
        if detail:
            counters[COUNTER_INDEX["density_nonzero"]] = 0
            counters[COUNTER_INDEX["density_step"]] = self.steps

    def _local_gradient(self, name: str, placement: Placement, param: nn.Parameter,
                        grads: Mapping[str, torch.Tensor | None] | None) -> torch.Tensor | None:
        """The gradient of ``param``'s local data, dense, where its state lives and in a dtype that can
        be scanned (float8 gradients are widened exactly: no ``isfinite`` for float8)."""
        grad = param.grad if grads is None else grads.get(name)
        if grad is None:
            return None
        if grad.is_sparse:
            grad = grad.to_dense()
        grad = placement.held(grad)
        bits = self.state[name]["gradient_bits"]
        if grad.device != bits.device:  # ZeRO-3 offload_optimizer: gradient partitions on the CPU, state not
            grad = _to(grad, bits.device)
        if torch_path.is_float8(grad.dtype):
            grad = grad.float()
        return grad

    def _shard_finite(self, grads: Mapping[str, torch.Tensor | None] | None) -> dict[str, Any]:
        """Whether each sharded parameter's gradient is finite on every rank: ``{name: position, "*": flags}``
        (``flags`` an int tensor, 1 = finite everywhere), empty outside sharded runs.

        A single process drops a parameter's whole gradient for the step when any element is NaN/inf; a
        rank sees only its shard, so the ranks agree first: one all-reduce of one flag per sharded
        parameter, at the price of reading each sharded gradient once more. Replicas (HSDP) hold the same
        gradient, so the minimum over the whole reduction group is the minimum over the shards.
        """
        agreeing = self._agreeing
        if not agreeing:
            return {}
        flags = []
        for name in agreeing:
            grad = self._local_gradient(name, self._placements[name], self._named[name], grads)
            if grad is None or grad.numel() == 0:
                flags.append(torch.ones((), dtype=torch.bool, device=self._collective_device))
            elif self._backend.scans(grad):  # NumPy on the raw bits
                flags.append(torch.tensor(self._backend.scanner.finite(grad), device=self._collective_device))
            else:
                flags.append(_to(torch_path.scan_gradient(grad)[2], self._collective_device))
        reduced = torch.stack(flags).to(torch.int32)
        dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=self._group)
        return {"*": reduced, **{name: i for i, name in enumerate(agreeing)}}

    @torch.no_grad()
    def observe_update(self) -> None:
        """After ``optimizer.step()``: record which elements that step changed (``ever_changed`` mode).

        A no-op unless ``config.ever_changed``; the update mask against the start needs no per-step work.
        """
        if not self.config.ever_changed:
            return
        step_changed = torch.zeros((), dtype=torch.int64, device=self._primary)
        changed_on_host = 0
        placements = self._placements
        for name, param in self._params:
            placement = placements[name]
            if not placement.keeps:
                continue
            state = self.state[name]
            values = placement.held(param).detach()
            self._check_dtype(name, values)
            weight = placement.weight  # counted on one rank only where several hold the same part
            last = state["last_values"]
            if self._backend.scans(values) and last.device == values.device:
                changed_on_host += weight * self._backend.scanner.fold_changes(values, last, state["ever_changed_bits"])
                continue
            flat = values.reshape(-1)
            changed = torch_path.raw_bits(flat).ne(torch_path.raw_bits(last))  # bitwise: every change, a sign flip of 0 included
            or_pack_into(state["ever_changed_bits"], changed)
            last.copy_(flat)
            if weight:
                step_changed += _to(changed.sum(), self._primary)
        step_changed += changed_on_host
        self.counters[COUNTER_INDEX["last_step_changed"]] = step_changed
        self.counters[COUNTER_INDEX["changed_elements_total"]] += step_changed
