"""Split tracking (gradtrace.tracking.split) under real DDP, 2 CPU processes (gloo), against one process.

Run alone with ``python -m pytest -m distributed tests/tracking/test_split_tracking.py``.
"""

from __future__ import annotations

import json

import pytest

from gradtrace import read_run_log
from gradtrace.tracking import split
from tests.helpers.launching import assert_same_masks, launch, ranks

pytestmark = pytest.mark.distributed


def assert_same_logs(got_dir, want_dir) -> None:
    got, want = read_run_log(got_dir), read_run_log(want_dir)
    assert [r["step"] for r in got["logs"]] == [r["step"] for r in want["logs"]] == [2, 4]
    for got_step, want_step in zip(got["logs"], want["logs"], strict=True):
        for key in ("global", "per_matrix", "per_layer", "per_kind", "cancellation_histogram"):
            assert got_step[key] == want_step[key], key
    got_summary = json.loads((got_dir / "summary.json").read_text())
    want_summary = json.loads((want_dir / "summary.json").read_text())
    for key in ("global", "per_matrix", "per_layer", "per_kind"):
        assert got_summary[key] == want_summary[key], key


def test_ddp_ranks_split_the_tracking_and_match_one_process(tmp_path):
    """Each DDP rank tracks a disjoint share of the parameters (about half the state): the tied embedding,
    more than half the model, cut between them, the others whole; one matrix joins the optimizer at step 3
    on both ranks alike, and masks, per-step counts and summaries equal one process's."""
    launch("loop_split.py", str(tmp_path / "ddp"), "ddp", "--add-group", processes=2, cwd=tmp_path)
    launch("loop_split.py", str(tmp_path / "single"), "ddp", "--add-group", processes=1, cwd=tmp_path)
    got, (want,) = ranks(tmp_path / "ddp"), ranks(tmp_path / "single", world=1)
    assert all(r["sharded"] for r in got) and not want["sharded"] and want["spans"] == {}
    spans = [r["spans"] for r in got]
    assert set(spans[0]) == set(spans[1]) and "model.layers.1.mlp.down_proj.weight" in spans[0]
    embedding = "model.embed_tokens.weight"
    numel = 1000 * 32
    assert 2 * numel > want["tracked_numel"]  # more than a rank's share: cut in two halves, on a byte
    assert [tuple(s[embedding]) for s in spans] == [(0, numel // 2), (numel // 2, numel // 2)]
    for name in set(spans[0]) - {embedding}:  # every other parameter, the late one included: whole on one rank
        lengths = sorted(s[name][1] for s in spans)
        assert lengths[0] == 0 and lengths[1] > 0, name
    # collectives in the optimizer step, counted: the step's 2-element flags and the cut embedding's finite
    # flag at every step, plus the counts' one all-reduce at the logging steps (2 and 4); none to add the
    # late matrix (every rank assigns it alike)
    assert [r["collectives_per_step"] for r in got] == [[2, 3, 2, 3]] * 2
    assert sum(r["tracked_numel"] for r in got) == want["tracked_numel"]
    for where in ("device", "reference"):
        per_rank = [r["state_bytes"][where] for r in got]
        assert abs(sum(per_rank) - want["state_bytes"][where]) <= 0.01 * want["state_bytes"][where] + 64
        assert max(per_rank) <= 0.55 * want["state_bytes"][where]  # whole embedding on one rank: 0.8
    assert_same_masks(tmp_path / "ddp" / "masks.safetensors", tmp_path / "single" / "masks.safetensors")
    assert_same_logs(tmp_path / "ddp", tmp_path / "single")


def test_split_off_tracks_everything_on_every_rank(tmp_path):
    launch("loop_split.py", str(tmp_path / "ddp"), "ddp", "--no-split", processes=2, cwd=tmp_path)
    launch("loop_split.py", str(tmp_path / "single"), "ddp", processes=1, cwd=tmp_path)
    got, (want,) = ranks(tmp_path / "ddp"), ranks(tmp_path / "single", world=1)
    assert not any(r["sharded"] for r in got)
    assert [r["state_bytes"] for r in got] == [want["state_bytes"]] * 2
    assert [r["collectives_per_step"] for r in got] == [[0] * 4] * 2  # nothing to agree on
    assert_same_masks(tmp_path / "ddp" / "masks.safetensors", tmp_path / "single" / "masks.safetensors")


def test_parameters_larger_than_a_share_are_cut_on_bytes_the_rest_given_whole():
    loads = [0, 0, 0]
    # 120 elements in all, 40 a rank: "big" (61) is cut in three spans starting on bytes, the rest whole
    owners, cuts = split.divide([("big", 61), ("a", 30), ("b", 20), ("c", 9)], 3, loads)
    assert cuts == {"big": [(0, 24), (24, 24), (48, 13)]}
    assert owners == {"a": 2, "b": 0, "c": 1} and loads == [44, 33, 43]  # a to rank 2 (13), b to 0, c to 1
    assert split.cut(5, 4) == [(0, 5), (5, 0), (5, 0), (5, 0)]  # fewer elements than a byte: one span holds all
    for numel, world in ((1, 2), (16, 2), (17, 2), (1000, 3), (32000, 8)):
        spans = split.cut(numel, world)
        assert sum(length for _, length in spans) == numel
        assert all(start % 8 == 0 for start, length in spans if length)
        assert all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_assignment_is_greedy_by_size_and_continues_the_balance():
    sizes = [("b", 10), ("a", 10), ("c", 30), ("d", 5)]
    loads = [0, 0]
    # largest first (c to rank 0), then a and b (ties by name) to rank 1, then d to the lighter rank 1
    assert split.assign(sizes, 2, loads) == {"c": 0, "a": 1, "b": 1, "d": 1}
    assert loads == [30, 25]
    assert split.assign([("e", 7)], 2, loads) == {"e": 1} and loads == [30, 32]
    assert split.assign(reversed(sizes), 2) == {"c": 0, "a": 1, "b": 1, "d": 1}  # whatever the order given
