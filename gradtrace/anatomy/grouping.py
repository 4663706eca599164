"""Sum per-parameter counts into groups: all parameters, per transformer layer, per module kind."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from gradtrace.anatomy.naming import kind_of, layer_of

Counts = Mapping[str, float]


def sum_by_group(per_param: Mapping[str, Counts], key: Callable[[str], Hashable | None]) -> dict:
    """``{group: {count name: sum}}`` over parameters; parameters whose key is ``None`` are skipped."""
    groups: dict = {}
    for name, counts in per_param.items():
        group = key(name)
        if group is None:
            continue
        into = groups.setdefault(group, {})
        for field, value in counts.items():
            into[field] = into.get(field, 0) + value
    return groups


def by_layer(per_param: Mapping[str, Counts]) -> dict[int, dict[str, float]]:
    """Counts summed per transformer block index (parameters outside the blocks are left out)."""
    return dict(sorted(sum_by_group(per_param, layer_of).items()))


def by_kind(per_param: Mapping[str, Counts]) -> dict[str, dict[str, float]]:
    """Counts summed per module kind (``q``, ``down``, ``embed``...)."""
    return dict(sorted(sum_by_group(per_param, kind_of).items()))


def total(per_param: Mapping[str, Counts]) -> dict[str, float]:
    """Counts summed over every parameter."""
    return sum_by_group(per_param, lambda _name: "all").get("all", {})
