"""Mixed shardings (real torch.distributed, gloo, 4 CPU processes) and DeepSpeed ZeRO-3 with CPU offload
(2 processes), each against a single-process run.

One launch of ``tests/engines/workers/mixed_sharding.py`` covers: FSDP2 ``ignored_params`` and ``replicate()``
beside ``fully_shard`` (parameters every rank holds whole must be counted once), a 2-D mesh
``[Shard(0), Shard(1)]``, HSDP ``[Replicate(), Shard(0)]`` and ``Shard(1)`` (the right reduction per
parameter, the sampled subset by global index), FSDP + TP's strided shards, and a NaN in one rank's shard
(the whole parameter dropped for the step, on every rank, as in one process). Run alone with ``python -m pytest -m distributed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.launching import DEEPSPEED_ENV, assert_same_masks, launch, ranks

pytestmark = pytest.mark.distributed

WORLD = 4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    launch("mixed_sharding.py", str(out / "run"), processes=WORLD, cwd=out)
    return out / "run"


def load(run: Path, case: str) -> list[dict]:
    return [json.loads((run / f"{case}-rank{r}.json").read_text()) for r in range(WORLD)]


def assert_equal_to_single_process(records: list[dict]) -> None:
    """Every rank's (all-reduced) measurement is the single process's, count for count."""
    for record in records:
        assert record["is_sharded"]
        sharded, single = record["sharded"], record["single"]
        assert sharded["per_param"] == single["per_param"]
        assert sharded["counters"] == single["counters"]
        assert sharded["histogram"] == single["histogram"]


@pytest.mark.parametrize("case", ["ignored", "replicate"])
def test_parameters_held_whole_count_once_beside_fully_shard(mixed, case):
    records = load(mixed, case)
    # the run really mixed sharded DTensors with parameters every rank holds whole
    held_whole = "Tensor" if case == "ignored" else "DTensor[Replicate()]"
    assert {"DTensor[Shard(dim=0)]", held_whole} <= set(records[0]["grad_kinds"])
    assert_equal_to_single_process(records)
    single = records[0]["single"]["per_param"]
    whole = ["norm.bias", "head.bias"] if case == "ignored" else ["block.0.bias", "block.2.weight"]
    assert [single[name]["numel"] for name in whole] == ([16, 35] if case == "ignored" else [24, 16 * 24])
    assert_same_masks(mixed / f"{case}-sharded.safetensors", mixed / f"{case}-single.safetensors")


def test_2d_meshes_and_a_nan_in_one_shard_match_single_process(mixed):
    records = load(mixed, "meshes")
    assert_equal_to_single_process(records)
    single = records[0]["single"]
    # the step with a NaN in one element of rank 3's shard of w2d (7x9) and of "columns" (5x10), and in
    # an HSDP shard (6x5) that two replicas hold: the parameters are dropped whole for that step, every
    # element counted as discarded once (not once per replica)
    assert single["counters"]["nonfinite_gradient_steps"] == 1
    assert single["counters"]["discarded_gradient_elements"] == 7 * 9 + 5 * 10 + 6 * 5
    # HSDP: each element counted once although two ranks hold each shard (the equality above is exact;
    # this says what it would have caught)
    for record in records:
        hsdp = record["sharded"]["per_param"]["hsdp"]
        assert hsdp["numel"] == 6 * 5 and hsdp == single["per_param"]["hsdp"]
        assert 0 < hsdp["gradient"] < hsdp["numel"]
    # the sampled subset: every 3rd element of the full parameter, also where shards are no contiguous run
    assert single["per_param"]["w2d"]["sampled"] == len(range(0, 63, 3))
    assert single["per_param"]["columns"]["sampled"] == len(range(0, 50, 3))
    assert records[0]["listed_samples"] == ["columns", "w2d"]
    assert_same_masks(mixed / "meshes-sharded.safetensors", mixed / "meshes-single.safetensors")


def test_fsdp_tp_strided_shards_count_exactly(mixed):
    """``[_StridedShard(0), Shard(0)]`` (FSDP + TP; ``is_shard()`` is False for it): counts and masks,
    without sums (their subset is not chosen by global index for these shards)."""
    records = load(mixed, "strided")
    assert_equal_to_single_process(records)
    assert records[0]["single"]["per_param"]["fsdp_tp"]["numel"] == 8 * 3
    assert records[0]["single"]["counters"]["discarded_gradient_elements"] == 8 * 3  # its NaN step
    assert_same_masks(mixed / "strided-sharded.safetensors", mixed / "strided-single.safetensors")


def test_zero3_with_cpu_offload_matches_single_process(tmp_path, reference):
    out = tmp_path / "ds"
    launch("trainer_deepspeed.py", str(out), "3", "4", "1", "offload", processes=2, cwd=tmp_path,
           env_extra=DEEPSPEED_ENV)
    got, (want,) = ranks(out), ranks(reference, world=1)
    for record in got:
        assert record["offload"] == {"offload_optimizer": True, "offload_param": True}
        assert record["sharded"] and record["warnings"] == [] and record["optimizer_steps"] == 4
    assert sum(r["tracked_numel"] for r in got) == want["tracked_numel"]
    assert_same_masks(out / "gradtrace" / "masks.safetensors", reference / "gradtrace" / "masks.safetensors")
