"""The weight-sync budget: what the per-step detector costs, and the demo GRPO run's table.

    python benchmarks/sync_budget.py cost [--json cost.json]    # the ~52M model's shapes, CPU
    python benchmarks/sync_budget.py grpo [--json grpo.json]    # the demo's GRPO run (README table)

``cost``: the median milliseconds of :meth:`gradtrace.sync.SyncObserver.observe` (cast to the sync dtype,
copy to the host, bitwise compare with the previous values, the patch's indices and values) after a
synthetic step (every weight multiplied by ``1 + 1e-3·N(0,1)``, not timed), of ``summary()`` (the counts
grouped, and every encoding's bytes measured; logging steps only), and of the read floor: reading every
weight once (a NumPy max over its bits, the cheapest full read). Target: observe <= 2 x the read floor.
Host memory: ``host_bytes`` (the previous values in the sync dtype).

``grpo``: the demo's base policy (150 SFT steps) then 30 TRL GRPO steps at lr 1e-5 (as ``gradtrace demo``),
bf16 weights synced as stored and, as a contrast, fp32 weights synced as their bf16 cast, with
``sync_every=4``: per step and per window, the changed fraction and the patch bytes in every encoding,
against a full dense sync.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from gradtrace.sync import ENCODINGS, SyncObserver

MID_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)


def read_floor(params: list[torch.Tensor]) -> None:
    for p in params:
        flat = p.detach().reshape(-1)
        flat.view({2: torch.int16, 4: torch.int32}[flat.element_size()]).numpy().max()


def cost(repeats: int) -> dict:
    torch.set_num_threads(1)
    results = {}
    for weights, sync in ((torch.float32, "bfloat16"), (torch.bfloat16, "storage")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MID_MODEL)).to(weights)
        named = [(n, p) for n, p in model.named_parameters()]
        params = [p for _, p in named]
        observer = SyncObserver(named, sync)
        observe, summarize, floor, fractions = [], [], [], []
        for _ in range(repeats):
            with torch.no_grad():
                for p in params:
                    p.mul_(1 + 1e-3 * torch.randn_like(p))
            start = time.perf_counter()
            read_floor(params)
            floor.append(time.perf_counter() - start)
            start = time.perf_counter()
            observer.observe()
            observe.append(time.perf_counter() - start)
            start = time.perf_counter()
            section = observer.summary()
            summarize.append(time.perf_counter() - start)
            fractions.append(section["global"]["step_changed"])
        numel = sum(p.numel() for p in params)
        row = {"weights": str(weights).removeprefix("torch."), "sync_dtype": sync, "parameters": numel,
               "observe_ms": 1000 * statistics.median(observe), "summary_ms": 1000 * statistics.median(summarize),
               "read_floor_ms": 1000 * statistics.median(floor), "host_bytes": observer.host_bytes,
               "step_changed_median": statistics.median(fractions)}
        row["observe_over_floor"] = row["observe_ms"] / row["read_floor_ms"]
        results[f"{row['weights']}->{sync}"] = row
        print(json.dumps(row), flush=True)
    return results


class SyncRecorder(TrainerCallback):
    """After gradtrace's callback: each logging step's ``sync`` section (logging_steps=1: every step)."""

    def __init__(self, gradtrace_callback):
        self.gradtrace, self.sections = gradtrace_callback, []

    def on_step_end(self, args, state, control, **kwargs):
        summary = self.gradtrace.summary
        if summary and summary["step"] == state.global_step and "sync" in summary:
            self.sections.append(summary["sync"])


def grpo(every: int, steps: int, base_steps: int, learning_rate: float) -> dict:
    from gradtrace import GradTraceCallback
    from gradtrace.demo import runs
    from gradtrace.demo.pipeline import _quiet_libraries

    _quiet_libraries()
    out = Path(tempfile.mkdtemp(prefix="sync-budget-"))
    base = runs.make_base_policy(out, steps=base_steps, seed=0, dtype=torch.float32, quiet=True)
    results = {}
    for weights, sync in ((torch.bfloat16, "storage"), (torch.float32, "bfloat16")):
        callback = GradTraceCallback(output_dir=out / f"run-{sync}" / "gradtrace", wandb=False, sync_dtype=sync,
                                     sync_every=every, log_every=1)
        recorder = SyncRecorder(callback)
        started = time.perf_counter()
        runs.run_grpo(base, out / f"run-{sync}", callbacks=[callback, recorder], learning_rate=learning_rate,
                      max_steps=steps, dtype=weights, seed=0, quiet=True)
        sections = recorder.sections
        windows = [s for s in sections if s["step"] == s["window_end_step"]]
        dense = sections[0]["step_bytes"]["dense"]

        def mean(values):
            return statistics.fmean(values)

        row = {
            "weights": str(weights).removeprefix("torch."), "sync_dtype": sections[0]["dtype"],
            "steps": len(sections), "sync_every": every, "parameters": sections[0]["global"]["numel"],
            "step_changed_mean": mean([s["global"]["step_changed"] for s in sections]),
            "step_changed_min": min(s["global"]["step_changed"] for s in sections),
            "step_changed_max": max(s["global"]["step_changed"] for s in sections),
            "window_changed_mean": mean([s["global"]["window_changed"] for s in windows]),
            "step_bytes_mean": {e: mean([s["step_bytes"][e] for s in sections]) for e in ENCODINGS},
            "window_bytes_mean": {e: mean([s["window_bytes"][e] for s in windows]) for e in ENCODINGS},
            "step_best": statistics.mode([s["step_best_encoding"] for s in sections]),
            "window_best": statistics.mode([s["window_best_encoding"] for s in windows]),
            "dense_bytes": dense,
            "per_kind_step_changed_last": {k: v["step_changed"] for k, v in sections[-1]["per_kind"].items()},
            "cumulative_update_sparsity_last": callback.summary["global"]["update_sparsity"],
            "seconds": time.perf_counter() - started,
        }
        results[f"{row['weights']}->{row['sync_dtype']}"] = row
        print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["cost", "grpo"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args()
    print(f"gradtrace from {sys.modules['gradtrace'].__file__ if 'gradtrace' in sys.modules else '?'}")
    if args.part == "cost":
        results = cost(args.repeats)
    else:
        results = grpo(args.every, args.steps, args.base_steps, args.learning_rate)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
