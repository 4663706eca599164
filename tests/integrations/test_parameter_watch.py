"""The per-step look at the parameter set (ParameterWatch): unchanged, it hands back the same list without
walking names; every kind of change makes it derive the set again, equal to a fresh stepped_parameters()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtrace.integrations.parameters import ParameterWatch, stepped_parameters


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _grow_group(model, optimizer):
    extra = nn.Parameter(torch.zeros(3))
    model[2].register_parameter("extra", extra)  # held by the model and a new group
    optimizer.add_param_group({"params": [extra]})


def _swap_in_group(model, optimizer):
    # the optimizer's list edited in place: model[0].bias leaves it, so it is no longer tracked
    params = optimizer.param_groups[0]["params"]
    del params[next(i for i, p in enumerate(params) if p is model[0].bias)]


CHANGES = {
    "setattr parameter": lambda m, o: setattr(m[0], "weight", nn.Parameter(torch.zeros(8, 4))),
    "register_parameter": lambda m, o: m[0].register_parameter("bias", nn.Parameter(torch.zeros(8))),
    "new submodule": lambda m, o: m.add_module("head", nn.Linear(3, 2)),
    "submodule replaced": lambda m, o: setattr(m, "2", nn.Linear(8, 3)),
    "frozen": lambda m, o: m[2].weight.requires_grad_(False),
    "resized in place": lambda m, o: setattr(m[2].bias, "data", torch.zeros(5)),
    "cast in place": lambda m, o: setattr(m[2].bias, "data", m[2].bias.data.double()),
    "add_param_group": _grow_group,
    "group edited in place": _swap_in_group,
}


def test_unchanged_returns_the_same_list():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = ParameterWatch(model, optimizer)
    first = watch()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # values change, the set does not
    assert watch() is first
    nn.ModuleList(list(model)[:2])  # a forward's throwaway container (Llama's self.layers[:n]) registers modules
    nn.Linear(2, 2)  # and so does any module built elsewhere
    assert watch() is first
    assert [(n, id(p)) for n, p in first] == [(n, id(p)) for n, p in stepped_parameters(model, optimizer)[0]]


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_derives_the_set_again(change):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = ParameterWatch(model, optimizer)
    before = watch()
    CHANGES[change](model, optimizer)
    after = watch()
    assert after is not before, f"{change}: not noticed"
    expected = stepped_parameters(model, optimizer)[0]
    assert [(n, id(p), p.shape, p.dtype) for n, p in after] == [(n, id(p), p.shape, p.dtype) for n, p in expected]
    assert watch() is after  # and then steady again


def test_a_parameter_unfrozen_is_noticed():
    model = _model()
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the frozen one too
    watch = ParameterWatch(model, optimizer)
    assert "0.weight" not in dict(watch())
    model[0].weight.requires_grad_(True)
    assert "0.weight" in dict(watch())
