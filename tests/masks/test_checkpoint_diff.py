"""Post-hoc checkpoint diff, checked against numpy reference computations on the same tensors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gradtrace import GradTraceCallback
from gradtrace.cli import main as cli_main
from gradtrace.demo import runs
from gradtrace.formats.masks_file import load_masks
from gradtrace.masks import diff as checkpoint_diff
from gradtrace.masks.diff import CheckpointDiffError, diff_checkpoints

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}

# name -> (dtype, shape, layer, kind) of the test checkpoint (int buffer excluded)
SPEC = {
    "model.embed_tokens.weight": (torch.bfloat16, (50, 24), None, "embed"),
    "model.layers.0.self_attn.q_proj.weight": (torch.bfloat16, (32, 24), 0, "q"),
    "model.layers.0.mlp.down_proj.weight": (torch.float32, (24, 40), 0, "down"),
    "model.layers.1.self_attn.q_proj.weight": (torch.float16, (32, 24), 1, "q"),
    "model.layers.1.input_layernorm.weight": (torch.bfloat16, (24,), 1, "norm"),
    "lm_head.weight": (torch.float32, (50, 24), None, "lm_head"),
}
BUFFER = "model.layers.0.self_attn.position_ids"
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def make_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base and tuned tensors whose deltas straddle 1e-5, with NaNs, signed zeros and untouched elements."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for name, (dtype, shape, _layer, _kind) in SPEC.items():
        # Magnitudes ~1e-3 so one bf16/fp16 ULP (~4e-6 .. 1.5e-5) straddles the 1e-5 tolerance.
        a = (torch.randn(shape, generator=g) * 1e-3).to(dtype)
        n = a.numel()
        flat_a = a.reshape(-1)
        if dtype == torch.float32:
            steps = torch.tensor([0.0, 5e-6, 9.9e-6, 1e-5, 1.01e-5, 1e-4, -2e-5, -8e-6])
            delta = steps[torch.randint(0, len(steps), (n,), generator=g)]
            b = (flat_a + delta).reshape(shape)
        else:
            # Move the stored bits by -2..+2 ULPs: exact control of bitwise vs tolerance equality.
            ulps = torch.randint(-2, 3, (n,), generator=g).to(torch.int16)
            b = (flat_a.view(torch.int16) + ulps).view(dtype).reshape(shape)
        b = b.clone()
        flat_b = b.reshape(-1)
        flat_a[0] = flat_a[4] = 0.0
        flat_b[0] = flat_b[4] = -0.0  # bitwise different, numerically equal (twice: not offset by the NaN)
        if n > 4:
            flat_a[1] = flat_b[1] = float("nan")  # same bits: bitwise unchanged, NaN delta: changed
            flat_b[2] = float("nan")
            flat_a[3] = flat_b[3] = float("inf")  # inf - inf = NaN: changed at any tolerance
            if dtype != torch.float32:
                # A delta of exactly dtype(1e-5) = 1.0014e-5: unchanged for the paper's isclose in the stored
                # dtype (the tolerance is rounded too), changed if compared in float32.
                flat_a[5], flat_b[5] = 0.0, torch.tensor(1e-5).to(dtype)
        base[name], tuned[name] = a, b
    base[BUFFER] = torch.arange(7)
    tuned[BUFFER] = torch.arange(7) + 1
    return base, tuned


def bf16_round(x32: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32; NaN stays NaN."""
    u = x32.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x32), np.float32(np.nan), out)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact float32/float16 numpy copy of a tensor (bf16 widened through its bits)."""
    if t.dtype == torch.bfloat16:
        bits = t.reshape(-1).view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return t.reshape(-1).numpy().copy()


def reference_unchanged(a: torch.Tensor, b: torch.Tensor, tol: float | None = None,
                        eta: float | None = None) -> np.ndarray:
    """Independent numpy reference of "unchanged", flat boolean array."""
    if tol == 0:
        ia = a.reshape(-1).view(INT_OF[a.dtype]).numpy()
        ib = b.reshape(-1).view(INT_OF[b.dtype]).numpy()
        return ia == ib
    na, nb = as_numpy(a), as_numpy(b)
    with np.errstate(invalid="ignore", over="ignore"):
        if eta is not None:
            a32, b32 = na.astype(np.float32), nb.astype(np.float32)
            return np.abs(b32 - a32) <= np.float32(eta) * np.maximum(np.abs(a32), np.abs(b32))
        if a.dtype == torch.bfloat16:
            delta = bf16_round(nb - na)  # the delta in the stored dtype
            limit = bf16_round(np.array([tol], dtype=np.float32))[0]
        else:
            delta = nb - na  # numpy float16 / float32 arithmetic rounds to the stored dtype
            limit = na.dtype.type(tol)
        return np.abs(delta) <= limit


def write_single(tmp: Path, base, tuned) -> tuple[Path, Path]:
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    return tmp / "base.safetensors", tmp / "tuned.safetensors"


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """An HF-style folder with two shards and a model.safetensors.index.json."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(folder / file))
        weight_map.update({n: file for n in members})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def pair(tmp_path):
    base, tuned = make_pair()
    a, b = write_single(tmp_path, base, tuned)
    return base, tuned, a, b


def test_counts_match_numpy_reference_per_matrix_layer_kind_and_global(pair):
    base, tuned, a, b = pair
    result = diff_checkpoints(a, b, tolerances=["0", "1e-5", "1e-4"], relative=["1e-3"])
    data = result.to_dict()
    expected: dict[str, dict[str, int]] = {}
    for name in SPEC:
        expected[name] = {
            "numel": base[name].numel(),
            "0": int(reference_unchanged(base[name], tuned[name], tol=0).sum()),
            "1e-5": int(reference_unchanged(base[name], tuned[name], tol=1e-5).sum()),
            "1e-4": int(reference_unchanged(base[name], tuned[name], tol=1e-4).sum()),
            "rel": int(reference_unchanged(base[name], tuned[name], eta=1e-3).sum()),
        }
        got = data["per_matrix"][name]
        assert got["numel"] == expected[name]["numel"]
        for label in ("0", "1e-5", "1e-4"):
            assert got["sparsity"][label] * got["numel"] == pytest.approx(expected[name][label], abs=1e-6), (name, label)
        assert got["sparsity_relative"]["1e-3"] * got["numel"] == pytest.approx(expected[name]["rel"], abs=1e-6)
    # The fixture must actually separate the criteria, or this test would prove little.
    tot = {k: sum(e[k] for e in expected.values()) for k in ("numel", "0", "1e-5", "1e-4", "rel")}
    assert tot["0"] < tot["1e-5"] < tot["1e-4"] < tot["numel"]
    assert set(data["global"]) == {"0", "1e-5", "1e-4"}
    for label in ("0", "1e-5", "1e-4"):
        assert data["global"][label] == pytest.approx(tot[label] / tot["numel"])
    assert data["global_relative"]["1e-3"] == pytest.approx(tot["rel"] / tot["numel"])
    for layer in (0, 1):
        members = [n for n, s in SPEC.items() if s[2] == layer]
        n = sum(expected[m]["numel"] for m in members)
        assert data["per_layer"][str(layer)]["numel"] == n
        assert data["per_layer"][str(layer)]["sparsity"]["1e-5"] == pytest.approx(
            sum(expected[m]["1e-5"] for m in members) / n)
    assert set(data["per_kind"]) == {"embed", "q", "down", "norm", "lm_head"}
    q = [n for n, s in SPEC.items() if s[3] == "q"]
    assert data["per_kind"]["q"]["sparsity"]["0"] == pytest.approx(
        sum(expected[m]["0"] for m in q) / sum(expected[m]["numel"] for m in q))
    # Non-float buffers are skipped, with a note, and not counted.
    assert [s["name"] for s in data["skipped"]] == [BUFFER]
    assert any("non-float" in note for note in data["notes"])
    assert BUFFER not in data["per_matrix"]


def test_absolute_tolerance_is_the_papers_isclose_on_stored_dtype_deltas(pair):
    """The official script: isclose(delta, 0, atol=tol) with the delta in the load dtype."""
    base, tuned, a, b = pair
    result = diff_checkpoints(a, b, tolerances=["1e-5"])
    for name in SPEC:
        delta = tuned[name] - base[name]
        paper = int(torch.isclose(delta, torch.zeros_like(delta), atol=1e-5).sum())
        assert result.per_tensor[name]["abs:1e-5"] == paper, name


def test_sharded_folder_and_folder_of_files_give_the_same_result(tmp_path, pair):
    base, tuned, a, b = pair
    single = diff_checkpoints(a, b).to_dict()
    sharded = diff_checkpoints(write_sharded(tmp_path / "base_dir", base), write_sharded(tmp_path / "tuned_dir", tuned))
    assert sharded.to_dict()["per_matrix"] == single["per_matrix"]
    assert sharded.global_sparsity() == single["global"]
    # A folder with a single model.safetensors and no index.
    (tmp_path / "hf_a").mkdir()
    (tmp_path / "hf_b").mkdir()
    save_file(base, str(tmp_path / "hf_a" / "model.safetensors"))
    save_file(tuned, str(tmp_path / "hf_b" / "model.safetensors"))
    assert diff_checkpoints(tmp_path / "hf_a", tmp_path / "hf_b").global_sparsity() == single["global"]


def test_chunked_streaming_matches_whole_tensor_counts_and_masks(pair, monkeypatch, tmp_path):
    base, tuned, a, b = pair
    whole = diff_checkpoints(a, b, tolerances=["0", "1e-5"], masks_out=tmp_path / "whole.safetensors")
    monkeypatch.setattr(checkpoint_diff, "CHUNK_ELEMENTS", 64)  # many chunks per tensor, odd tails
    chunked = diff_checkpoints(a, b, tolerances=["0", "1e-5"], masks_out=tmp_path / "chunked.safetensors")
    assert chunked.per_tensor == whole.per_tensor
    m1, m2 = load_masks(tmp_path / "whole.safetensors"), load_masks(tmp_path / "chunked.safetensors")
    for kind in m1:
        for name in m1[kind]:
            assert torch.equal(m1[kind][name], m2[kind][name])


def test_masks_out_holds_the_bitwise_update_mask_readable_by_load_masks(pair, tmp_path):
    base, tuned, a, b = pair
    out = tmp_path / "masks.safetensors"
    diff_checkpoints(a, b, tolerances=["0", "1e-5"], relative=["1e-3"], masks_out=out)
    masks = load_masks(out)
    # Kind names spelled like the live tracker's (f"update_abs_{tol:g}"), so the masks compare directly.
    assert set(masks) == {"update", "update_abs_1e-05", "update_rel_0.001"}
    assert set(masks["update"]) == set(SPEC)
    for name in SPEC:
        expect_changed = ~reference_unchanged(base[name], tuned[name], tol=0)
        assert np.array_equal(masks["update"][name].reshape(-1).numpy(), expect_changed), name
        assert tuple(masks["update"][name].shape) == tuple(base[name].shape)
        assert np.array_equal(masks["update_abs_1e-05"][name].reshape(-1).numpy(),
                              ~reference_unchanged(base[name], tuned[name], tol=1e-5))
    assert masks.dtypes["model.layers.0.self_attn.q_proj.weight"] == "bfloat16"
    assert masks.info["source"] == "gradtrace diff"


def test_two_spellings_of_one_tolerance_keep_both_labels_and_one_mask(pair, tmp_path):
    base, tuned, a, b = pair
    out = tmp_path / "m.safetensors"
    result = diff_checkpoints(a, b, tolerances=["1e-5", "1e-05", "0", "0.0"], masks_out=out)
    assert list(result.global_sparsity()) == ["1e-5", "1e-05", "0", "0.0"]
    assert result.global_sparsity()["1e-5"] == result.global_sparsity()["1e-05"]
    masks = load_masks(out)
    assert set(masks) == {"update", "update_abs_1e-05"}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(masks["update_abs_1e-05"][name].reshape(-1).numpy(),
                          ~reference_unchanged(base[name], tuned[name], tol=1e-5))


def test_posthoc_masks_equal_the_live_trackers(tmp_path):
    """Post-hoc (checkpoint diff) and live (gradtrace.trace) masks of one bf16 run are the same sets."""
    gradtrace = pytest.importorskip("gradtrace")
    if not hasattr(gradtrace, "trace"):
        pytest.skip("live tracker not available")
    from gradtrace.masks.overlap import pair_overlap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)).to(torch.bfloat16)
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "init.safetensors"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tracer = gradtrace.trace(model, optimizer, tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        ids = torch.randint(0, 16, (4, 8), generator=g)  # half the embedding rows never used
        loss = torch.nn.functional.cross_entropy(model(ids).float().reshape(-1, 32), ids.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracer.finish()
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "final.safetensors"))
    diff_checkpoints(tmp_path / "init.safetensors", tmp_path / "final.safetensors", tolerances=["0", "1e-5"],
                     relative=["1e-3"], masks_out=tmp_path / "posthoc.safetensors")
    live = tmp_path / "run" / "masks.safetensors"
    for kind in ("update", "update_abs_1e-05", "update_rel_0.001"):
        g = pair_overlap(live, tmp_path / "posthoc.safetensors", kind=kind)["global"]
        assert g["jaccard"] == 1.0 and 0 < g["sparsity_1"] < 1, (kind, g)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_lora_live_masks_match_the_saved_adapters_diff(tmp_path, base_path, modules_to_save):
    """Also with ``modules_to_save``: PEFT trains a copy of the module (live name
    ``lm_head.modules_to_save.default.weight``) and saves it as ``lm_head.weight``."""
    from safetensors.torch import load_file

    from gradtrace.masks.diff import diff_checkpoints
    from gradtrace.masks.overlap import pair_overlap

    callback = GradTraceCallback(strict=True, wandb=False)
    peft_config = runs.default_lora_config()
    peft_config.modules_to_save = modules_to_save
    trainer = runs.build_trainer(base_path, tmp_path, callbacks=[callback], max_steps=3, logging_steps=1,
                                 learning_rate=1e-2, peft_config=peft_config, dtype=torch.float32,
                                 warmup_steps=2)
    trainer.model.save_pretrained(tmp_path / "adapter-start")
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter-end")
    live = load_masks(tmp_path / "gradtrace")
    saved = load_file(tmp_path / "adapter-end" / "adapter_model.safetensors")
    assert set(live["gradient"]) == set(saved)  # the names PEFT saves, no ".default."
    assert bool(modules_to_save) == any(name.endswith("lm_head.weight") for name in saved)
    diff_checkpoints(tmp_path / "adapter-start" / "adapter_model.safetensors",
                     tmp_path / "adapter-end" / "adapter_model.safetensors",
                     masks_out=tmp_path / "post-hoc.safetensors")
    result = pair_overlap(tmp_path / "gradtrace" / "masks.safetensors", tmp_path / "post-hoc.safetensors")
    assert result["global"]["overlap"] == 1.0 and result["global"]["overlap_2"] == 1.0
    assert all(g["lr"] == 1e-2 for g in live.info["optimizer"]["param_groups"])


@pytest.mark.slow
def test_cli_json_contract(pair):
    base, tuned, a, b = pair
    proc = subprocess.run([sys.executable, "-m", "gradtrace.cli", "diff", str(a), str(b),
                           "--tolerance", "0", "--tolerance", "1e-5", "--json"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert list(data["global"]) == ["0", "1e-5"]
    n = sum(base[k].numel() for k in SPEC)
    for label, tol in (("0", 0), ("1e-5", 1e-5)):
        unchanged = sum(int(reference_unchanged(base[k], tuned[k], tol=tol).sum()) for k in SPEC)
        assert data["global"][label] == pytest.approx(unchanged / n)


def test_cli_default_tolerances_csv_and_table(pair, capsys):
    base, tuned, a, b = pair
    assert cli_main(["diff", str(a), str(b), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {"sparsity@0", "sparsity@1e-5"} <= set(rows[0])
    scopes = {r["scope"] for r in rows}
    assert scopes == {"global", "layer", "kind", "tower", "matrix"}  # no "expert" rows: a dense model
    json_out = diff_checkpoints(a, b).to_dict()
    g = next(r for r in rows if r["scope"] == "global")
    assert float(g["sparsity@1e-5"]) == pytest.approx(json_out["global"]["1e-5"])
    assert cli_main(["diff", str(a), str(b), "--relative", "1e-3", "--per-matrix"]) == 0
    table = capsys.readouterr().out
    assert "bit-exact" in table and "rel≤1e-3" in table and "per layer" in table


def test_cli_rejects_bad_tolerance(pair, capsys):
    _, _, a, b = pair
    with pytest.raises(SystemExit):
        cli_main(["diff", str(a), str(b), "--tolerance", "-1"])
    with pytest.raises(SystemExit):
        cli_main(["diff", str(a), str(b), "--tolerance", "abc"])


def _expect_error(a, b, *fragments):
    with pytest.raises(CheckpointDiffError) as info:
        diff_checkpoints(a, b)
    for fragment in (str(a), str(b), *fragments):
        assert fragment in str(info.value)


def test_mismatched_shapes_dtypes_and_names_raise_clear_errors(tmp_path, pair, capsys):
    base, tuned, a, _ = pair
    name = "model.layers.0.mlp.down_proj.weight"
    for label, change in (("shape", lambda t: t[name][:, :-1].clone()),
                          ("dtype", lambda t: t[name].double())):
        other = dict(tuned)
        other[name] = change(other)
        path = tmp_path / f"{label}.safetensors"
        save_file(other, str(path))
        _expect_error(a, path, name, label)
    renamed = dict(tuned)
    renamed["model.layers.0.mlp.down_proj.renamed"] = renamed.pop(name)
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    _expect_error(a, path, name, "model.layers.0.mlp.down_proj.renamed")
    # --allow-missing skips them, with a note (never silently).
    result = diff_checkpoints(a, path, allow_missing=True)
    assert name not in result.per_tensor and any("only in" in n for n in result.notes)
    # The CLI reports the same error and exits 1.
    assert cli_main(["diff", str(a), str(path), "--json"]) == 1
    err = capsys.readouterr()
    assert name in err.err.replace("\n", "") and err.out == ""


def test_missing_and_non_safetensors_inputs(tmp_path, pair):
    _, _, a, _ = pair
    with pytest.raises(CheckpointDiffError, match="no such checkpoint"):
        diff_checkpoints(a, tmp_path / "nope")
    (tmp_path / "bin_ckpt").mkdir()
    (tmp_path / "bin_ckpt" / "pytorch_model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointDiffError, match=r"no \*\.safetensors"):
        diff_checkpoints(a, tmp_path / "bin_ckpt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!garbage!")
    with pytest.raises(CheckpointDiffError, match="bad.safetensors"):
        diff_checkpoints(a, bad)


_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    from gradtrace.masks.diff import diff_checkpoints

    def status_bytes(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    gc.collect()
    # The peak must be this process's own, from here on: ru_maxrss would carry the parent's peak across
    # fork/exec, and VmHWM the import's. Writing 5 to clear_refs resets VmHWM to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    before = status_bytes("VmRSS")
    result = diff_checkpoints(sys.argv[1], sys.argv[2], tolerances=["0", "1e-5"], relative=["1e-3"])
    peak = status_bytes("VmHWM")
    print(json.dumps({"growth": peak - before, "before": before, "peak": peak, "global": result.global_sparsity()}))
""")



@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS / VmHWM from Linux's /proc")
def test_peak_memory_is_one_tensor_pair_not_two_models(tmp_path):
    """Four 64 MB tensors per checkpoint: holding both models would need > 512 MB; streaming ~2 × 64 MB."""
    size = 16 * 1024 * 1024  # float32 elements: 64 MB
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(size // 4096, 4096) for i in range(4)}
    g = torch.Generator().manual_seed(0)
    for t in base.values():
        t.normal_(generator=g)
    save_file(base, str(tmp_path / "a.safetensors"))
    for t in base.values():
        t[::2] += 1.0  # half the rows change
    save_file(base, str(tmp_path / "b.safetensors"))
    del base
    # One intra-op thread: the memory bound does not depend on it, and on small sandboxes the
    # OpenMP wake-up per op dominates the run time.
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "a.safetensors"),
                           str(tmp_path / "b.safetensors")], capture_output=True, text=True,
                          env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["global"]["0"] == pytest.approx(0.5)
    tensor_bytes = 4 * size
    assert report["growth"] < 4 * tensor_bytes + 150 * 2**20, report
