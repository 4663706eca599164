"""What to record beside every run so its numbers can be interpreted: optimizer settings and dtypes.

Whether an update survives depends on the learning rate, weight decay, clipping and on the dtype the
weights are stored in (bf16 absorbs steps below half a ULP), so these travel with every log and mask.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
from collections import Counter
from typing import Any

import torch

from gradtrace.integrations.parameters import unwrap_optimizer
from gradtrace.tracking.tracker import GradTracker

_OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum", "nesterov", "amsgrad", "foreach", "fused")


def describe_optimizer(optimizer: Any | None) -> dict[str, Any]:
    """Class and per-group hyper-parameters of a torch optimizer (unwrapping accelerate's wrapper)."""
    if optimizer is None:
        return {}
    inner = unwrap_optimizer(optimizer)
    groups = []
    for group in getattr(inner, "param_groups", []):
        entry = {key: group[key] for key in _OPTIMIZER_KEYS if key in group}
        # A scheduler's warm-up may have set lr to 0 already; the configured (peak) lr is its initial_lr.
        if "initial_lr" in group:
            entry["lr"], entry["lr_at_start"] = group["initial_lr"], group.get("lr")
        entry["num_params"] = sum(p.numel() for p in group.get("params", []))
        groups.append(entry)
    return {"class": f"{type(inner).__module__}.{type(inner).__qualname__}", "param_groups": groups}


def describe_parameters(tracker: GradTracker) -> dict[str, Any]:
    """Element counts per storage dtype of the tracked parameters, and their total."""
    by_dtype: Counter[str] = Counter()
    for shape, param in zip(tracker.shapes().values(), (p for _, p in tracker.named_parameters()), strict=True):
        # the full shape: a sharded parameter (FSDP2 DTensor, ZeRO-3 placeholder) reports the whole
        by_dtype[str(param.dtype).removeprefix("torch.")] += math.prod(shape)
    return {"tracked_elements": sum(by_dtype.values()), "elements_by_dtype": dict(by_dtype),
            "tracked_parameters": len(tracker.parameter_names)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("gradtrace", "transformers", "trl", "accelerate", "peft", "wandb"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_info(tracker: GradTracker, optimizer: Any | None = None, **extra: Any) -> dict[str, Any]:
    """The run's description: tracker config, optimizer, dtypes, versions, plus caller-given ``extra``.

    ``extra`` holds what only the caller knows, e.g. ``max_grad_norm``, ``gradient_accumulation_steps``,
    ``mixed_precision`` and ``master_weights_dtype`` (``None`` when the optimizer updates the stored
    weights directly, as a plain torch optimizer does).
    """
    info = {
        "tracker_config": tracker.config.to_dict(),
        "optimizer": describe_optimizer(optimizer),
        "parameters": describe_parameters(tracker),
        "state_bytes": tracker.state_bytes(),
        "versions": versions(),
        "master_weights_dtype": None,
        # routed experts found (per-expert views), and the ones left to per-matrix views, said once here
        "experts": {"per_layer": dict(tracker.experts.experts), "note": tracker.experts.note},
    }
    info.update(extra)
    return info
