"""Post-hoc ``gradtrace diff`` beside the paper's load-both-models-and-subtract, on a ~1 GB sharded checkpoint pair.

    python benchmarks/diff.py                              # ~1 GB bf16 pair (~500M params), ~1.5 min on 2 cores
    python benchmarks/diff.py --size-gb 0.05 --repeats 1   # quick look, ~15 s
    python benchmarks/diff.py --workdir /tmp/gt-diff       # keep the generated pair there, reuse it next time

What it does:

* **Synthetic pair.** A real Hugging Face checkpoint: ``LlamaForCausalLM`` (12 layers, vocab 32000, untied
  embeddings, hidden size chosen so the bf16 checkpoint is ``--size-gb``), built in bf16 from a fixed seed and
  written with ``save_pretrained(max_shard_size=...)`` as several shards + ``model.safetensors.index.json``.
  The *tuned* checkpoint is the same model with a seeded ``--fraction`` of elements (Bernoulli per element)
  moved away from zero by 1-8 bf16 ULPs, through the int16 view: every chosen element changes bitwise, so the
  bit-exact count is known exactly; how many of those moves are ≤ 1e-5 depends on the weight's magnitude (the
  generator counts them too). Only one model copy is ever in memory. The pair is cached in ``--workdir``.
* **Methods**, each run in its own fresh child process so that its peak RSS is its own: (a) the real CLI,
  ``gradtrace diff BASE TUNED --tolerance 0 --tolerance 1e-5 --json -o FILE``; (b) the approach of Mukherjee
  et al. (arXiv 2505.11711): ``AutoModelForCausalLM.from_pretrained`` both checkpoints whole in their stored
  dtype, then per parameter ``delta = p1 - p0`` and ``torch.isclose(delta, 0, atol=tol, rtol=0)`` counts (plus
  bitwise equality, which is what gradtrace's tolerance 0 means). Runs alternate A B A B (``--repeats``); wall
  time (interpreter start and imports included, for both) and ``ru_maxrss`` come from ``os.wait4`` in a tiny
  launcher process (forking from this script itself would count its pages in the child's peak).
* **Page cache.** Both checkpoints are read once, untimed, before the first run, so every run of both methods
  reads them from the OS page cache; the timings are compute + memory-copy, not disk.
* **Agreement.** Exact per-tensor unchanged counts at tolerance 0 and 1e-5 from gradtrace's JSON must equal the
  baseline's and the generator's; the script exits non-zero otherwise.
* **Memory target** "peak RSS ≤ 2× the largest tensor + a constant": the table gives peak − 2× largest tensor
  (the "constant") beside the RSS of a child that only imports what each method imports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=160)
TOLERANCES = ("0", "1e-5")
REPO = Path(__file__).resolve().parent.parent
GEN_VERSION = 1  # bump when the generator changes, so cached pairs are rebuilt


# ------------------------------------------------------------------------------------------ synthetic pair
def model_config(size_gb: float) -> Any:
    """Llama config whose bf16 checkpoint is ~size_gb: 12 layers of ~12 h² params plus two V×h embeddings."""
    from transformers import LlamaConfig

    vocab, layers, params = 32000, 12, size_gb * 1e9 / 2
    h = (-2 * vocab + math.sqrt(4 * vocab**2 + 4 * 12 * layers * params)) / (2 * 12 * layers)
    h = max(128, round(h / 64) * 64)  # 64-dim heads
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=round(8 * h / 3 / 64) * 64,
                       num_hidden_layers=layers, num_attention_heads=h // 64, num_key_value_heads=h // 64,
                       tie_word_embeddings=False, initializer_range=0.02)


def build_pair(work: Path, size_gb: float, fraction: float, seed: int, shard_mb: int | None) -> dict[str, Any]:
    """Write work/base and work/tuned (reused when work/pair.json says they were made with the same settings)."""
    key = {"version": GEN_VERSION, "size_gb": size_gb, "fraction": fraction, "seed": seed, "shard_mb": shard_mb}
    meta_file = work / "pair.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("key") == key:
        console.print(f"reusing the checkpoint pair in {work}")
        return json.loads(meta_file.read_text())
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    t0 = time.perf_counter()
    config = model_config(size_gb)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # init directly in bf16: ~7 s for 500M
    params = dict(model.named_parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in params.values())
    shard = shard_mb or max(1, round(total_bytes / 2**20 / 5))  # ~5 shards
    model.save_pretrained(work / "base", max_shard_size=shard * 2**20)
    tol = torch.tensor(float(TOLERANCES[1]), dtype=torch.bfloat16)  # the tolerance as the comparison rounds it
    truth: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(params.items()):
            gen = torch.Generator().manual_seed(seed * 100_003 + i + 1)
            bits = p.view(torch.int16).reshape(-1)  # in place on the model's storage
            idx = (torch.rand(bits.numel(), generator=gen) < fraction).nonzero().squeeze(1)
            old = bits[idx]
            # int16 + k moves a bf16 value away from zero by k ULPs for both signs (sign-magnitude layout)
            new = old + torch.randint(1, 9, (idx.numel(),), generator=gen, dtype=torch.int16)
            bits[idx] = new
            delta = (new.view(torch.bfloat16) - old.view(torch.bfloat16)).abs()
            truth[name] = {"numel": bits.numel(), "perturbed": idx.numel(),
                           "perturbed_above_tol": int((delta > tol).sum())}
    model.save_pretrained(work / "tuned", max_shard_size=shard * 2**20)
    del model, params
    largest = max(truth, key=lambda n: truth[n]["numel"])
    meta = {"key": key, "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size",
                                                                    "num_hidden_layers", "vocab_size")},
            "params": sum(t["numel"] for t in truth.values()), "bytes": total_bytes,
            "largest_tensor": {"name": largest, "numel": truth[largest]["numel"],
                               "mib": truth[largest]["numel"] * 2 / 2**20},
            "shard_mib": shard, "shards": len(list((work / "base").glob("*.safetensors"))),
            "perturbed": sum(t["perturbed"] for t in truth.values()),
            "perturbed_above_tol": sum(t["perturbed_above_tol"] for t in truth.values()),
            "truth": truth, "seconds": time.perf_counter() - t0}
    meta_file.write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------ child processes
def paper_baseline(base: str, tuned: str, out: str) -> None:
    """Mukherjee et al.: load both models whole, subtract, count isclose(delta, 0) per parameter."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(base) / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config["torch_dtype"])  # the stored dtype
    m0 = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    m1 = AutoModelForCausalLM.from_pretrained(tuned, dtype=dtype)
    tuned_params = dict(m1.named_parameters())
    int_view = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    counts: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for name, p0 in m0.named_parameters():
            p1 = tuned_params[name]
            delta = p1 - p0
            zero = torch.zeros_like(delta)
            row = {"numel": p0.numel(),
                   "bitwise": int((p0.view(int_view[p0.element_size()]) == p1.view(int_view[p0.element_size()])).sum())}
            for tol in TOLERANCES:
                row[f"isclose:{tol}"] = int(torch.isclose(delta, zero, rtol=0, atol=float(tol)).sum())
            counts[name] = row
    Path(out).write_text(json.dumps(counts))


# Runs argv[1:] and prints "wall_s maxrss_kib". A fork of a big parent (this script, holding a model and
# transformers) starts with the parent's pages counted in its RSS, and Linux carries that high-water mark
# through exec into ru_maxrss; forking from this tiny interpreter (python -S, ~10 MiB) keeps it out.
LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(2, 1)  # the child's stdout goes to the log, so this line is the only one on the pipe
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run cmd to completion; (wall seconds, peak RSS MiB of that child alone)."""
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], stdout=subprocess.PIPE, stderr=err,
                              text=True, cwd=REPO)
    wall, maxrss_kib, status = done.stdout.split()
    if done.returncode or int(status):
        sys.exit(f"{' '.join(cmd)} failed with status {status}:\n{log.read_text()[-3000:]}")
    return float(wall), int(maxrss_kib) / 1024  # ru_maxrss is in KiB on Linux


def warm_page_cache(*folders: Path) -> None:
    for folder in folders:
        for file in folder.iterdir():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


# ------------------------------------------------------------------------------------------ checks, report
def check_agreement(gt: dict[str, Any], baseline: dict[str, dict[str, int]], meta: dict[str, Any]) -> list[str]:
    """Exact per-tensor counts; returns the list of disagreements (empty = all agree)."""
    problems = []
    matrices = gt["per_matrix"]
    if set(matrices) != set(baseline) or set(baseline) != set(meta["truth"]):
        problems.append(f"tensor names differ: gradtrace {len(matrices)}, baseline {len(baseline)}, "
                        f"generator {len(meta['truth'])}")
    for name in sorted(set(matrices) & set(baseline) & set(meta["truth"])):
        n = matrices[name]["numel"]
        # the JSON holds count/n as a double; n < 2**53, so rounding recovers the count exactly
        got = {tol: round(matrices[name]["sparsity"][tol] * n) for tol in TOLERANCES}
        b, t = baseline[name], meta["truth"][name]
        expected = {"gradtrace@0 = baseline bitwise": (got["0"], b["bitwise"]),
                    "gradtrace@1e-5 = baseline isclose 1e-5": (got["1e-5"], b["isclose:1e-5"]),
                    "baseline isclose 0 = bitwise (no ±0/NaN here)": (b["isclose:0"], b["bitwise"]),
                    "gradtrace@0 = numel - perturbed": (got["0"], n - t["perturbed"]),
                    "gradtrace@1e-5 = numel - perturbed above 1e-5": (got["1e-5"], n - t["perturbed_above_tol"]),
                    "numel": (n, b["numel"])}
        problems += [f"{name}: {what}: {x} != {y}" for what, (x, y) in expected.items() if x != y]
    return problems


def machine_info() -> dict[str, Any]:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "python": platform.python_version(), "gradtrace_commit": git("rev-parse", "--short", "HEAD"),
            "gradtrace_tree_dirty": bool(git("status", "--porcelain", "gradtrace")),
            "gradtrace_dirty_files": (git("status", "--porcelain", "gradtrace") or "").splitlines(),
            "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "loadavg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_baseline"]:  # hidden: the baseline, run in a child process
        paper_baseline(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="bf16 checkpoint size (default 1.0)")
    parser.add_argument("--fraction", type=float, default=0.05, help="fraction of elements perturbed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=None, help="max shard size in MiB (default: ~5 shards)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, alternating A B A B")
    parser.add_argument("--workdir", default=None, help="where the pair is written and cached (default: a tempdir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (always kept with --workdir)")
    parser.add_argument("--out", default="benchmarks/results/diff-cpu.json", help="JSON results")
    args = parser.parse_args(argv)

    info = machine_info()
    console.print(f"[bold]gradtrace diff benchmark[/] - {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
                  f"({info['torch_threads']} threads), gradtrace {info['gradtrace_commit']}, "
                  f"load average {info['loadavg_at_start'][0]:.2f}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gradtrace-diff-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        meta = build_pair(work, args.size_gb, args.fraction, args.seed, args.shard_mb)
        big = meta["largest_tensor"]
        console.print(f"pair: {meta['params'] / 1e6:.0f}M params, {meta['bytes'] / 2**30:.2f} GiB bf16 per checkpoint in "
                      f"{meta['shards']} shards; hidden {meta['config']['hidden_size']}; largest tensor {big['name']} "
                      f"{big['mib']:.1f} MiB; {meta['perturbed']:,} elements perturbed "
                      f"({meta['perturbed'] / meta['params']:.2%}), {meta['perturbed_above_tol']:,} of them by > 1e-5; "
                      f"generated in {meta['seconds']:.0f} s")
        base, tuned, logs = work / "base", work / "tuned", work / "logs"
        logs.mkdir(exist_ok=True)
        warm_page_cache(base, tuned)  # untimed: every timed run reads from the page cache

        entry = Path(sys.executable).with_name("gradtrace")
        cli = [str(entry)] if entry.exists() else [sys.executable, "-m", "gradtrace.cli"]
        tol_args = [a for tol in TOLERANCES for a in ("--tolerance", tol)]
        methods = {
            "gradtrace diff": cli + ["diff", str(base), str(tuned), *tol_args, "--json", "-o", str(work / "gt.json")],
            "load both + subtract": [sys.executable, __file__, "_baseline", str(base), str(tuned),
                                     str(work / "baseline.json")],
        }
        # What each method imports before it reads anything: the floor under its peak RSS and wall time.
        floors = {"gradtrace diff": "import gradtrace.cli, gradtrace.cli.tools, gradtrace.cli.report",
                  "load both + subtract": "import torch; from transformers import AutoModelForCausalLM, "
                                          "LlamaForCausalLM"}
        raw: dict[str, dict[str, list[float]]] = {m: {"wall_s": [], "peak_rss_mib": []} for m in methods}
        for r in range(args.repeats):
            for method, cmd in methods.items():
                wall, rss = run_child(cmd, logs / f"{method.split()[0]}-{r}.log")
                raw[method]["wall_s"].append(wall)
                raw[method]["peak_rss_mib"].append(rss)
                console.print(f"  run {r + 1}/{args.repeats} {method}: {wall:.2f} s, {rss:.0f} MiB")
        floor = {m: run_child([sys.executable, "-c", code], logs / "imports.log") for m, code in floors.items()}

        gt, baseline = json.loads((work / "gt.json").read_text()), json.loads((work / "baseline.json").read_text())
        problems = check_agreement(gt, baseline, meta)

        summary: dict[str, dict[str, float]] = {}
        for method, runs in raw.items():
            summary[method] = {"median_wall_s": statistics.median(runs["wall_s"]),
                               "peak_rss_mib": max(runs["peak_rss_mib"]),
                               "imports_only_wall_s": floor[method][0], "imports_only_rss_mib": floor[method][1]}
        ref = summary["load both + subtract"]
        table = Table(title=f"gradtrace diff vs load-both-and-subtract, {meta['bytes'] / 2**30:.2f} GiB bf16 pair, "
                            f"median of {args.repeats} runs (warm page cache)", title_justify="left")
        for col in ("method", "wall s", "× baseline", "peak RSS MiB", "× baseline", "RSS − 2×largest",
                    "imports-only RSS", "imports-only s"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for method, s in summary.items():
            s["time_ratio"] = s["median_wall_s"] / ref["median_wall_s"]
            s["rss_ratio"] = s["peak_rss_mib"] / ref["peak_rss_mib"]
            s["rss_minus_2x_largest_mib"] = s["peak_rss_mib"] - 2 * big["mib"]
            table.add_row(method, f"{s['median_wall_s']:.2f}", f"{s['time_ratio']:.2f}", f"{s['peak_rss_mib']:.0f}",
                          f"{s['rss_ratio']:.2f}", f"{s['rss_minus_2x_largest_mib']:.0f}",
                          f"{s['imports_only_rss_mib']:.0f}", f"{s['imports_only_wall_s']:.2f}")
        console.print(table)
        g = summary["gradtrace diff"]
        targets = {"faster_than_baseline": g["median_wall_s"] < ref["median_wall_s"],
                   "constant_mib": g["rss_minus_2x_largest_mib"],
                   "constant_above_imports_mib": g["rss_minus_2x_largest_mib"] - g["imports_only_rss_mib"]}
        console.print(f"largest tensor {big['name']}: {big['mib']:.1f} MiB, so 2× = {2 * big['mib']:.0f} MiB. Target "
                      f"peak RSS ≤ 2× largest + constant: constant = {targets['constant_mib']:.0f} MiB, of which "
                      f"{g['imports_only_rss_mib']:.0f} MiB is the interpreter + imports "
                      f"({targets['constant_above_imports_mib']:+.0f} MiB beyond). Faster than baseline: "
                      f"{targets['faster_than_baseline']} ({g['time_ratio']:.2f}×).")
        sparsity = {tol: gt["global"][tol] for tol in TOLERANCES}
        console.print(f"unchanged fraction: bit-exact {sparsity['0']:.6%}, |Δ|≤1e-5 {sparsity['1e-5']:.6%}; "
                      + ("[green]exact per-tensor counts agree (gradtrace = baseline = generator)[/]" if not problems
                         else f"[bold red]{len(problems)} DISAGREEMENTS[/]"))
        for p in problems[:20]:
            console.print(f"  [red]{p}[/]")
        results = {"machine": info, "argv": argv, "pair": {k: v for k, v in meta.items() if k != "truth"},
                   "commands": {m: " ".join(c).replace(str(work), "$WORK") for m, c in methods.items()},
                   "imports_only_code": floors, "raw": raw, "summary": summary, "targets": targets,
                   "sparsity": sparsity, "agreement_problems": problems,
                   "notes": ["checkpoints are read from the OS page cache (one untimed warm-up read of both first)",
                             "wall time includes interpreter start and imports for both methods",
                             "peak RSS is ru_maxrss of each child (os.wait4); max over runs"]}
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        console.print(f"wrote {args.out}")
        return 1 if problems else 0
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(work, ignore_errors=True)
        elif not args.workdir:
            console.print(f"kept the checkpoint pair in {work}")


if __name__ == "__main__":
    raise SystemExit(main())
