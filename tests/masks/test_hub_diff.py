"""``gradtrace diff`` / ``rank`` on hub repos: the real ``huggingface_hub`` client against a local hub.

The hub is :mod:`tests.helpers.hub_server` (stdlib ``http.server`` on 127.0.0.1, repos from folders, HTTP
ranges, bytes served counted server-side). ``huggingface_hub`` reads ``HF_ENDPOINT`` at import, and
this pytest process has imported it already (through transformers), so the CLI runs in a separate
worker process started with the environment set: it reads one argv per line on stdin and runs
``gradtrace.cli.main`` on it — the real CLI with the real client — so the tests pay the
interpreter's start-up once. Every expected number is computed here from the tensors written,
independently of gradtrace's comparison code.
"""

from __future__ import annotations

import collections
import json
import re
import struct
from pathlib import Path

import pytest
import torch

from gradtrace.formats.masks_file import load_masks
from gradtrace.masks.diff import CheckpointDiffError, diff_checkpoints
from tests.helpers.cli_worker import Worker
from tests.helpers.hub_repos import (
    BUFFER,
    HUB_FLAGS,
    SHAPES,
    TOLERANCES,
    base_tensors,
    counts_of,
    expected_counts,
    perturbed,
    with_buffer,
    write_revision,
)
from tests.helpers.hub_server import HubServer, commit_sha


# ------------------------------------------------------------------------------------------ independent truth
def global_of(expected: dict[str, dict[str, int]]) -> dict[str, float]:
    n = sum(c["numel"] for c in expected.values())
    return {t: sum(c[t] for c in expected.values()) / n for t in TOLERANCES}


def data_ranges(folder: Path, names: set[str]) -> list[tuple[str, int, int]]:
    """(file, first byte, end byte) of each tensor in ``names``, from the files' own headers."""
    ranges = []
    for file in sorted(folder.glob("*.safetensors")):
        raw = file.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        for name, entry in json.loads(raw[8:8 + length]).items():
            if name in names:
                begin, end = entry["data_offsets"]
                ranges.append((file.name, 8 + length + begin, 8 + length + end))
    return ranges


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Repos: org/base (main), org/tuned (main and step-100), org/gated; and the tensors they hold."""
    root = tmp_path_factory.mktemp("hub")
    base = base_tensors()
    revisions = {"main": perturbed(base, seed=1, fraction=0.3), "step-100": perturbed(base, seed=2, fraction=0.6)}
    write_revision(root / "org/base/main", with_buffer(base))
    for revision, tensors in revisions.items():
        write_revision(root / "org/tuned" / revision, with_buffer(tensors))
    write_revision(root / "org/gated/main", with_buffer(base))
    server = HubServer(root)
    server.gated.add("org/gated")
    state = {"root": root, "server": server, "base": base, "tuned": revisions}
    yield state
    state["server"].stop()  # the resume test restarts it


@pytest.fixture(scope="module")
def cli(hub, tmp_path_factory):
    worker = Worker(hub["server"].endpoint, tmp_path_factory.mktemp("client"))
    yield worker
    worker.close()


def diff(cli: Worker, base: str, tuned: str, *extra: str) -> dict:
    return cli.run("diff", base, tuned, *(a for t in TOLERANCES for a in ("--tolerance", t)), *HUB_FLAGS, *extra)


# ------------------------------------------------------------------------------------------ tests
def test_two_revisions_streamed_each_tensor_fetched_once_nothing_on_disk(hub, cli):
    server, root = hub["server"], hub["root"]
    float_names = set(SHAPES)
    for revision, spelled in (("step-100", "org/tuned@step-100"), ("main", "org/tuned"),
                              ("step-100", f"org/tuned@{commit_sha('org/tuned', 'step-100')}")):
        server.served.clear()
        out = cli.home / f"{revision}.json"
        done = diff(cli, "org/base", spelled, "--json", "-o", str(out))
        assert done["rc"] == 0, done["stderr"]
        result = json.loads(out.read_text())
        expected = expected_counts(hub["base"], hub["tuned"][revision])
        assert counts_of(result) == expected, spelled
        assert result["global"] == pytest.approx(global_of(expected), abs=0, rel=1e-15)
        assert result["base"] == "org/base" and result["tuned"] == spelled
        assert [s["name"] for s in result["skipped"]] == [BUFFER]
        # the two revisions really differ, so this is the revision asked for
        assert expected != expected_counts(hub["base"], hub["tuned"]["main" if revision != "main" else "step-100"])

        # Server side: each float tensor's exact byte range once per repo, the headers, and nothing else.
        want = collections.Counter(
            [("org/base", "main", *r) for r in data_ranges(root / "org/base/main", float_names)]
            + [("org/tuned", revision, *r) for r in data_ranges(root / "org/tuned" / revision, float_names)])
        ranges = [entry for entry in server.served if entry[2].endswith(".safetensors")]
        headers = [e for e in ranges if (e[3], e[4]) == (0, 8) or _is_header(root, e)]
        got_data = collections.Counter(e for e in ranges if e not in headers)
        assert got_data == want
        assert len(headers) == 2 * 2 * 2  # 2 header reads × 2 shards × 2 repos
        # the closing line, with the bytes the server sent
        bytes_read = sum(e[4] - e[3] for e in got_data.elements())
        assert f"read {bytes_read / 1e9:.3g} GB" in done["stderr"]

    # Streaming wrote no shard anywhere: the HF cache and the temp dir hold nothing of the size of one.
    smallest_shard = min(p.stat().st_size for p in (root / "org/tuned/main").glob("*.safetensors"))
    assert [f for f in cli.files_written() if f[1] >= smallest_shard or f[0].endswith(".safetensors")] == []
    assert not list(cli.cwd.rglob("*.safetensors")) and not list(cli.cwd.rglob("*.resume.jsonl"))


def _is_header(root: Path, entry: tuple[str, str, str, int, int]) -> bool:
    """The second header read of a shard: bytes 8 … 8 + header length."""
    repo, revision, file, start, stop = entry
    (length,) = struct.unpack("<Q", (root / repo / revision / file).read_bytes()[:8])
    return (start, stop) == (8, 8 + length)


def test_server_stopped_mid_diff_resumes_to_the_same_result(hub, cli, tmp_path):
    root = hub["root"]
    out, masks = tmp_path / "out.json", tmp_path / "masks.safetensors"
    state = Path(f"{out}.resume.jsonl")
    args = ("org/base", "org/tuned@step-100", "--json", "-o", str(out), "--masks-out", str(masks))
    # The server goes away after the headers and 5 tensor reads ...
    first = hub["server"]
    first.stop_after_ranges = first.range_requests + 2 * 2 * 2 + 5
    broken = diff(cli, *args)
    assert first.stopped.is_set()
    assert broken["rc"] == 1
    assert re.search(r"org/(base|tuned@step-100): model-0000\d-of-00002.safetensors: still failing after 2 "
                     r"retries .*run the same command again to resume", broken["stderr"]), broken
    assert not out.exists() and not masks.exists()
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    finished = {entry["name"] for entry in lines[1:]}
    assert 1 <= len(finished) < len(SHAPES)
    assert lines[0]["key"]["tuned"] == f"org/tuned@{commit_sha('org/tuned', 'step-100')}"

    # ... and comes back on the same address; the same command resumes.
    again = hub["server"] = HubServer(root, port=first.port)
    again.gated = first.gated
    done = diff(cli, *args)
    assert done["rc"] == 0, done["stderr"]
    expected = expected_counts(hub["base"], hub["tuned"]["step-100"])
    assert counts_of(json.loads(out.read_text())) == expected
    assert not state.exists()  # complete: the state is gone
    # Only what was not finished before was fetched again.
    fetched = {e[2:] for e in again.served if e[2].endswith(".safetensors") and not _is_header(root, e) and e[3] != 0}
    want = {r for name in set(SHAPES) - finished for folder in (root / "org/base/main", root / "org/tuned/step-100")
            for r in data_ranges(folder, {name})}
    assert fetched == want
    # The masks (finished before the break or after) are the bitwise changes, tensor by tensor.
    saved = load_masks(masks)
    for name, a in hub["base"].items():
        changed = a.view(torch.int16) != hub["tuned"]["step-100"][name].view(torch.int16)
        assert torch.equal(saved["update"][name], changed), name


def test_transient_errors_are_retried(hub, cli):
    server = hub["server"]
    server.served.clear()
    server.fail_next = 2  # 503 twice in a row: within the 2 retries of a request
    done = diff(cli, "org/base", "org/tuned", "--json")
    assert done["rc"] == 0, done["stderr"]
    assert server.fail_next == 0
    assert counts_of(json.loads(done["stdout"])) == expected_counts(hub["base"], hub["tuned"]["main"])


def test_missing_repo_missing_revision_and_gated_repo_are_named(hub, cli):
    cases = {("org/nope", "org/tuned"): ("org/nope", "no such model repo"),
             ("org/base", "org/tuned@no-such-rev"): ("org/tuned", "no revision 'no-such-rev'"),
             ("org/gated", "org/tuned"): ("org/gated", "gated repo")}
    for (base, tuned), (named, says) in cases.items():
        done = diff(cli, base, tuned, "--json")
        assert done["rc"] == 1 and done["stdout"] == ""
        assert named in done["stderr"] and says in done["stderr"], done["stderr"]
    done = cli.run("rank", "org/gated", "org/tuned", *HUB_FLAGS)
    assert done["rc"] == 1 and "org/gated: gated repo" in done["stderr"]


def test_cache_downloads_once_then_costs_nothing(hub, cli):
    server = hub["server"]
    results = []
    for _ in range(2):
        server.served.clear()
        out = cli.home / "cached.json"
        done = diff(cli, "org/base", "org/tuned@step-100", "--cache", "--json", "-o", str(out))
        assert done["rc"] == 0, done["stderr"]
        results.append(json.loads(out.read_text()))
        shards = [e for e in server.served if e[2].endswith(".safetensors")]
        if len(results) == 1:
            assert len(shards) == 4  # each shard downloaded whole, once
        else:
            assert shards == []  # the repeated diff read the cache
    assert counts_of(results[0]) == counts_of(results[1]) == expected_counts(hub["base"], hub["tuned"]["step-100"])
    cached = [p for p in cli.hf_home.rglob("*.safetensors")]
    assert len(cached) == 4


def test_offline_reads_the_cache_only(hub, cli, tmp_path):
    """HF_HUB_OFFLINE=1 (read at import: a process of its own) over the cache the --cache test filled."""
    server = hub["server"]
    server.served.clear()
    offline = Worker(server.endpoint, tmp_path / "offline", hf_home=cli.hf_home, offline=True)
    try:
        done = diff(offline, "org/base", "org/tuned@step-100", "--json")
        missing = diff(offline, "org/base", "org/tuned@main", "--json")
    finally:
        offline.close()
    assert done["rc"] == 0, done["stderr"]
    assert counts_of(json.loads(done["stdout"])) == expected_counts(hub["base"], hub["tuned"]["step-100"])
    assert missing["rc"] == 1 and "org/tuned@main: not a local path, and HF_HUB_OFFLINE=1" in missing["stderr"]
    assert server.served == []  # not one request


def test_rank_on_hub_repos_equals_rank_of_local_copies(hub, cli):
    done = cli.run("rank", "org/base", "org/tuned@step-100", "--json", "--seed", "3", *HUB_FLAGS)
    assert done["rc"] == 0, done["stderr"]
    result = json.loads(done["stdout"])
    for name, row in result["per_matrix"].items():
        delta = hub["tuned"]["step-100"][name].float() - hub["base"][name].float()
        assert row["rank"] == int(torch.linalg.matrix_rank(delta)), name
        assert row["nonzero"] == int((delta != 0).sum())
    assert set(result["per_matrix"]) == {n for n, s in SHAPES.items() if len(s) == 2}


# ------------------------------------------------------------------------------------------ FP8
FP8_CONFIG = {"model_type": "deepseek_v3", "quantization_config": {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}


def fp8_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, set[tuple[int, int]]]]:
    """DeepSeek-layout base/tuned; per weight the blocks whose scale changed (their fp8 bits did not)."""
    g = torch.Generator().manual_seed(5)

    def fp8(shape):  # no zeros: 0 · s = 0 would hide a scale change
        signs = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        return (signs * (0.1 + torch.rand(shape, generator=g) * 4)).to(torch.float8_e4m3fn)

    up = "model.layers.0.mlp.up_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    norm = "model.layers.0.input_layernorm.weight"
    base = {up: fp8((256, 192)), down: fp8((256, 256)), norm: torch.ones(192, dtype=torch.bfloat16)}
    base[up + "_scale_inv"] = torch.rand((2, 2), generator=g) * 1e-3 + 1e-4
    base[down + "_scale_inv"] = torch.rand((2, 2), generator=g) * 1e-3 + 1e-4
    tuned = {k: v.clone() for k, v in base.items()}
    bits = tuned[up].view(torch.uint8)
    bits[:128, :128][torch.rand((128, 128), generator=g) < 0.1] ^= 1  # fp8 bits changed in block (0, 0)
    scale = tuned[up + "_scale_inv"]
    scale[1, 1] = torch.nextafter(scale[1, 1], torch.tensor(1.0))  # block (1, 1): one ULP of scale, same bits
    tuned[down + "_scale_inv"][0, 1] *= 1.5  # down_proj: only a scale changes, block (0, 1)
    tuned[norm][:7] = 1.0078125  # a bf16 tensor alongside
    return base, tuned, {up: {(1, 1)}, down: {(0, 1)}}


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8 × its block's scale via a Kronecker product (exact in float64), independent of gradtrace's."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[name + "_scale_inv"].double()
            m, n = t.shape
            t = t.double() * torch.kron(s, torch.ones(128, 128, dtype=torch.float64))[:m, :n]
        out[name] = t
    return out


def test_fp8_deepseek_layout_compares_dequantized_values(hub, cli, tmp_path):
    base, tuned, scale_changed = fp8_pair()
    root = hub["root"]
    write_revision(root / "org/fp8-base/main", base, FP8_CONFIG, shards=1)
    write_revision(root / "org/fp8-tuned/main", tuned, FP8_CONFIG, shards=1)
    out = tmp_path / "fp8.json"
    done = diff(cli, "org/fp8-base", "org/fp8-tuned", "--json", "-o", str(out))
    assert done["rc"] == 0, done["stderr"]
    result = json.loads(out.read_text())
    deq_a, deq_b = dequantized(base), dequantized(tuned)
    expected = expected_counts(deq_a, deq_b)
    assert counts_of(result) == expected
    # Scale tensors are metadata of their weights: not tensors, not elements of the fractions.
    assert set(result["per_matrix"]) == {n for n in base if not n.endswith("_scale_inv")}
    assert result["numel"] == sum(t.numel() for n, t in base.items() if not n.endswith("_scale_inv"))
    # A block whose scale changed counts as changed in full, though its fp8 bits did not.
    for name, blocks in scale_changed.items():
        same_bits = base[name].view(torch.uint8) == tuned[name].view(torch.uint8)
        for i, j in blocks:
            assert bool(same_bits[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].all())
        changed_bits = int((~same_bits).sum())
        block_elements = sum(min(128, base[name].shape[0] - 128 * i) * min(128, base[name].shape[1] - 128 * j)
                             for i, j in blocks)
        assert expected[name]["0"] == base[name].numel() - changed_bits - block_elements
    # The same pair from local folders goes through the same loop and gives the same numbers.
    local = diff_checkpoints(root / "org/fp8-base/main", root / "org/fp8-tuned/main", tolerances=TOLERANCES)
    assert counts_of(local.to_dict()) == expected


def test_other_quantization_is_refused_by_name(tmp_path):
    tensors = {"model.layers.0.mlp.up_proj.qweight": torch.zeros((4, 4), dtype=torch.int32)}
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    write_revision(tmp_path / "a", tensors, config, shards=1)
    write_revision(tmp_path / "b", tensors, config, shards=1)
    with pytest.raises(CheckpointDiffError, match=r"quant_method='gptq'.*dequantizes only"):
        diff_checkpoints(tmp_path / "a", tmp_path / "b")


def test_hub_ids_are_parsed_and_local_paths_win(tmp_path, monkeypatch):
    from gradtrace.masks.hub import HubRef, parse_hub_ref

    assert parse_hub_ref("deepseek-ai/DeepSeek-V3-Base") == HubRef("deepseek-ai/DeepSeek-V3-Base")
    assert parse_hub_ref("org/name@refs/pr/1") == HubRef("org/name", "refs/pr/1")
    assert parse_hub_ref("./org/name") is None and parse_hub_ref("/abs/path") is None
    # A folder that exists is read locally even when its path looks like a hub id.
    monkeypatch.chdir(tmp_path)
    write_revision(tmp_path / "org" / "name", base_tensors(), shards=1)
    result = diff_checkpoints("org/name", "org/name")
    assert result.global_sparsity() == {"0": 1.0, "1e-5": 1.0}


def test_output_contract_is_the_local_one(hub, cli):
    """--tolerance (repeated, spelling kept), --relative, --csv and --json from hub ids equal the local diff's."""
    root = hub["root"]
    flags = ("--tolerance", "0", "--tolerance", "1e-05", "--relative", "1e-3")
    local = diff_checkpoints(root / "org/base/main", root / "org/tuned/step-100", tolerances=("0", "1e-05"),
                             relative=("1e-3",))
    as_csv = cli.run("diff", "org/base", "org/tuned@step-100", *flags, "--csv", *HUB_FLAGS)
    assert as_csv["rc"] == 0, as_csv["stderr"]
    assert as_csv["stdout"] == local.to_csv()
    as_json = cli.run("diff", "org/base", "org/tuned@step-100", *flags, "--json", *HUB_FLAGS)
    result = json.loads(as_json["stdout"])
    assert set(result["global"]) == {"0", "1e-05"} and set(result["global_relative"]) == {"1e-3"}
    expected = local.to_dict()
    for key in ("base", "tuned", "notes"):
        result.pop(key), expected.pop(key)
    assert result == expected
