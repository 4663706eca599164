"""Which parameters hold a MoE layer's routed experts, and how: fused tensors or per-expert modules.

transformers 5.x stores the routed experts of Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3 and gpt-oss
fused, as the ``experts`` module's own parameters with the expert index along dim 0
(``mlp.experts.gate_up_proj`` of shape (experts, 2·I, H), gpt-oss also ``..._bias`` of shape
(experts, 2·I)); older layouts keep one module per expert (``experts.7.w1.weight``). Expert ``e`` of a
fused tensor is the slice ``[e]``: in the flattened tensor, elements ``[e·S, (e+1)·S)`` with
``S = numel / experts``.

A fused tensor's dim 0 is taken as its expert dimension only when it equals the number of experts the
layer's router scores (its weight's rows): a tensor named like an expert whose dim 0 cannot be matched
so is left to the per-matrix views, and :attr:`ExpertLayout.note` says so.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gradtrace.anatomy.naming import ROUTED_EXPERTS, expert_of, is_routed_expert, kind_of, layer_key


@dataclass(frozen=True)
class ExpertLayout:
    """The routed experts of a model, from its parameters' names and full shapes.

    ``fused``: parameter name -> number of experts along its dim 0; ``listed``: parameter name -> expert
    index (per-expert module lists); ``experts``: layer key -> number of routed experts;
    ``unidentified``: routed-expert parameters whose expert dimension could not be identified.
    """

    fused: dict[str, int] = field(default_factory=dict)
    listed: dict[str, int] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)
    unidentified: list[str] = field(default_factory=list)

    def restricted_to(self, names: Collection[str]) -> ExpertLayout:
        """The layout of the parameters in ``names`` only (e.g. the trainable ones), layers kept as found."""
        return ExpertLayout({n: e for n, e in self.fused.items() if n in names},
                            {n: e for n, e in self.listed.items() if n in names}, dict(self.experts),
                            [n for n in self.unidentified if n in names])

    @property
    def note(self) -> str | None:
        """One sentence for the run log when some expert tensors fall back to per-matrix views."""
        if not self.unidentified:
            return None
        shown = ", ".join(self.unidentified[:3]) + (", ..." if len(self.unidentified) > 3 else "")
        return (f"{len(self.unidentified)} routed-expert parameter(s) have no identifiable expert dimension "
                f"(no trainable router in their layer whose rows match their dim 0): {shown}; they are "
                "counted per matrix only, with no per-expert view")


def _is_fused(name: str) -> bool:
    """The ``experts`` module's own parameter (``mlp.experts.down_proj``), not one of its sub-modules'."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == ROUTED_EXPERTS


def expert_layout(shapes: Mapping[str, Sequence[int]]) -> ExpertLayout:
    """Find the routed experts among ``{parameter name: full shape}``."""
    routers: dict[str, int] = {}
    for name, shape in shapes.items():
        if kind_of(name) == "router" and len(shape) == 2 and (key := layer_key(name)) is not None:
            routers[key] = int(shape[0])
    layout = ExpertLayout()
    for name, shape in shapes.items():
        if not is_routed_expert(name):
            continue
        key = layer_key(name)
        experts = routers.get(key) if key is not None else None
        if _is_fused(name):
            if experts is not None and len(shape) >= 2 and int(shape[0]) == experts:
                layout.fused[name] = experts
                layout.experts[key] = experts
            else:
                layout.unidentified.append(name)
        elif (index := expert_of(name)) is not None and key is not None:
            layout.listed[name] = index
            layout.experts[key] = max(layout.experts.get(key, 0), experts or 0, index + 1)
        else:
            layout.unidentified.append(name)
    return layout
