"""The sampled subset of a sharded parameter (``sharding.sample_index``), in one process: the elements a rank's
shard samples are those the full tensor samples there."""

from __future__ import annotations

import random

import numpy as np
import torch

from gradtrace.tracking import sharding


def test_sampled_elements_of_a_box_shard_are_those_of_the_full_tensor(monkeypatch):
    """The index math of ``sharding.sample_index`` against brute force, on random boxes (the shard that
    ``[Shard(0), Shard(1)]`` and the like leave on a rank); tests/engines/test_mixed_sharding.py runs real DTensors."""
    rng = random.Random(0)

    class Param:
        pass

    for _ in range(300):
        full = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 3)))
        local = tuple(rng.randint(0, n) for n in full)
        offset = tuple(rng.randint(0, n - m) for n, m in zip(full, local, strict=True))
        stride = rng.randint(2, 5)
        monkeypatch.setattr(sharding, "_local_box", lambda p, box=(local, offset): box)
        monkeypatch.setattr(sharding, "is_sharded", lambda p: True)
        monkeypatch.setattr(sharding, "local", lambda p: torch.zeros(0))
        param = Param()
        param.shape = full
        box = torch.arange(int(np.prod(full))).reshape(full)[
            tuple(slice(o, o + n) for o, n in zip(offset, local, strict=True))].reshape(-1)
        index = sharding.sample_index(param, stride)
        if index is None:  # a contiguous run: sample_start describes it
            assert torch.equal(box, torch.arange(int(box[0]), int(box[0]) + box.numel()) if box.numel() else box)
            if box.numel():
                assert sharding.sample_start(param, stride) == (-int(box[0])) % stride
        else:
            assert torch.equal(index, torch.nonzero(box % stride == 0).reshape(-1))
