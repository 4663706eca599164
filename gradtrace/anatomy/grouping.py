"""Sum per-parameter counts into groups: all parameters, per block (towers apart), per module kind,
per routed expert."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

from gradtrace.anatomy.naming import LANGUAGE, PROJECTOR, kind_of, layer_key, layer_sort_key, tower_of

Counts = Mapping[str, float]


def sum_by_group(per_param: Mapping[str, Counts], key: Callable[[str], Hashable | None]) -> dict:
    """``{group: {count name: sum}}`` over parameters; parameters whose key is ``None`` are skipped."""
    groups: dict = {}
    for name, counts in per_param.items():
        group = key(name)
        if group is None:
            continue
        _add(groups.setdefault(group, {}), counts)
    return groups


def _add(into: dict, counts: Counts) -> None:
    for field, value in counts.items():
        into[field] = into.get(field, 0) + value


def by_layer(per_param: Mapping[str, Counts]) -> dict[str, dict[str, float]]:
    """Counts summed per block: keys ``"3"`` (language decoder), ``"vision.3"`` (other towers),
    ``"projector"``, in that order; parameters outside the blocks are left out."""
    groups = sum_by_group(per_param, layer_key)
    return {key: groups[key] for key in sorted(groups, key=layer_sort_key)}


def by_kind(per_param: Mapping[str, Counts], kind: Callable[[str], str] = kind_of) -> dict[str, dict[str, float]]:
    """Counts summed per module kind (``q``, ``down``, ``router``, ``expert.down``, ``vision.q``...);
    ``kind``: the model's own (:meth:`gradtrace.anatomy.experts.ExpertLayout.kind`), else from names."""
    return dict(sorted(sum_by_group(per_param, kind).items()))


def by_tower(per_param: Mapping[str, Counts]) -> dict[str, dict[str, float]]:
    """Counts summed per tower: ``"language"`` (the decoder, embeddings and head included), ``"vision"``,
    ``"audio"``, ``"projector"``; the decoder first."""
    groups = sum_by_group(per_param, tower_of)
    order = {LANGUAGE: 0, PROJECTOR: 2}
    return {key: groups[key] for key in sorted(groups, key=lambda t: (order.get(t, 1), t))}


def total(per_param: Mapping[str, Counts]) -> dict[str, float]:
    """Counts summed over every parameter."""
    return sum_by_group(per_param, lambda _name: "all").get("all", {})


def expert_key(layer: str, expert: int) -> str:
    """``"<layer>/<expert>"``: the key of one routed expert of one MoE layer."""
    return f"{layer}/{expert}"


# How many of the least and of the most touched routed experts a summary names (and every tracker shows as
# ranked series): a few, as top/bottom-K in NeMo Automodel. Here, below both gradtrace.tracking.summary
# (which ranks them) and gradtrace.sinks (which counts their chart keys).
EXTREME_EXPERTS = 3


def by_expert(per_param: Mapping[str, Counts], per_slice: Mapping[str, Sequence[Counts]],
              listed: Mapping[str, int], groups: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Counts summed per routed expert, keyed ``"<layer>/<expert>"`` (layers in order, then experts).

    ``per_slice`` holds, for each fused expert tensor, one count mapping per expert (its slice along
    dim 0); ``listed`` maps the parameters of per-expert module lists to their expert index, whose
    counts come from ``per_param``; ``groups`` maps expert tensors to their MoE group (default: their
    layer key). An expert's entry sums all its tensors (gate/up, down, biases).
    """
    groups = groups or {}
    sums: dict[tuple[str, int], dict] = {}
    for name, slices in per_slice.items():
        layer = groups.get(name) or layer_key(name)
        for expert, counts in enumerate(slices):
            _add(sums.setdefault((layer, expert), {}), counts)
    for name, expert in listed.items():
        if name in per_param:
            _add(sums.setdefault((groups.get(name) or layer_key(name), expert), {}), per_param[name])
    ordered = sorted(sums, key=lambda k: (layer_sort_key(k[0]), k[1]))
    return {expert_key(layer, expert): sums[(layer, expert)] for layer, expert in ordered}
