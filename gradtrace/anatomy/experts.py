"""Which parameters hold a MoE layer's routed experts, read from the model's structure: its modules'
parameter shapes, its config's expert count and its router.

Three layouts hold E routed experts (all found from ``{parameter name: full shape}``, which a live model
and a checkpoint both give, so live runs and ``gradtrace diff`` see the same experts):

- a *module list or dict* of E identical experts (``experts.7.w1.weight``, Switch / NLLB-MoE
  ``experts.expert_7.fc1.weight``): children numbered 0..E-1 whose parameters have the same names and
  shapes;
- a *fused* tensor with the expert index along dim 0 (transformers 5.x ``experts.gate_up_proj`` of shape
  (E, 2·I, H), JetMoE / Granite checkpoints ``input_linear.weight``, gpt-oss ``..._bias`` (E, 2·I));
- a *stacked 2-D* tensor ``(E·I, H)`` inside an ``experts`` module (DBRX ``experts.mlp.w1``).

Expert ``e`` of a fused tensor is the slice ``[e]`` of dim 0: in the flattened tensor, elements
``[e·S, (e+1)·S)`` with ``S = numel / E``. A layout counts as experts only when something besides its
shape says E: the *router* of its block (a 2-D weight beside it whose output width is E, whatever its
name: ``mlp.gate``, ``gate.wg``, ``router.layer``, ``router.classifier``) or the config's expert count
(``num_experts``, ``num_local_experts``, ``n_routed_experts``, ``moe_num_experts``). Names are the fallback
only for the kind of a tensor (:mod:`gradtrace.anatomy.naming`).

Parameters that look like experts but whose expert dimension cannot be found, and a config that declares
experts none of which were found, are :attr:`ExpertLayout.warnings`: shown by every view and tracker.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradtrace.anatomy.naming import (
    ATTENTION_PARENTS,
    ROUTED_EXPERTS,
    expert_kind,
    inside_block,
    is_routed_expert,
    kind_of,
    layer_key,
    with_tower,
)

# Config fields that say how many routed experts a MoE layer holds, across transformers architectures.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                       "num_routed_experts", "n_experts")
# A child of an expert list or dict: ``7`` (nn.ModuleList) or ``expert_7`` (Switch / NLLB-MoE nn.ModuleDict).
_EXPERT_CHILD = re.compile(r"^(?:expert_)?(\d+)$")
# Name parts that make a router candidate the likelier one when several 2-D weights have E rows.
_ROUTER_WORDS = ("router", "gate", "wg", "classifier")
# How many modules above an expert tensor its router may sit (DBRX: experts.mlp.w1 -> ffn.router).
_ROUTER_SEARCH_LEVELS = 3


@dataclass(frozen=True)
class ExpertLayout:
    """The routed experts of a model, from its parameters' full shapes and its config.

    ``fused``: parameter name -> number of experts along its dim 0; ``listed``: parameter name -> expert
    index (per-expert module lists / dicts); ``groups``: expert parameter name -> its MoE group key
    (``"3"``, ``"encoder.1"``; ``"3.attn"`` for attention experts beside a layer's MLP experts);
    ``experts``: group key -> number of routed experts; ``routers``: the routers' parameters;
    ``unidentified``: expert-like parameters whose expert dimension could not be identified;
    ``declared``: expert counts the config declares.
    """

    fused: dict[str, int] = field(default_factory=dict)
    listed: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)
    routers: set[str] = field(default_factory=set)
    unidentified: list[str] = field(default_factory=list)
    declared: tuple[int, ...] = ()

    def restricted_to(self, names: Collection[str]) -> ExpertLayout:
        """The layout of the parameters in ``names`` only (e.g. the trainable ones), groups kept as found."""
        return ExpertLayout({n: e for n, e in self.fused.items() if n in names},
                            {n: e for n, e in self.listed.items() if n in names},
                            {n: g for n, g in self.groups.items() if n in names}, dict(self.experts),
                            {n for n in self.routers if n in names}, [n for n in self.unidentified if n in names],
                            self.declared)

    def kind(self, name: str) -> str:
        """The parameter's module kind, its role in a MoE block read from the structure: ``router`` for the
        scoring layer whatever its name, ``expert.<projection>`` for routed experts; the name otherwise."""
        if name in self.routers:
            return with_tower(name, "router.bias" if name.endswith("bias") else "router")
        if name in self.fused or name in self.listed:
            return with_tower(name, expert_kind(name))
        return kind_of(name)

    @property
    def warnings(self) -> list[str]:
        """What could not be read as experts, one sentence each: views and trackers show them."""
        out = []
        if self.unidentified:
            shown = ", ".join(self.unidentified[:3]) + (", ..." if len(self.unidentified) > 3 else "")
            out.append(f"{len(self.unidentified)} routed-expert parameter(s) have no identifiable expert "
                       "dimension (no router beside them whose output width matches their dim 0, nor the "
                       f"config's expert count): {shown}; they are counted per matrix only, with no "
                       "per-expert view")
        if self.declared and not self.experts:
            out.append(f"the config declares {'/'.join(map(str, self.declared))} experts but no expert tensors "
                       "were recognised (an unknown MoE layout): no per-expert view")
        return out

    @property
    def note(self) -> str | None:
        """The warnings as one text for the run log, ``None`` when there are none."""
        return "; ".join(self.warnings) or None


def config_expert_counts(config: Any) -> tuple[int, ...]:
    """The expert counts a config declares (a ``PretrainedConfig`` or the dict of a ``config.json``),
    nested configs (``text_config``, ``ffn_config``...) included; ``()`` for none."""
    if config is None:
        return ()
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            return ()
        try:
            config = to_dict()
        except Exception:  # noqa: BLE001 - a config that cannot be read says nothing about experts
            return ()
    return tuple(sorted(set(_counts(config))))


def _counts(config: Mapping) -> Iterable[int]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _counts(value)
        elif key in EXPERT_COUNT_FIELDS:
            values = value if isinstance(value, list | tuple) else [value]
            yield from (v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 1)


def expert_layout(shapes: Mapping[str, Sequence[int]], declared: Collection[int] = ()) -> ExpertLayout:
    """Find the routed experts among ``{parameter name: full shape}``; ``declared``: the config's expert
    counts (:func:`config_expert_counts`)."""
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    declared = tuple(sorted(set(declared)))
    layout = ExpertLayout(declared=declared)
    lists = _expert_lists(shapes, declared)
    in_lists = {name: (container, index) for container, children in lists.items()
                for index, names in children.items() for name in names}
    for name, (container, index) in in_lists.items():
        layout.listed[name] = index
        _add(layout, name, container, len(lists[container]), shapes, in_lists)
    for name, shape in shapes.items():
        if name in in_lists or len(shape) < 2:
            continue
        experts = _fused_experts(name, shape, shapes, declared, in_lists)
        if experts is not None:
            layout.fused[name] = experts
            _add(layout, name, name.rpartition(".")[0], experts, shapes, in_lists)
    for name, shape in shapes.items():
        if (len(shape) >= 2 and is_routed_expert(name) and name not in layout.groups
                and name not in layout.routers):
            layout.unidentified.append(name)
    return layout


def _add(layout: ExpertLayout, name: str, module: str, experts: int, shapes, in_lists) -> None:
    group = _group_key(name)
    layout.groups[name] = group
    layout.experts[group] = max(layout.experts.get(group, 0), experts)
    router = _router(module, experts, shapes, in_lists)
    if router is not None:
        layout.routers.add(router)
        bias = router.removesuffix("weight") + "bias"
        if bias in shapes and shapes[bias] == (experts,):
            layout.routers.add(bias)


def _group_key(name: str) -> str:
    """The MoE group of an expert parameter: its layer key, ``.attn`` added for attention experts (JetMoE's
    mixture of attention heads beside the MLP experts of the same layer)."""
    key = layer_key(name) or "model"
    return f"{key}.attn" if any(part in ATTENTION_PARENTS for part in name.split(".")[:-1]) else key


def _expert_lists(shapes: Mapping[str, tuple[int, ...]], declared: Collection[int]) -> dict[str, dict[int, list]]:
    """Containers of identical numbered children inside a block that are experts: ``{container: {index:
    [parameter names]}}``."""
    children: dict[str, dict[int, dict[str, tuple]]] = {}
    names: dict[str, dict[int, list[str]]] = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            match = _EXPERT_CHILD.match(parts[i])
            if match and inside_block(".".join(parts[:i])):
                container, index = ".".join(parts[:i]), int(match.group(1))
                children.setdefault(container, {}).setdefault(index, {})[".".join(parts[i + 1:])] = shape
                names.setdefault(container, {}).setdefault(index, []).append(name)
    found = {}
    for container, members in children.items():
        count = len(members)
        first = next(iter(members.values()))
        if count < 2 or set(members) != set(range(count)) or any(m != first for m in members.values()):
            continue
        named = container.split(".")[-1] == ROUTED_EXPERTS
        if count in declared or named or _router(container, count, shapes, {}) is not None:
            found[container] = {index: names[container][index] for index in sorted(members)}
    return found


def _fused_experts(name: str, shape: tuple[int, ...], shapes, declared, in_lists) -> int | None:
    """The number of experts along dim 0 of a fused expert tensor, ``None`` if it is not one."""
    module = name.rpartition(".")[0]
    inside_experts = ROUTED_EXPERTS in name.split(".")[:-1]
    if len(shape) >= 3:
        router = _router(module, shape[0], shapes, in_lists, exclude=name)
        # beside a projection of its width, a convolution is no expert: without the config's count, only
        # a router named so says E (LongCat's router also scores its zero-computation experts)
        if router is not None and (not declared or shape[0] in declared or _named_router(router)):
            return shape[0]
        return shape[0] if inside_experts and shape[0] in declared else None
    if not inside_experts:
        return None
    if name.endswith(".weight"):  # a Linear's weight (a router), not a tensor of the experts module itself
        return None
    # 2-D inside an experts module: per-expert biases (E, 2·I) or stacked weights (E·I, H), DBRX
    candidates = [e for e in (*declared, *_router_widths(module, shapes, in_lists)) if e > 1 and shape[0] % e == 0]
    for experts in candidates:
        if shape[0] == experts or _router(module, experts, shapes, in_lists, exclude=name) is not None:
            return experts
    return None


def _scopes(module: str) -> Iterable[str]:
    """The module's ancestors where its router may sit, nearest first, never above its layer."""
    parts = module.split(".")
    for level in range(1, min(_ROUTER_SEARCH_LEVELS, len(parts) - 1) + 1):
        scope = ".".join(parts[:len(parts) - level])
        if not inside_block(scope):  # a layer's other modules, or the model's, are not this block
            return
        yield scope


def _router_candidates(scope: str, shapes, in_lists, exclude: str = "") -> list[tuple[str, int]]:
    prefix = scope + "."
    return [(name, shape[0]) for name, shape in shapes.items()
            if name.startswith(prefix) and len(shape) == 2 and name.endswith("weight") and name != exclude
            and name not in in_lists and not _is_stacked(name, shape, shapes)]


def _is_stacked(name: str, shape, shapes) -> bool:
    """A 2-D tensor of an experts module that is not a Linear's weight: a stacked or bias tensor, no router."""
    return ROUTED_EXPERTS in name.split(".")[:-1] and name.rpartition(".")[2] != "weight"


def _router_widths(module: str, shapes, in_lists) -> list[int]:
    for scope in _scopes(module):
        widths = [w for _, w in _router_candidates(scope, shapes, in_lists)]
        if widths:
            return widths
    return []


def _named_router(name: str) -> bool:
    return any(word in name.split(".") for word in _ROUTER_WORDS)


def _router(module: str, experts: int, shapes, in_lists, exclude: str = "") -> str | None:
    """The router of the MoE block holding ``module``: a 2-D weight near it whose output width is
    ``experts``, one named like a router first."""
    for scope in _scopes(module):
        matching = [n for n, width in _router_candidates(scope, shapes, in_lists, exclude) if width == experts]
        if matching:
            named = [n for n in matching if _named_router(n)]
            return (named or matching)[0]
    return None
