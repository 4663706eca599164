"""``gradtrace demo``: GRPO vs in-distribution SFT vs out-of-distribution SFT, traced, side by side.

All runs start from the same base policy with the same learning rate and number of optimizer steps;
only the algorithm, the data and (for the contrast run) the weight dtype differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from gradtrace.demo import runs
from gradtrace.demo.tiny import IN_TASK, OUT_TASK
from gradtrace.integrations.trainer import GradTraceCallback

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

ROWS: tuple[tuple[str, str], ...] = (
    ("gradient_sparsity", "gradient sparsity"),
    ("update_sparsity", "update sparsity, bitwise"),
    ("update_sparsity_abs_1e-05", "  … |Δ| ≤ 1e-5"),
    ("update_sparsity_rel_0.001", "  … |Δ| ≤ 1e-3·max|w|"),
    ("updated", "updated"),
    ("cancelled", "cancelled"),
    ("absorbed", "absorbed"),
    ("changed_without_gradient", "changed w/o gradient"),
    ("ever_changed", "changed at some step"),
)


@dataclass
class DemoRun:
    name: str
    description: str
    run_dir: Path
    summary: dict[str, Any]
    seconds: float
    metric: str


def run_demo(
    output_dir: str | Path = "gradtrace-demo",
    *,
    learning_rate: float = 1e-5,
    steps: int = 30,
    base_steps: int = 150,
    dtype: str = "bfloat16",
    fp32_contrast: bool = True,
    seed: int = 0,
    use_wandb: bool = False,
    console: Console | None = None,
) -> list[DemoRun]:
    """Run the demo and print the table; returns the runs (their summaries and where they were written)."""
    console = console or Console()
    _quiet_libraries()
    out = Path(output_dir).resolve()
    weights = DTYPES[dtype]
    report_to = "wandb" if use_wandb else "none"
    console.print(f"[bold]gradtrace demo[/] → {out}")
    started = time.perf_counter()
    console.print(f"• base policy: {base_steps} SFT steps on the in-distribution task (addition)…")
    base = runs.make_base_policy(out, steps=base_steps, seed=seed, dtype=torch.float32, quiet=True)

    # (name, description, trainer function, extra arguments, weight dtype): same base, lr and steps.
    plans = [
        ("grpo", f"TRL GRPO, {dtype}", runs.run_grpo, {}, weights),
        ("sft-in", f"SFT in-distribution, {dtype}", runs.run_sft, {"task": IN_TASK}, weights),
        ("sft-out", f"SFT out-of-distribution, {dtype}", runs.run_sft, {"task": OUT_TASK}, weights),
    ]
    if fp32_contrast and weights != torch.float32:
        plans.append(("grpo-fp32", "TRL GRPO, float32 (contrast)", runs.run_grpo, {}, torch.float32))
    results: list[DemoRun] = []
    for name, description, run, extra, run_dtype in plans:
        console.print(f"• {description}…")
        run_dir = out / name / "gradtrace"
        callback = GradTraceCallback(output_dir=run_dir, cancellation="full", ever_changed=True)
        result = run(base, out / name, callbacks=[callback], learning_rate=learning_rate, max_steps=steps,
                     dtype=run_dtype, seed=seed, report_to=report_to, run_name=name, quiet=True, **extra)
        results.append(DemoRun(name, description, run_dir, callback.summary or {}, result.seconds,
                               _final_metric(result.log_history)))

    console.print(results_table(results, learning_rate=learning_rate, steps=steps))
    console.print(f"Masks and run logs: {out}/<run>/gradtrace/ (masks.safetensors, summary.json, log.jsonl)")
    _maybe_report(console, results, out)
    console.print(f"Done in {time.perf_counter() - started:.0f} s.")
    return results


def _quiet_libraries() -> None:
    """The demo prints one table; progress bars and library chatter would bury it."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # One intra-op thread is as fast for a model this small, and two threads thrash on a busy 2-core box.
    torch.set_num_threads(1)


def _final_metric(log_history: list[dict[str, Any]]) -> str:
    """The last logged reward (GRPO) or loss (SFT), formatted for the table."""
    history = [h for h in log_history if "loss" in h or "reward" in h]
    if not history:
        return ""
    last = history[-1]
    return f"{last['reward']:.2f}" if "reward" in last else f"{last['loss']:.3f}"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_table(results: list[DemoRun], *, learning_rate: float, steps: int) -> Table:
    table = Table(
        title=f"Fractions of trainable elements after {steps} optimizer steps at lr {learning_rate:g}"
    )
    table.add_column("", no_wrap=True)
    for run in results:
        table.add_column(run.name, justify="right")
    for key, label in ROWS:
        table.add_row(label, *(_cell(run.summary.get("global", {}).get(key)) for run in results))
    table.add_row(
        "steps with an all-zero gradient",
        *(
            f"{run.summary['global']['zero_gradient_steps']}/{run.summary['optimizer_steps']}"
            for run in results
        ),
    )
    table.add_row("reward (GRPO) / loss", *(run.metric for run in results))
    table.caption = ("Each element is in one of: no gradient · changed w/o gradient (weight decay, momentum) · "
                     "updated · cancelled (gradient, unchanged, |Σg| ≤ 0.1·Σ|g|) · absorbed (consistent "
                     "gradient, unchanged: updates lost to the storage precision).")
    table.add_row("wall time", *(f"{run.seconds:.0f} s" for run in results))
    return table


def _maybe_report(console: Console, results: list[DemoRun], out: Path) -> None:
    try:
        from gradtrace.views.report import write_report
    except ImportError:
        return
    path = write_report([run.run_dir for run in results], out / "report")
    console.print(f"Report: {path}")
