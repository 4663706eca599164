"""An independent reference for the weight-sync budget: every step's weights cast to the sync dtype,
compared bit for bit with the previous step's (and the last sync's), summed per layer / kind / expert
by plain loops over names."""

from __future__ import annotations

import torch

from gradtrace.anatomy.naming import kind_of, layer_key

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Flat boolean mask of the elements whose bits differ."""
    bits = BITS[after.element_size()]
    return after.reshape(-1).view(bits) != before.reshape(-1).view(bits)


def grouped(masks: dict[str, torch.Tensor], key) -> dict[str, float]:
    """Changed fraction per group ``key(name)`` (names whose key is None left out)."""
    sums: dict[str, list[int]] = {}
    for name, mask in masks.items():
        group = key(name)
        if group is not None:
            entry = sums.setdefault(group, [0, 0])
            entry[0] += int(mask.sum())
            entry[1] += mask.numel()
    return {group: c / n for group, (c, n) in sums.items()}


def expected_sections(masks: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return {"global": grouped(masks, lambda _n: "all"), "per_layer": grouped(masks, layer_key),
            "per_kind": grouped(masks, kind_of), "per_matrix": grouped(masks, lambda n: n)}


def assert_sync_section(section: dict, field: str, masks: dict[str, torch.Tensor]) -> None:
    """``section``'s ``field`` (``step_changed`` / ``window_changed``) equals the reference in every group."""
    expected = expected_sections(masks)
    assert section["global"][field] == expected["global"]["all"]
    for scope in ("per_layer", "per_kind", "per_matrix"):
        actual = {key: entry[field] for key, entry in section[scope].items()}
        assert actual == expected[scope], scope
