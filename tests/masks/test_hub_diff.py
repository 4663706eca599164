"""``gradtrace diff`` / ``rank`` on hub repos: the real ``huggingface_hub`` client against a local hub.

The hub is :mod:`tests.hub_server` (stdlib ``http.server`` on 127.0.0.1, repos from folders, HTTP
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
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gradtrace.formats.masks_file import load_masks
from gradtrace.masks.diff import CheckpointDiffError, diff_checkpoints
from tests.hub_server import HubServer, commit_sha

REPO = Path(__file__).resolve().parents[2]
TOLERANCES = ("0", "1e-5")
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}

# name -> shape of the bf16 test checkpoint (two shards), plus one integer buffer that is skipped
SHAPES = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 48),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.1.self_attn.q_proj.weight": (32, 32),
    "model.layers.1.mlp.down_proj.weight": (32, 48),
    "model.layers.1.input_layernorm.weight": (32,),
    "lm_head.weight": (64, 32),
}
BUFFER = "model.layers.0.self_attn.position_ids"


# ------------------------------------------------------------------------------------------ building repos
def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # magnitudes ~1e-3, so one bf16 ULP (~4e-6 … 8e-6) and two straddle the 1e-5 tolerance
    return {name: (torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16) for name, shape in SHAPES.items()}


def perturbed(base: dict[str, torch.Tensor], seed: int, fraction: float) -> dict[str, torch.Tensor]:
    """Each element moved by −3 … +3 bf16 ULPs (0 included) with probability ``fraction``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, a in base.items():
        bits = a.view(torch.int16).reshape(-1).clone()
        chosen = torch.rand(bits.numel(), generator=g) < fraction
        ulps = torch.randint(-3, 4, (bits.numel(),), generator=g).to(torch.int16)
        bits[chosen] += ulps[chosen]
        out[name] = bits.view(torch.bfloat16).reshape(a.shape)
    return out


def write_revision(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                   shards: int = 2) -> None:
    """An HF model folder: ``shards`` safetensors files, the index, config.json."""
    folder.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))


def with_buffer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, BUFFER: torch.arange(16, dtype=torch.int64)}


# ------------------------------------------------------------------------------------------ independent truth
def expected_counts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Per tensor: unchanged elements bitwise, and by the paper's ``isclose(delta, 0, atol=tol)``."""
    out = {}
    for name in a:
        x, y = a[name], b[name]
        if not x.is_floating_point():
            continue
        delta = y - x
        out[name] = {"0": int((x.view(INT_OF[x.dtype]) == y.view(INT_OF[y.dtype])).sum()),
                     "1e-5": int(torch.isclose(delta, torch.zeros_like(delta), rtol=0, atol=1e-5).sum()),
                     "numel": x.numel()}
    return out


def counts_of(result: dict) -> dict[str, dict[str, int]]:
    """Exact counts back from the JSON (a fraction of n < 2**53 elements rounds back exactly)."""
    return {name: {**{t: round(row["sparsity"][t] * row["numel"]) for t in TOLERANCES}, "numel": row["numel"]}
            for name, row in result["per_matrix"].items()}


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


class Worker:
    """A process with HF_ENDPOINT (and a fresh HF_HOME, TMPDIR, cwd) set before anything imports
    huggingface_hub, running ``gradtrace.cli.main(argv)`` for each argv line it reads."""

    CODE = textwrap.dedent("""
        import contextlib, io, json, sys
        from gradtrace.cli import main
        for line in sys.stdin:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(json.loads(line))
                except SystemExit as exit:
                    rc = exit.code
            print(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
    """)

    def __init__(self, endpoint: str, home: Path, hf_home: Path | None = None, offline: bool = False):
        self.home = home
        self.cwd, self.tmp, self.hf_home = home / "cwd", home / "tmp", hf_home or home / "hf"
        for folder in (self.cwd, self.tmp, self.hf_home):
            folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0",
               "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(self.hf_home), "TMPDIR": str(self.tmp),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "COLUMNS": "200"}
        env.pop("HF_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=self.cwd)

    def run(self, *argv: str) -> dict:
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the CLI worker died"
        done = json.loads(line)
        done["stderr"] = " ".join(done["stderr"].split())  # rich wraps long messages: match them as one line
        return done

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def files_written(self) -> list[tuple[str, int]]:
        """Every file under the worker's HF_HOME and TMPDIR, with its size."""
        return [(str(p), p.stat().st_size) for folder in (self.hf_home, self.tmp)
                for p in folder.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def cli(hub, tmp_path_factory):
    worker = Worker(hub["server"].endpoint, tmp_path_factory.mktemp("client"))
    yield worker
    worker.close()


HUB_FLAGS = ("--retries", "2", "--backoff", "0.05")  # bounded, short: a dead server fails in well under a second


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
