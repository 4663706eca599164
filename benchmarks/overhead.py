"""Per-step overhead of gradtrace in real training, side by side with no instrumentation and wandb.watch.

    python benchmarks/overhead.py                 # full run: tiny + ~52M-parameter model, 15-20 min on 2 cores
    python benchmarks/overhead.py --quick         # tiny model only, a few rounds, ~2 min on 2 cores
    python benchmarks/overhead.py --out benchmarks/results/overhead-cpu.json
    # on a GPU: a ~0.5B-parameter model (Qwen2-0.5B's shapes), a few variants, short
    python benchmarks/overhead.py --device cuda --model large --variants "gradtrace off,gradtrace sampled" --no-profile

What it does, in one process:

* **Step time.** For each setting (model x weight dtype x gradient accumulation, plus one TRL GRPO run) it
  trains the same model on the same data for a few optimizer steps once per *variant*, and repeats that in
  several rounds, rotating the order (A B C.., B C.. A, ...) so drift and position effects cancel. Every run
  starts from a copy of the same initial weights with a fresh optimizer; a callback registered last records
  ``time.perf_counter()`` (and process CPU time) at ``on_step_begin`` / ``on_step_end``. The first
  ``--warmup`` steps of every run and the single logging step (``logging_steps`` = the run's last step) are
  left out of the per-step statistics; the logging step is reported on its own.
* **Variants.** ``none`` (no instrumentation); gradtrace ``GradTraceCallback(wandb=False)`` with
  ``cancellation="off"`` (masks only), ``"sampled"`` (the default), ``"full"``, and ``"sampled"`` +
  ``ever_changed=True``; ``wandb.watch(model, log="gradients", log_freq=1)`` and ``log_freq=100`` in an
  offline W&B run opened for that run only; and ``read floor``, a callback that only reads every gradient
  once per step (a max-reduction): the least any tool that looks at every gradient element can cost here.
* **Gradient accumulation.** ``ga4`` settings split the same tokens per optimizer step into 4 micro-batches
  (micro-batch = batch / 4), so ``ga1`` and ``ga4`` step times are comparable: gradtrace runs once per
  optimizer step, ``wandb.watch`` hooks once per micro-batch backward.
* **Logging step.** ``tracker.measure()`` and ``summarize()`` timed directly per model, dtype and mode.
* **Memory.** Bytes of tracker state per tracked parameter (``GradTracker.state_bytes()``) and the RSS growth
  when the tracker is constructed, beside the 2 bits/param floor of two 1-bit masks; also the transient RSS
  peak of one ``observe_gradients()`` call.
* **Profile** (full run, or ``--profile``): ``torch.profiler`` per-op breakdown of ``observe_gradients()`` on
  the ~52M model.

Results: rich tables on stdout and one JSON file (machine info included). Set ``HF_HUB_OFFLINE=1`` and
``WANDB_MODE=offline``; nothing is downloaded. Timings on a shared or busy machine are noisy: the JSON keeps
every raw step time and the load average around every run, and the tables show the spread (IQR).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import gradtrace  # noqa: E402
from gradtrace import GradTraceCallback  # noqa: E402

console = Console(width=160)

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},  # no instrumentation
    "gradtrace off": {"gradtrace": {"cancellation": "off"}},  # masks only
    "gradtrace sampled": {"gradtrace": {"cancellation": "sampled"}},  # the default
    "gradtrace full": {"gradtrace": {"cancellation": "full"}},
    "gradtrace ever_changed": {"gradtrace": {"cancellation": "sampled", "ever_changed": True}},
    "wandb.watch freq=1": {"wandb_log_freq": 1},  # wandb.watch(model, log="gradients", log_freq=1)
    "wandb.watch freq=100": {"wandb_log_freq": 100},
    "read floor": {"read_floor": True},  # reads every gradient once, does nothing else: the floor for any scan
}
TRACKER_MODES: dict[str, dict[str, Any]] = {
    "off (masks only)": {"cancellation": "off"},
    "sampled (default)": {"cancellation": "sampled"},
    "full": {"cancellation": "full"},
    "sampled + ever_changed": {"cancellation": "sampled", "ever_changed": True},
}
TARGETS = {  # variant -> maximum ratio to the uninstrumented step
    "gradtrace off": 1.02,
    "gradtrace sampled": 1.05,
    "gradtrace full": 1.05,
}
WATCH1 = "wandb.watch freq=1"

# ~52M parameters: 32000 x 512 embedding + untied lm_head (32.8M) + 6 Llama layers of 3.2M.
MID_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                 tie_word_embeddings=False)
# ~0.5B parameters: Qwen2-0.5B's shapes (494M, tied embeddings), built from the config (nothing downloaded)
LARGE_MODEL = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                   tie_word_embeddings=True)
MODEL_KINDS = ("tiny", "mid", "large")


@dataclass
class Setting:
    name: str
    model: str  # "tiny", "mid" or "large"
    trainer: str  # "trainer" or "grpo"
    dtype: str  # "float32" or "bfloat16": the weights' dtype (no autocast)
    ga: int  # gradient accumulation steps; micro-batch = batch // ga
    batch: int  # sequences per optimizer step
    seq: int  # tokens per sequence (mid model; the tiny model's sequences are its short task strings)
    steps: int  # measured steps per run
    warmup: int  # steps discarded at the start of every run
    rounds: int


# ----------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    import transformers
    import trl
    import wandb

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores_available": cores,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "wandb": wandb.__version__,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_at_start": os.getloadavg(),
        "gradtrace_file": gradtrace.__file__,  # the package actually imported (PYTHONPATH can swap it)
        "gradtrace_commit": _git("rev-parse", "HEAD"),
        "gradtrace_tree_dirty": None if _git("rev-parse", "HEAD") is None else bool(_git("status", "--porcelain", ".")),
    }


def _git(*args: str) -> str | None:
    """Git, run in the imported gradtrace package's folder (None when it is not in a repository)."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=Path(gradtrace.__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (psutil elsewhere)."""
    rss = _proc_status_bytes("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int | None:
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ models, data
class Workload:
    """One model's pristine initial weights, its tokenizer/collator and a deterministic data set."""

    def __init__(self, kind: str, dtype: torch.dtype, workdir: Path):
        from datasets import Dataset

        from gradtrace.demo.runs import CausalLMCollator
        from gradtrace.demo.tiny import build_model, build_tokenizer, save_base, text_dataset

        self.kind = kind
        self.dtype = dtype
        if kind == "tiny":
            tokenizer = build_tokenizer()
            self.model = build_model(tokenizer, dtype=dtype, seed=0)  # the demo's 0.6M Qwen2-config model
            data = text_dataset("add", n=4096, seed=0, eos_token=tokenizer.eos_token)
            self.dataset = data.map(lambda ex: {"input_ids": tokenizer(ex["text"])["input_ids"]},
                                    remove_columns=["text"])
            self.collator = CausalLMCollator(tokenizer.pad_token_id)
            self.base_path = save_base(copy.deepcopy(self.model), tokenizer, workdir / f"tiny-{dtype}")
        elif kind in ("mid", "large"):
            from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                if kind == "mid":
                    self.model = LlamaForCausalLM(LlamaConfig(**MID_MODEL)).to(dtype)
                else:
                    self.model = Qwen2ForCausalLM(Qwen2Config(**LARGE_MODEL)).to(dtype)
            vocab = (MID_MODEL if kind == "mid" else LARGE_MODEL)["vocab_size"]
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (4096, 64), generator=generator)
            self.dataset = Dataset.from_dict({"input_ids": ids.tolist()})
            self.collator = CausalLMCollator(pad_token_id=0)
            self.base_path = None
        else:
            raise ValueError(kind)
        self.model.requires_grad_(True)
        self.numel = sum(p.numel() for p in self.model.parameters())

    def fresh_model(self):
        return copy.deepcopy(self.model)


# Where the Trainer runs: None = CUDA when available (the default), else "cpu" or "cuda" (``--device``).
DEVICE: str | None = None


def use_cpu() -> bool:
    return DEVICE == "cpu" or (DEVICE is None and not torch.cuda.is_available())


def training_args(output_dir: str, *, max_steps: int, micro_batch: int, ga: int, logging_steps: int) -> dict:
    """Shared arguments (as ``gradtrace.demo.runs``): constant lr, no mixed precision, no checkpoints."""
    return dict(
        output_dir=output_dir, learning_rate=1e-4, max_steps=max_steps, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=ga, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, seed=0, data_seed=0, logging_strategy="steps", logging_steps=logging_steps,
        report_to="none", save_strategy="no", use_cpu=use_cpu(), bf16=False, fp16=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )


# ---------------------------------------------------------------------------------------------- timing
class TimedGradTraceCallback(GradTraceCallback):
    """``GradTraceCallback`` that also adds up the wall time spent inside its per-step events."""

    seconds = 0.0
    by_event: dict[str, float] = {}

    def take_seconds(self) -> float:
        spent, self.seconds = self.seconds, 0.0
        return spent

    def take_events(self) -> dict[str, float]:
        """Seconds inside each event since the last call (the per-event breakdown of ``take_seconds``)."""
        spent, self.by_event = self.by_event, {}
        return spent

    def on_train_end(self, args, state, control, **kwargs):
        # The final export (masks.safetensors + summary.json) is in no step; skipping it saves ~2-4 s of
        # benchmark time per run on the ~52M model and changes no measured number.
        return control


def _timed(event: str):
    inner = getattr(GradTraceCallback, event)

    def wrapper(self, args, state, control, **kwargs):
        start = time.perf_counter()
        try:
            return inner(self, args, state, control, **kwargs)
        finally:
            spent = time.perf_counter() - start
            self.seconds += spent
            self.by_event = {**self.by_event, event: self.by_event.get(event, 0.0) + spent}

    return wrapper


# every event that fires inside a training step (on_log runs after on_step_end, outside the timed window)
TIMED_EVENTS = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")
for _event in TIMED_EVENTS:
    setattr(TimedGradTraceCallback, _event, _timed(_event))


class GradientReadFloor(TrainerCallback):
    """Reads every gradient once per optimizer step (a max-reduction, the cheapest full read) and does nothing
    else: what any instrument that looks at every gradient element must at least cost on this machine."""

    seconds = 0.0

    def take_seconds(self) -> float:
        spent, self.seconds = self.seconds, 0.0
        return spent

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        start = time.perf_counter()
        for p in model.parameters():
            if p.grad is None:
                continue
            grad = p.grad.detach().reshape(-1)
            if grad.device.type == "cpu" and grad.element_size() in (2, 4):  # NumPy, as gradtrace's CPU path
                grad.view({2: torch.int16, 4: torch.int32}[grad.element_size()]).numpy().max()
            else:
                grad.amax()
        self.seconds += time.perf_counter() - start


class StepTimer(TrainerCallback):
    """Registered last: times each optimizer step, from ``on_step_begin`` to ``on_step_end``.

    ``on_step_end`` of the callbacks before it (gradtrace's logging included) falls inside the window; the
    Trainer's own log/save (``_maybe_log_save_evaluate``) and fetching the step's batches fall outside.
    """

    def __init__(self, traced: TimedGradTraceCallback | GradientReadFloor | None = None):
        self.steps: list[dict[str, Any]] = []
        self.traced = traced
        self._start: tuple[float, float] = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = self._start
        self.steps.append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                           "log": bool(control.should_log), "step": state.global_step,
                           "in_gradtrace": self.traced.take_seconds() if self.traced is not None else None,
                           "in_events": (self.traced.take_events() if isinstance(self.traced, TimedGradTraceCallback)
                                         else None)})


def run_once(setting: Setting, work: Workload, variant: str, tmp: Path) -> dict[str, Any]:
    """Train ``warmup + steps + 1`` optimizer steps under one variant; return the per-step times."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    spec = VARIANTS[variant]
    total = setting.warmup + setting.steps + 1  # the last step is the (only) logging step
    out = tempfile.mkdtemp(dir=tmp, prefix="run-")
    callbacks: list[Any] = []
    gradtrace_cb = None
    if "gradtrace" in spec:
        gradtrace_cb = TimedGradTraceCallback(wandb=False, strict=True, **spec["gradtrace"])
        callbacks.append(gradtrace_cb)
    elif "read_floor" in spec:
        gradtrace_cb = GradientReadFloor()  # timed like gradtrace: its "in gt ms" is the floor's own time
        callbacks.append(gradtrace_cb)
    timer = StepTimer(gradtrace_cb)
    callbacks.append(timer)  # last: its on_step_end runs after gradtrace's
    if setting.trainer == "grpo":
        from gradtrace.demo.runs import build_grpo

        trainer = build_grpo(work.base_path, out, callbacks=callbacks, max_steps=total, logging_steps=total,
                             dtype=work.dtype, per_device_train_batch_size=setting.batch // setting.ga,
                             gradient_accumulation_steps=setting.ga, quiet=True, seed=0)
    else:
        args = TrainingArguments(**training_args(out, max_steps=total, micro_batch=setting.batch // setting.ga,
                                                 ga=setting.ga, logging_steps=total))
        trainer = Trainer(model=work.fresh_model(), args=args, train_dataset=work.dataset,
                          data_collator=work.collator, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
    run = None
    if "wandb_log_freq" in spec:
        import wandb

        run = wandb.init(mode="offline", dir=out, project="gradtrace-overhead", name=f"{setting.name}-{variant}",
                         settings=wandb.Settings(silent=True))
        wandb.watch(trainer.model, log="gradients", log_freq=spec["wandb_log_freq"])
    load_before = os.getloadavg()[0]
    try:
        trainer.train()
    finally:
        if run is not None:
            import wandb

            wandb.unwatch(trainer.model)
            wandb.finish()
    steps = timer.steps
    if len(steps) != total:
        raise RuntimeError(f"{setting.name}/{variant}: timed {len(steps)} steps, expected {total}")
    measured = [s for s in steps[setting.warmup:] if not s["log"]]
    logging = [s for s in steps if s["log"]]
    def us(values: list[float]) -> list[float]:
        return [round(v, 6) for v in values]

    result = {
        "wall": us([s["wall"] for s in measured]),
        "cpu": us([s["cpu"] for s in measured]),
        "in_gradtrace": us([s["in_gradtrace"] for s in measured]) if gradtrace_cb is not None else None,
        # per event: seconds of each measured step spent inside it (the events a step did not enter: 0)
        "in_events": ({event: us([s["in_events"].get(event, 0.0) for s in measured]) for event in TIMED_EVENTS}
                      if measured and measured[0]["in_events"] is not None else None),
        "warmup_wall": us([s["wall"] for s in steps[:setting.warmup]]),
        "logging_step_wall": us([s["wall"] for s in logging]),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
    }
    del trainer, gradtrace_cb, callbacks
    gc.collect()
    return result


def quantiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"median": values[0], "q25": values[0], "q75": values[0]}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2]}


def bench_setting(setting: Setting, work: Workload, tmp: Path) -> dict[str, Any]:
    names = list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for r in range(setting.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: every variant visits every slot
        for variant in order:
            runs[variant].append(run_once(setting, work, variant, tmp))
        console.print(f"  [dim]{setting.name}: round {r + 1}/{setting.rounds} done "
                      f"(load {os.getloadavg()[0]:.1f})[/dim]")
    base_wall = [t for run in runs["none"] for t in run["wall"]]
    base_cpu = [t for run in runs["none"] for t in run["cpu"]]
    base = statistics.median(base_wall)
    variants: dict[str, Any] = {}
    for variant in names:
        wall = [t for run in runs[variant] for t in run["wall"]]
        cpu = [t for run in runs[variant] for t in run["cpu"]]
        # paired within a round: this variant's median over the baseline's median in the same round
        per_round = [statistics.median(a["wall"]) / statistics.median(b["wall"])
                     for a, b in zip(runs[variant], runs["none"], strict=True)]
        logging = [t for run in runs[variant] for t in run["logging_step_wall"]]
        inside = [t for run in runs[variant] for t in (run["in_gradtrace"] or [])]
        stats = quantiles(wall)
        variants[variant] = {
            "step_wall_s": stats,
            "step_cpu_s": quantiles(cpu),
            "ratio": stats["median"] / base,
            "ratio_cpu": statistics.median(cpu) / statistics.median(base_cpu),
            "ratio_per_round": per_round,
            "overhead_ms": (stats["median"] - base) * 1e3,
            # time inside gradtrace's own callback events per (non-logging) step: a direct, low-noise
            # measure of its cost, and the ratio it implies against the uninstrumented median step
            "in_gradtrace_ms": quantiles(inside) if inside else None,
            "ratio_from_in_gradtrace": 1 + statistics.median(inside) / base if inside else None,
            "in_events_ms": _event_medians(runs[variant]),
            "logging_step_wall_s": statistics.median(logging) if logging else None,
            "n_steps": len(wall),
            "runs": runs[variant],
        }
    return {"setting": asdict(setting), "numel": work.numel, "variants": variants}


def _event_medians(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Median ms per step inside each of gradtrace's events, over every measured step of the runs."""
    if not runs or runs[0].get("in_events") is None:
        return None
    return {event: statistics.median([t for run in runs for t in run["in_events"][event]]) * 1e3
            for event in TIMED_EVENTS}


LEGEND = """Columns: step ms = median wall time of an optimizer step (warm-up and logging steps excluded); IQR = its
25th-75th percentiles; ratio = median / median of 'none'; per round = that ratio within each round (min-max);
+ms = median minus the median of 'none'; in gt ms = median time spent inside gradtrace's callback events per step
(observe_gradients, observe_update, the log check); 1+in/none = the ratio that time alone implies; log step ms =
the step that also logs (gradtrace's measure() + summary + run log); targets: off <= 1.02x, sums <= 1.05x, every
gradtrace mode cheaper than wandb.watch(log="gradients", log_freq=1)."""


def print_setting(result: dict[str, Any]) -> None:
    s = result["setting"]
    title = (f"{s['name']}: {'TRL GRPO' if s['trainer'] == 'grpo' else 'Trainer'}, {result['numel'] / 1e6:.1f}M "
             f"params, {s['dtype']} weights, grad accum {s['ga']}, {s['rounds']} rounds x {s['steps']} steps")
    table = Table(title=title, title_justify="left")
    for col in ("variant", "step ms", "IQR ms", "ratio", "per round", "+ms", "in gt ms", "1+in/none",
                "log step ms", "targets"):
        table.add_column(col, justify="left" if col in ("variant", "targets") else "right")
    v = result["variants"]
    watch1 = v[WATCH1]["ratio"] if WATCH1 in v else None  # --variants may leave it out
    for name, row in v.items():
        st = row["step_wall_s"]
        target = ""
        if name in TARGETS:
            ok = row["ratio"] <= TARGETS[name]
            target = f"{'[green]ok' if ok else '[red]MISS'}[/] <={TARGETS[name]:.2f}"
        if name.startswith("gradtrace") and watch1 is not None:
            cheaper = row["ratio"] < watch1
            target += (", " if target else "") + ("[green]<[/] watch1" if cheaper else "[red]>=[/] watch1")
        log = row["logging_step_wall_s"]
        inside = row["in_gradtrace_ms"]
        table.add_row(
            name, f"{st['median'] * 1e3:.1f}", f"{st['q25'] * 1e3:.1f}-{st['q75'] * 1e3:.1f}", f"{row['ratio']:.3f}",
            f"{min(row['ratio_per_round']):.2f}-{max(row['ratio_per_round']):.2f}", f"{row['overhead_ms']:+.1f}", "" if inside is None else f"{inside['median'] * 1e3:.1f}",
            "" if inside is None else f"{row['ratio_from_in_gradtrace']:.3f}",
            "" if log is None else f"{log * 1e3:.0f}", target,
        )
    console.print(table)
    events = Table(title="inside gradtrace, per event: median ms per (non-logging) step", title_justify="left")
    events.add_column("variant")
    for event in TIMED_EVENTS:
        events.add_column(event.removeprefix("on_"), justify="right")
    for name, row in v.items():
        if row.get("in_events_ms"):
            events.add_row(name, *(f"{row['in_events_ms'][event]:.3f}" for event in TIMED_EVENTS))
    if events.row_count:
        console.print(events)


# ------------------------------------------------------------------------------------- memory, logging
def synchronize(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_model_device(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def measure_memory_and_logging(work: Workload, repeats: int, *, rss: bool = False) -> list[dict[str, Any]]:
    """Per tracker mode: state bytes per param, the logging-step cost and (``rss``) the RSS growth.

    RSS is only meaningful in a fresh process whose allocator hands large blocks back to the OS on free
    (see :func:`memory_probe`); in the benchmark process earlier runs' freed memory is simply reused.
    """
    from gradtrace import GradTracker, TrackerConfig
    from gradtrace.tracking.summary import summarize

    model = work.model
    batch = on_model_device(model, work.collator([work.dataset[i] for i in range(8)]))
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # real gradients in .grad
    rows = []
    for mode, kwargs in TRACKER_MODES.items():
        gc.collect()
        before = rss_bytes()
        tracker = GradTracker(model, TrackerConfig(**kwargs))
        grown = rss_bytes() - before
        state = tracker.state_bytes()
        tracker.observe_gradients()  # first call: allocator warm
        peaks = []
        observe_s = []
        for _ in range(repeats):
            gc.collect()
            base = rss_bytes()
            reset = reset_peak_rss()
            start = time.perf_counter()
            tracker.observe_gradients()
            tracker.observe_update()
            synchronize(model)
            observe_s.append(time.perf_counter() - start)
            peak = peak_rss_bytes()
            if reset and peak is not None:
                peaks.append(peak - base)
        measure_s, summarize_s = [], []
        for _ in range(0 if rss else repeats):  # the RSS probe's allocator setting would skew timings
            start = time.perf_counter()
            measurement = tracker.measure()  # ends with a device-to-host copy: synchronized
            measure_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            summarize(measurement, step=tracker.steps)
            summarize_s.append(time.perf_counter() - start)
        rows.append({
            "model": work.kind, "dtype": str(work.dtype).removeprefix("torch."), "mode": mode, "config": kwargs,
            "numel": work.numel,
            "state_device_bytes_per_param": state["device"] / work.numel,
            "state_reference_bytes_per_param": state["reference"] / work.numel,
            "rss_growth_bytes_per_param": grown / work.numel if rss else None,
            "observe_transient_peak_bytes_per_param": max(peaks) / work.numel if rss and peaks else None,
            "observe_transient_peak_mib": max(peaks) / 2**20 if rss and peaks else None,
            "observe_s_median": statistics.median(observe_s),
            "measure_s_median": statistics.median(measure_s) if measure_s else None,
            "summarize_s_median": statistics.median(summarize_s) if summarize_s else None,
        })
        del tracker
        gc.collect()
    model.zero_grad(set_to_none=True)
    return rows


def memory_probe(kind: str, threads: int) -> list[dict[str, Any]]:
    """Run :func:`measure_memory_and_logging` with RSS in a fresh process, large blocks mmapped (glibc).

    ``MALLOC_MMAP_THRESHOLD_`` pins glibc's threshold (normally it rises up to 32 MiB after frees), so every
    large tensor is its own mapping: RSS grows when one is allocated and shrinks when it is freed.
    """
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-probe", kind, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        console.print(f"[yellow]memory probe failed: {done.stderr[-2000:]}[/yellow]")
        return []
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_memory(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Tracker state per tracked parameter (floor for two 1-bit masks: 0.25 B) and logging-step "
                        "cost", title_justify="left")
    for col in ("model", "weights", "mode", "device state B", "reference B", "RSS growth B", "observe peak MiB",
                "observe ms", "measure() ms", "summarize ms"):
        table.add_column(col, justify="left" if col in ("model", "weights", "mode") else "right")
    for r in rows:
        peak, grown = r["observe_transient_peak_mib"], r["rss_growth_bytes_per_param"]
        table.add_row(r["model"], r["dtype"], r["mode"], f"{r['state_device_bytes_per_param']:.3f}",
                      f"{r['state_reference_bytes_per_param']:.2f}", "n/a" if grown is None else f"{grown:.2f}",
                      "n/a" if peak is None else f"{peak:.0f}", f"{r['observe_s_median'] * 1e3:.1f}",
                      f"{r['measure_s_median'] * 1e3:.1f}", f"{r['summarize_s_median'] * 1e3:.1f}")
    console.print(table)


# -------------------------------------------------------------------------------------------- profile
def profile_observe(work: Workload, calls: int = 2, top: int = 12) -> list[dict[str, Any]]:
    """torch.profiler per-op breakdown of ``observe_gradients`` (+ ``observe_update``) per tracker mode.

    Profiles a non-logging step: ``detail=False`` where the tracker has it (the callback counts the step's
    gradient density only on steps it will log).
    """
    import inspect

    from torch.profiler import ProfilerActivity, profile

    from gradtrace import GradTracker, TrackerConfig

    model = work.model
    batch = on_model_device(model, work.collator([work.dataset[i] for i in range(8)]))
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    step_kwargs = {"detail": False} if "detail" in inspect.signature(GradTracker.observe_gradients).parameters else {}
    out = []
    for mode, kwargs in TRACKER_MODES.items():
        tracker = GradTracker(model, TrackerConfig(**kwargs))

        def step(tracker=tracker):
            tracker.observe_gradients(**step_kwargs)
            tracker.observe_update()

        step()
        walls = []
        for _ in range(calls):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step()
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total_self = sum(e.self_cpu_time_total for e in events)
        ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        out.append({
            "model": work.kind, "dtype": str(work.dtype).removeprefix("torch."), "mode": mode,
            "observe_gradients_kwargs": step_kwargs,
            "wall_ms_per_call_unprofiled": statistics.median(walls) * 1e3,
            "aten_self_ms_per_call": total_self / 1e3 / calls,
            "ops": [{"op": e.key, "calls_per_step": e.count / calls, "self_ms_per_step": e.self_cpu_time_total / 1e3 / calls,
                     "share": e.self_cpu_time_total / total_self if total_self else 0.0} for e in ops[:top]],
        })
        del tracker
        gc.collect()
    model.zero_grad(set_to_none=True)
    return out


def print_profile(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        console.print(f"[bold]observe_gradients (+ observe_update) profile[/bold], {r['model']} model, {r['dtype']}, "
                      f"{r['mode']}: {r['wall_ms_per_call_unprofiled']:.1f} ms/step unprofiled, "
                      f"{r['aten_self_ms_per_call']:.1f} ms in aten ops (the CPU NumPy path is invisible to torch's "
                      "profiler: the rest is NumPy and Python)")
        table = Table()
        for col in ("op", "calls/step", "self ms/step", "share"):
            table.add_column(col, justify="left" if col == "op" else "right")
        for op in r["ops"][:8]:
            table.add_row(op["op"], f"{op['calls_per_step']:.0f}", f"{op['self_ms_per_step']:.1f}", f"{op['share']:.0%}")
        console.print(table)


# ------------------------------------------------------------------------------------------------ main
def plan(quick: bool, rounds: int | None, steps_override: int | None,
         models: list[str] | None = None) -> list[Setting]:
    """The settings to run: ``--quick`` the tiny model's, else the tiny and ~52M models'. ``models`` (from
    ``--model``) keeps only those model kinds; ``large`` (the ~0.5B model: bf16 and fp32, no accumulation)
    runs only when asked for."""
    settings = []
    tiny_rounds, tiny_steps = (2, 8) if quick else (4, 12)
    for dtype in ("float32", "bfloat16"):
        for ga in (1, 4):
            settings.append(Setting(f"tiny-{dtype}-ga{ga}", "tiny", "trainer", dtype, ga, batch=8, seq=0,
                                    steps=tiny_steps, warmup=2, rounds=tiny_rounds))
    settings.append(Setting("tiny-grpo-bfloat16", "tiny", "grpo", "bfloat16", 1, batch=8, seq=0,
                            steps=5 if quick else 8, warmup=2, rounds=2 if quick else 3))
    if not quick or (models and "mid" in models):
        for dtype in ("float32", "bfloat16"):
            for ga in (1, 4):
                # ga4 steps cost ~2x (and ~5x under wandb.watch freq=1): fewer of them, to stay near 15 min
                settings.append(Setting(f"mid-{dtype}-ga{ga}", "mid", "trainer", dtype, ga, batch=4, seq=64,
                                        steps=4 if ga == 1 else 3, warmup=2, rounds=3 if ga == 1 else 2))
    if models and "large" in models:
        for dtype in ("bfloat16", "float32"):
            settings.append(Setting(f"large-{dtype}-ga1", "large", "trainer", dtype, 1, batch=4, seq=64,
                                    steps=4, warmup=2, rounds=2))
    if models:
        settings = [s for s in settings if s.model in models]
    for s in settings:
        if rounds:
            s.rounds = rounds
        if steps_override:
            s.steps = steps_override
    return settings


def summarize_targets(settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in settings:
        v = res["variants"]
        watch1 = v[WATCH1]["ratio"] if WATCH1 in v else None
        for name, row in v.items():
            if not name.startswith("gradtrace"):
                continue
            entry = {"setting": res["setting"]["name"], "variant": name, "ratio": row["ratio"],
                     "cheaper_than_watch_freq1": None if watch1 is None else row["ratio"] < watch1}
            if name in TARGETS:
                entry["target"] = TARGETS[name]
                entry["met"] = row["ratio"] <= TARGETS[name]
            out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few rounds (~2 min on 2 cores)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/overhead-"
                                                    "cpu[-quick].json)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: available cores)")
    parser.add_argument("--rounds", type=int, default=None, help="override rounds per setting")
    parser.add_argument("--steps", type=int, default=None, help="override measured steps per run")
    parser.add_argument("--only", default=None,
                        help="run only settings whose name contains one of these (comma-separated)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="profile observe_gradients on the ~52M model (default: on unless --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where training runs (default: CUDA when available) and, given, where the "
                             "logging-step and memory measurements put the model")
    parser.add_argument("--model", default=None,
                        help="model kinds to run, comma-separated, of " + ", ".join(MODEL_KINDS)
                             + " (default: tiny and mid; tiny only with --quick; large: ~0.5B, only when named)")
    parser.add_argument("--variants", default=None,
                        help="variants to run, comma-separated (default: all; 'none' always runs)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: see memory_probe
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    models = None if args.model is None else args.model.split(",")
    if models is not None and not set(models) <= set(MODEL_KINDS):
        parser.error(f"--model: unknown kind in {args.model!r}; choose from {', '.join(MODEL_KINDS)}")
    if args.variants is not None:
        wanted_variants = ["none", *(v.strip() for v in args.variants.split(",") if v.strip() != "none")]
        unknown = [v for v in wanted_variants if v not in VARIANTS]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        for name in [v for v in VARIANTS if v not in wanted_variants]:
            del VARIANTS[name]

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    if args.memory_probe:
        with tempfile.TemporaryDirectory() as tmpdir:
            rows = []
            for dtype in ("float32", "bfloat16"):
                work = Workload(args.memory_probe, getattr(torch, dtype), Path(tmpdir))
                rows.extend(measure_memory_and_logging(work, repeats=1, rss=True))
                del work
                gc.collect()
        print(json.dumps(rows))
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    started = time.perf_counter()
    info = machine_info(threads)
    console.print(f"[bold]gradtrace overhead benchmark[/bold] - {info['cpu']}, {info['cores_available']} cores "
                  f"available, torch {info['torch']} with torch.set_num_threads({threads}), "
                  f"load average {info['loadavg_at_start'][0]:.2f}")
    if threads > 1 and info["loadavg_at_start"][0] > 0.5:
        console.print(f"[yellow]warning: load average {info['loadavg_at_start'][0]:.1f} before starting. When other "
                      "processes preempt one of torch's threads, the others spin at OpenMP barriers and step "
                      "times jump by 10x or more; on a shared machine prefer --threads 1.[/yellow]")
    settings = plan(args.quick, args.rounds, args.steps, models)
    if args.only:
        wanted = args.only.split(",")
        settings = [s for s in settings if any(w in s.name for w in wanted)]
    profile_on = (not args.quick) if args.profile is None else args.profile
    where = "cuda" if not use_cpu() else "cpu"
    out_path = Path(args.out or f"benchmarks/results/overhead-{where}{'-quick' if args.quick else ''}.json")

    results: dict[str, Any] = {"machine": info, "argv": sys.argv[1:], "quick": args.quick,
                               "variants": VARIANTS, "targets": TARGETS, "mid_model": MID_MODEL,
                               "large_model": LARGE_MODEL, "device": where,
                               "settings": [], "memory_and_logging": [], "profile": []}
    workloads: dict[tuple[str, str], Workload] = {}
    with tempfile.TemporaryDirectory(prefix="gradtrace-overhead-") as tmpdir:
        tmp = Path(tmpdir)

        def workload(kind: str, dtype: str) -> Workload:
            key = (kind, dtype)
            if key not in workloads:
                for other in [k for k in workloads if k[0] != kind]:  # keep at most one model size alive
                    del workloads[other]
                gc.collect()
                workloads[key] = Workload(kind, getattr(torch, dtype), tmp)
            return workloads[key]

        console.print(LEGEND)
        for setting in settings:
            console.print(f"[bold]{setting.name}[/bold] ...")
            t0 = time.perf_counter()
            res = bench_setting(setting, workload(setting.model, setting.dtype), tmp)
            res["seconds"] = time.perf_counter() - t0
            results["settings"].append(res)
            print_setting(res)

        kinds = sorted({s.model for s in settings}, key=MODEL_KINDS.index)
        for kind in kinds:
            for dtype in [d for d in ("float32", "bfloat16") if any(s.model == kind and s.dtype == d for s in settings)]:
                work = workload(kind, dtype)
                if DEVICE is not None:
                    work.model.to(DEVICE)  # measured on the device asked for (after the runs: copies made)
                results["memory_and_logging"].extend(
                    measure_memory_and_logging(work, repeats=5 if kind == "tiny" else 2))
        if "mid" in kinds and not DEVICE == "cuda":  # RSS of the ~52M model's tracker, in a fresh process
            workloads.clear()
            gc.collect()
            probed = {(r["model"], r["dtype"], r["mode"]): r for r in memory_probe("mid", threads)}
            for row in results["memory_and_logging"]:
                found = probed.get((row["model"], row["dtype"], row["mode"]))
                if found:
                    for key in ("rss_growth_bytes_per_param", "observe_transient_peak_bytes_per_param",
                                "observe_transient_peak_mib"):
                        row[key] = found[key]
        if results["memory_and_logging"]:
            print_memory(results["memory_and_logging"])
        if profile_on:
            for dtype in ("float32", "bfloat16"):
                results["profile"].extend(profile_observe(workload("mid", dtype)))
            print_profile(results["profile"])

    results["targets_check"] = summarize_targets(results["settings"])
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    console.print(f"wrote {out_path} - total {results['total_seconds']:.0f} s, torch threads {threads}, "
                  f"load average at end {results['machine']['loadavg_at_end'][0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
