"""Per-rank tracker memory and per-step tracker cost under DDP: 1 process, 2 processes with the tracking
split among the ranks (the default), and 2 processes each tracking everything (``split=False``).

    HF_HUB_OFFLINE=1 python benchmarks/distributed_memory.py                 # ~0.5B Qwen2 config, bf16
    HF_HUB_OFFLINE=1 python benchmarks/distributed_memory.py --layers 2      # quick look

A Qwen2.5-0.5B-shaped ``Qwen2Config`` (random weights, bf16, tied embeddings), real DDP on CPU (gloo),
plain SGD (no optimizer state, to leave memory to the measured parts), one thread per process. Each
step: forward/backward on a short batch, then ``observe_gradients`` and ``observe_update`` of the
tracker, timed directly (``time.perf_counter``, and ``time.thread_time`` for the CPU time a rank spends
in them, which leaves out waiting in a collective or for a core), then the optimizer step; the first step
is a warm-up. ``--four`` adds 4 processes, where a parameter larger than a rank's share (the tied
embedding, 28% of the model) is cut between the ranks.
At the end, one ``measure()`` (the logging step: under split tracking it holds the one all-reduce)
and one ``packed_masks()`` (the export: masks assembled across ranks). Memory is the tracker's own
``state_bytes()`` (device state and the reference copy), per rank; the table shows the largest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(out: str, layers: int, steps: int, split: bool) -> None:
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gradtrace import GradTracker, TrackerConfig

    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    numel = sum(p.numel() for p in model.parameters())
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    built = time.perf_counter()
    tracker = GradTracker(model, TrackerConfig(), split=None if split else False)
    build_s = time.perf_counter() - built
    generator = torch.Generator().manual_seed(0)
    tracker_s, tracker_cpu_s, step_s = [], [], []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (2, 16), generator=generator)[rank % 2:rank % 2 + 1]
        start = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        if distributed:  # the ranks enter the tracker together: its wall time then waits little on the other
            dist.barrier()
        begin, begin_cpu = time.perf_counter(), time.thread_time()
        tracker.observe_gradients()
        middle, middle_cpu = time.perf_counter(), time.thread_time()
        optimizer.step()
        after, after_cpu = time.perf_counter(), time.thread_time()
        tracker.observe_update()
        end, end_cpu = time.perf_counter(), time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        tracker_s.append((middle - begin) + (end - after))
        # CPU time of this thread (torch runs on it: one thread per process): the work a rank does, without
        # the time it waits in a collective or for a core the other process holds
        tracker_cpu_s.append((middle_cpu - begin_cpu) + (end_cpu - after_cpu))
        step_s.append(end - start)
    start = time.perf_counter()
    tracker.measure()
    measure_s = time.perf_counter() - start
    start = time.perf_counter()
    tracker.packed_masks()
    export_s = time.perf_counter() - start
    record = {"rank": rank, "world": world, "numel": numel, "tracked_numel": tracker.numel,
              "state_bytes": tracker.state_bytes(), "split": bool(tracker.spans), "build_s": build_s,
              "tracker_step_s": tracker_s[1:], "tracker_cpu_s": tracker_cpu_s[1:], "step_s": step_s[1:], "measure_s": measure_s, "export_s": export_s}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(label: str, processes: int, split: bool, args, root: Path) -> list[dict]:
    out = root / label
    out.mkdir()
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--layers", str(args.layers),
              "--steps", str(args.steps)] + ([] if split else ["--no-split"])
    command = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *script] if processes > 1
               else [sys.executable, *script])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{label} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: Qwen2.5-0.5B's 494M parameters)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, the first a warm-up")
    parser.add_argument("--worker")
    parser.add_argument("--no-split", action="store_true")
    parser.add_argument("--four", action="store_true", help="also 4 processes, split (about 10 GiB in all)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.layers, args.steps, split=not args.no_split)
        return
    with tempfile.TemporaryDirectory() as tmp:
        configs = [("1 process", 1, True), ("2 processes, split", 2, True), ("2 processes, split=False", 2, False)]
        configs += [("4 processes, split", 4, True)] if args.four else []
        runs = {label: run(label, processes, split, args, Path(tmp)) for label, processes, split in configs}
    single = runs["1 process"][0]
    print(f"model: Qwen2Config, {args.layers} layers, {single['numel'] / 1e6:.0f}M parameters, bf16; "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per process; "
          f"median of {args.steps - 1} steps")
    header = ("run", "tracked/rank", "state MiB/rank", "ref MiB/rank", "mem ratio", "tracker ms/step",
              "ratio", "tracker CPU ms/step", "ratio", "step s", "measure s", "export s")
    print(" | ".join(header))
    base_memory = sum(single["state_bytes"].values())
    base_time = median(single["tracker_step_s"])
    base_cpu = median(single["tracker_cpu_s"])
    for label, ranks in runs.items():
        worst = max(ranks, key=lambda r: sum(r["state_bytes"].values()))
        memory = sum(worst["state_bytes"].values())
        tracker_ms = max(median(r["tracker_step_s"]) for r in ranks)
        cpu_ms = max(median(r["tracker_cpu_s"]) for r in ranks)  # the busiest rank
        print(" | ".join([
            label, f"{worst['tracked_numel'] / 1e6:.0f}M", f"{worst['state_bytes']['device'] / 2**20:.1f}",
            f"{worst['state_bytes']['reference'] / 2**20:.0f}", f"{memory / base_memory:.2f}",
            f"{tracker_ms * 1e3:.0f}", f"{tracker_ms / base_time:.2f}",
            f"{cpu_ms * 1e3:.0f}", f"{cpu_ms / base_cpu:.2f}",
            f"{max(median(r['step_s']) for r in ranks):.2f}", f"{max(r['measure_s'] for r in ranks):.2f}",
            f"{max(r['export_s'] for r in ranks):.2f}"]))


if __name__ == "__main__":
    main()
