"""Where gradtrace's per-step time goes, event by event, in a real Trainer — and against another commit.

    python benchmarks/step_events.py                        # this checkout: untraced vs traced, per event
    python benchmarks/step_events.py --against /tmp/old     # alternate with another checkout's gradtrace
    python benchmarks/step_events.py --mode off             # masks only (cancellation="off")

The model is the per-step check of the performance issue: a ~6.8M-parameter Llama config in float32
(vocab 4096, hidden 256, 6 layers, untied head), 8 sequences of 60 tokens per optimizer step (480 tokens),
AdamW, one torch thread, no logging inside the timed steps. Every run starts from the same weights.

For each source (this checkout, and ``--against DIR`` if given) and each round, a fresh process trains
``--steps`` optimizer steps untraced and then traced, and records, per step: the wall time of the step
(``on_step_begin`` to ``on_step_end`` of a callback registered last) and the thread CPU time spent inside
each of gradtrace's callback events, and inside the session / tracker calls the events make
(``check_parameters``, ``note_learning_rates``, ``observe_gradients``, ``observe_update``) where the source
has them. Sources alternate round by round (A B A B ...) so drift on a shared machine hits both.
It prints medians per event in ms and the in-event ratio: 1 + (time inside gradtrace) / (untraced step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVENTS = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")
CALLS = (("session", "check_parameters"), ("session", "note_learning_rates"), ("tracker", "observe_gradients"),
         ("tracker", "observe_update"))


def worker(steps: int, warmup: int, mode: str) -> dict:
    """Run in a child process whose ``sys.path`` starts with the source under test."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import gradtrace
    from gradtrace import GradTraceCallback

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    initial = LlamaForCausalLM(config).state_dict()
    total = warmup + steps
    tokens = torch.randint(0, 4096, (total * 8, 60), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    def run(traced: bool) -> dict:
        model = LlamaForCausalLM(config)
        model.load_state_dict(initial)
        clock = StepClock()
        spent: dict[str, list[float]] = {}
        callbacks = []
        if traced:
            callback = GradTraceCallback(wandb=False, cancellation=mode, log_every=10**9)

            def timed(owner, name, key):
                inner = getattr(owner, name)

                def wrapper(*a, **k):
                    t = time.thread_time()
                    try:
                        return inner(*a, **k)
                    finally:
                        spent.setdefault(key, []).append(time.thread_time() - t)
                setattr(owner, name, wrapper)

            for event in EVENTS:
                if hasattr(callback, event):
                    timed(callback, event, f"event {event}")
            begin = callback.on_train_begin

            def on_train_begin(*a, **k):  # wrap the session's and tracker's calls once they exist
                out = begin(*a, **k)
                session = callback.session
                for owner_name, name in CALLS:
                    owner = session if owner_name == "session" else session.tracker
                    if hasattr(owner, name):
                        timed(owner, name, f"call {name}")
                return out
            callback.on_train_begin = on_train_begin
            callbacks.append(callback)
        callbacks.append(clock)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, max_steps=total, per_device_train_batch_size=8,
                                     learning_rate=1e-4, logging_steps=10**9, save_strategy="no", report_to=[],
                                     use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
            trainer.train()
        keep = slice(warmup, total)
        return {"step": clock.times[keep], **{k: v[keep] for k, v in spent.items() if len(v) >= total}}

    return {"gradtrace": gradtrace.__file__, "untraced": run(False), "traced": run(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default=None, help="another checkout (its root) to alternate with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mode", default="sampled", choices=("off", "sampled", "full"))
    parser.add_argument("--out", default=None, help="JSON with every step's times")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.warmup, args.mode)))
        return
    sources = {"this checkout": HERE.parent}
    if args.against:
        sources[f"against {args.against}"] = Path(args.against).resolve()
    results: dict[str, list[dict]] = {name: [] for name in sources}
    for round_ in range(args.rounds):
        order = list(sources.items())
        if round_ % 2:
            order.reverse()
        for name, root in order:
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--mode", args.mode], env=env, capture_output=True, text=True,
                                  check=True, cwd=root)
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    for name, rounds in results.items():
        untraced = [t for r in rounds for t in r["untraced"]["step"]]
        traced = [t for r in rounds for t in r["traced"]["step"]]
        keys = sorted({k for r in rounds for k in r["traced"] if k != "step"})
        print(f"\n{name} ({rounds[0]['gradtrace']}), mode {args.mode!r}, {len(rounds)} rounds x {args.steps} steps")
        print(f"  untraced step {ms(untraced):8.2f} ms   traced step {ms(traced):8.2f} ms   "
              f"end to end {statistics.median(traced) / statistics.median(untraced):.3f}x")
        inside = [sum(r["traced"][k][i] for k in keys if k.startswith("event "))
                  for r in rounds for i in range(len(r["traced"]["step"]))]
        for key in keys:
            values = [t for r in rounds for t in r["traced"][key]]
            print(f"  {key:36s} {ms(values):8.3f} ms")
        print(f"  in gradtrace's events               {ms(inside):8.3f} ms   in-event ratio "
              f"{1 + statistics.median(inside) / statistics.median(untraced):.4f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
