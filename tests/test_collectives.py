"""gradtrace's collectives keep their tensors alive past gloo's worker thread (tracking/collectives.py), and
gradtrace issues no collective except through them: the deadlock at the end of a distributed run that a
tensor released on gloo's thread can cause (docs/distributed.md, "Ending a distributed run")."""

from __future__ import annotations

import ast
import gc
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradtrace
from gradtrace.tracking import collectives

PACKAGE = Path(gradtrace.__file__).parent
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce", "gather", "scatter"}


@pytest.fixture
def one_process_world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_collective_tensor_outlives_the_call_then_is_released(one_process_world):
    tensor = torch.ones(4)
    kept = weakref.ref(tensor)
    collectives.all_reduce(tensor)
    del tensor
    time.sleep(0.05)  # gloo's worker has released the work by now
    gc.collect()
    assert kept() is not None  # the last reference is not the worker's
    for _ in range(collectives.KEPT):
        collectives.broadcast(torch.zeros(2), src=0)
    gc.collect()
    assert kept() is None  # bounded: later collectives push it out


def test_gradtrace_calls_collectives_only_through_its_module():
    direct = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "tracking" / "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                direct.append(f"{path.relative_to(PACKAGE)}:{node.lineno} dist.{node.func.attr}")
    assert direct == []
