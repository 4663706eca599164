"""From per-parameter counts to fractions: global, per layer, per module kind, per matrix.

Every element falls in exactly one category (fractions of tracked elements, summing to 1):

- ``no_gradient``: never received a nonzero gradient and is unchanged;
- ``changed_without_gradient``: never received a gradient but changed (weight decay, momentum);
- ``updated``: received a gradient and changed (bitwise, in its storage dtype);
- ``cancelled``: received gradients but is unchanged, and they cancelled: |Σg| <= ε·Σ|g|;
- ``absorbed``: received a consistent gradient but is unchanged: its updates were lost to the
  storage precision (e.g. bf16 rounding);
- ``zero_lr``: received gradients but is unchanged, and its param group's learning rate was 0 at every
  step so far (a frozen-by-lr group, a warm-up's first step): nothing could have changed it.

``gradient_unchanged`` is ``cancelled + absorbed + zero_lr``: every element that received a gradient and
kept its value.

``cancelled``/``absorbed`` split the "gradient but unchanged" elements in the proportion seen on the
elements whose gradient sums are kept (all of them with ``cancellation="full"``): exact in that mode,
an unbiased estimate with ``"sampled"``, absent with ``"off"`` or when no sampled element is in the split.

MoE models also get ``per_expert["<layer>/<expert>"]`` (``numel`` and the ``per_layer`` fractions, for
every routed expert of every MoE layer: fused expert tensors are counted per slice along their expert
dimension, per-expert module lists per module) and, in ``global``, the headline numbers: ``experts``,
``experts_without_gradient`` (routed experts none of whose elements ever received a gradient) and the
min / median / max over experts of the gradient density (``expert_gradient_density_*``); and
``expert_extremes``, the :data:`EXTREME_EXPERTS` least and most touched experts by name, so the experts
behind those numbers can be found without one chart per expert.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping
from typing import Any

from gradtrace.anatomy.grouping import EXTREME_EXPERTS, by_expert, by_kind, by_layer, total
from gradtrace.tracking.tracker import Measurement

CATEGORIES = ("no_gradient", "changed_without_gradient", "updated", "cancelled", "absorbed", "zero_lr")


def fractions(counts: Mapping[str, float], *, abs_tolerance: float = 1e-5, rel_tolerance: float = 1e-3) -> dict:
    """Fractions of one group's elements; ``None`` where a value cannot be known."""
    n = counts["numel"]
    if n == 0:
        return {}
    gradient, updated, both = counts["gradient"], counts["updated"], counts["gradient_and_updated"]
    gradient_unchanged = gradient - both
    zero_lr = counts.get("zero_lr", 0)
    split = gradient_unchanged - zero_lr  # into cancelled and absorbed
    out: dict[str, float | None] = {
        "gradient_sparsity": 1 - gradient / n,
        "update_sparsity": 1 - updated / n,
        f"update_sparsity_abs_{abs_tolerance:g}": 1 - counts["updated_abs"] / n,
        f"update_sparsity_rel_{rel_tolerance:g}": 1 - counts["updated_rel"] / n,
        "no_gradient": (n - gradient - (updated - both)) / n,
        "changed_without_gradient": (updated - both) / n,
        "updated": both / n,
        "gradient_unchanged": gradient_unchanged / n,
        "cancelled": None,
        "absorbed": None,
        "zero_lr": zero_lr / n,
    }
    if split == 0:
        out["cancelled"] = out["absorbed"] = 0.0
    elif counts.get("sampled_gradient_unchanged", 0) > 0:
        share = counts["sampled_cancelled"] / counts["sampled_gradient_unchanged"]
        out["cancelled"] = split * share / n
        out["absorbed"] = split * (1 - share) / n
    if counts.get("ever_changed_tracked"):
        out["ever_changed"] = counts["ever_changed"] / n
    return out


def _at_zero_lr(counts: Mapping[str, int]) -> dict[str, int]:
    """A parameter never stepped at a nonzero lr: its gradient-but-unchanged elements are ``zero_lr``, and
    its sampled elements leave the cancelled / absorbed split of the groups it is summed into."""
    return {**counts, "zero_lr": counts["gradient"] - counts["gradient_and_updated"],
            "sampled_gradient_unchanged": 0, "sampled_cancelled": 0}


def summarize(measurement: Measurement, *, step: int | None = None,
              zero_lr: Collection[str] = ()) -> dict[str, Any]:
    """Plain-data summary of a measurement (JSON-ready): what the run log, W&B and reports read.

    ``zero_lr``: the parameters whose learning rate was 0 at every step so far (see ``zero_lr`` above).
    """
    cfg = measurement.config
    per_param, per_slice = measurement.per_param, measurement.per_slice
    if zero_lr and measurement.step:
        per_param = {name: _at_zero_lr(c) if name in zero_lr else c for name, c in per_param.items()}
        per_slice = {name: [_at_zero_lr(c) for c in rows] if name in zero_lr else rows
                     for name, rows in per_slice.items()}
    if cfg.ever_changed:
        per_param = {name: {**counts, "ever_changed_tracked": 1} for name, counts in per_param.items()}
        per_slice = {name: [{**c, "ever_changed_tracked": 1} for c in rows] for name, rows in per_slice.items()}
    tol = {"abs_tolerance": cfg.abs_tolerance, "rel_tolerance": cfg.rel_tolerance}
    overall = total(per_param)
    global_ = fractions(overall, **tol)
    counters = measurement.counters
    steps = measurement.step
    numel = overall["numel"]
    global_.update({
        "optimizer_steps": steps,
        "zero_gradient_steps": counters["zero_gradient_steps"],
        "nonfinite_gradient_steps": counters["nonfinite_gradient_steps"],
        "skipped_overflow_steps": counters["skipped_overflow_steps"],
        "discarded_gradient_elements": counters["discarded_gradient_elements"],
        "step_gradient_density": counters["density_nonzero"] / numel if counters["density_step"] else None,
        "step_gradient_density_step": counters["density_step"],
        "tracked_elements": numel,
    })
    if cfg.ever_changed:
        global_["last_step_changed_fraction"] = counters["last_step_changed"] / numel if steps else 0.0
        global_["mean_step_changed_fraction"] = counters["changed_elements_total"] / (numel * steps) if steps else 0.0
    layout = measurement.experts
    per_expert = by_expert(per_param, per_slice, layout.listed, layout.groups)
    global_.update(expert_headline(per_expert))
    bins = len(measurement.cancellation_histogram)
    summary = {
        "step": measurement.step if step is None else step,
        "optimizer_steps": steps,
        "global": global_,
        "per_layer": {str(layer): fractions(c, **tol) for layer, c in by_layer(per_param).items()},
        "per_kind": {kind: fractions(c, **tol) for kind, c in by_kind(per_param, layout.kind).items()},
        "per_matrix": {name: {**fractions(c, **tol), "numel": c["numel"]} for name, c in per_param.items()},
        "per_expert": {key: {**fractions(c, **tol), "numel": c["numel"]} for key, c in per_expert.items()},
        "cancellation_histogram": {
            "edges": [i / bins for i in range(bins + 1)],
            "counts": list(measurement.cancellation_histogram),
        },
    }
    if layout.warnings:  # an unrecognised MoE layout: every view and tracker shows these
        summary["anatomy_warnings"] = list(layout.warnings)
    if per_expert:
        summary["expert_extremes"] = expert_extremes(per_expert)
    else:
        del summary["per_expert"]  # dense models: no such view
    return summary


def expert_headline(per_expert: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The global curves of a MoE run: how many routed experts never received a gradient, and the spread
    of the experts' gradient density (fraction of their elements that ever received one). Empty for a
    dense model."""
    densities = [c["gradient"] / c["numel"] for c in per_expert.values() if c["numel"]]
    if not densities:
        return {}
    return {
        "experts": len(per_expert),
        "experts_without_gradient": sum(1 for c in per_expert.values() if c["gradient"] == 0),
        "expert_gradient_density_min": min(densities),
        "expert_gradient_density_median": statistics.median(densities),
        "expert_gradient_density_max": max(densities),
    }


def expert_extremes(per_expert: Mapping[str, Mapping[str, float]], k: int = EXTREME_EXPERTS) -> dict[str, list]:
    """The ``k`` routed experts with the lowest gradient density (``least_touched``, lowest first) and the
    ``k`` with the highest (``most_touched``, highest first), each ``{"expert": "<layer>/<expert>",
    "gradient_density": d}``; ties keep the experts' order (layer, then index)."""
    ranked = [(key, c["gradient"] / c["numel"]) for key, c in per_expert.items() if c["numel"]]
    least = sorted(ranked, key=lambda item: item[1])[:k]  # stable: ties in layer / expert order
    most = sorted(ranked, key=lambda item: -item[1])[:k]
    return {side: [{"expert": key, "gradient_density": density} for key, density in entries]
            for side, entries in (("least_touched", least), ("most_touched", most))}
