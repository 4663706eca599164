"""What one logging step costs with all four trackers: each tracker alone, and what gradtrace adds to it.

    python benchmarks/logging_step.py                 # 24 layers, 20 logging steps
    python benchmarks/logging_step.py --layers 24 --steps 40
    python benchmarks/logging_step.py --steps 40 --against /tmp/base --rounds 3   # before / after

``--against DIR`` compares with another checkout of gradtrace (``git worktree add --detach DIR <commit>``):
the same measurement runs in a fresh process for each, alternating (DIR, this checkout, DIR, ...) so both
see the machine's load alike, and each version's figures are printed as the range over its rounds.

A Llama-config model of the given depth (tiny widths, about 226k parameters at 24 layers) is traced by a
real :class:`GradTracker`; each logging step, every tracker gets a real run in a temporary folder
(TensorBoard event file, MLflow on SQLite, trackio's SQLite store, W&B offline) and is timed twice:

- *alone*: what the Trainer's own callback sends at a logging step (loss, learning rate, grad norm,
  epoch), the cost a user pays without gradtrace;
- *gradtrace*: gradtrace's sink for that tracker, given the step's already drawn frame.

Printed per logging step (medians): ``measure()`` (the tracker's host sync and summary), drawing the frame
(once per step, shared by every tracker), each tracker alone and gradtrace's sink beside it, and the total
gradtrace adds (drawing + the four sinks) as a multiple of ``measure()``. One thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
_STORE = Path(tempfile.mkdtemp(prefix="gradtrace-bench-"))
os.environ.setdefault("TRACKIO_DIR", str(_STORE / "trackio"))  # trackio fixes its folder at import

import torch  # noqa: E402
from live_charts import sparse_step  # noqa: E402  (beside this script: benchmarks/live_charts.py)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradtrace  # noqa: E402
from gradtrace import GradTracker  # noqa: E402
from gradtrace.sinks.payload import LiveCharts  # noqa: E402
from gradtrace.tracking.summary import summarize  # noqa: E402

TRAINER_KEYS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/epoch")


def model_of(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))


def trainer_scalars(step: int) -> dict[str, float]:
    """What the Trainer logs at a logging step (its values do not matter to the cost)."""
    return {key: 1.0 / (step + index + 1) for index, key in enumerate(TRAINER_KEYS)}


class Tracker:
    """One tracker's run, the Trainer's own logging into it, and gradtrace's sink for it."""

    def __init__(self, name: str, charts: LiveCharts):
        self.name = name
        folder = _STORE / name
        folder.mkdir(parents=True, exist_ok=True)
        if name == "TensorBoard":
            from torch.utils.tensorboard import SummaryWriter

            from gradtrace.sinks.tensorboard import TensorBoardSink

            self.writer = SummaryWriter(str(folder))
            self.sink = TensorBoardSink(str(folder), charts=charts)
        elif name == "MLflow":
            import mlflow

            from gradtrace.sinks.mlflow import MlflowSink

            mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
            mlflow.set_experiment("bench")
            self.run = mlflow.start_run()
            self.sink = MlflowSink(charts=charts)
        elif name == "trackio":
            import trackio

            from gradtrace.sinks.trackio import TrackioSink

            trackio.init(project="bench", name="bench", embed=False)
            self.sink = TrackioSink("train/global_step", charts=charts)
        else:
            import wandb

            from gradtrace.sinks.wandb import WandbSink

            self.run = wandb.init(project="bench", dir=str(folder), mode="offline")
            self.sink = WandbSink(self.run, step_key="train/global_step", charts=charts)

    def alone(self, step: int) -> None:
        """The Trainer callback's own log call at this step."""
        scalars = trainer_scalars(step)
        if self.name == "TensorBoard":
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        elif self.name == "MLflow":
            import mlflow

            mlflow.log_metrics(scalars, step=step, synchronous=True)
        elif self.name == "trackio":
            import trackio

            trackio.log({**scalars, "train/global_step": step})
        else:
            self.run.log({**scalars, "train/global_step": step})

    def close(self) -> None:
        if self.name == "TensorBoard":
            self.writer.close()
            self.sink._writer.close()  # noqa: SLF001 - the benchmark ends the run without a final export
        elif self.name == "MLflow":
            import mlflow

            mlflow.end_run()
        elif self.name == "trackio":
            import trackio

            trackio.finish()
        else:
            self.run.finish()


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Medians per logging step (ms) of each part, past the first steps (imports, opening runs)."""
    torch.set_num_threads(1)
    model = model_of(args.layers)
    tracker = GradTracker(model)
    charts = LiveCharts()
    trackers = [Tracker(name, charts) for name in args.trackers]
    times: dict[str, list[float]] = {"measure": [], "drawing": []}
    for name in args.trackers:
        times[f"{name} alone"], times[f"{name} gradtrace"] = [], []
    generator = torch.Generator().manual_seed(1)
    for step in range(1, args.steps + 1):
        sparse_step(model, tracker, generator, density=0.05)  # sparse gradients: a few % of elements
        summary: dict = {}
        times["measure"].append(timed(lambda: summary.update(summarize(tracker.measure(), step=step))))  # noqa: B023
        times["drawing"].append(timed(lambda: charts.frame(summary)))  # noqa: B023
        for each in trackers:
            times[f"{each.name} alone"].append(timed(lambda: each.alone(step)))  # noqa: B023
            times[f"{each.name} gradtrace"].append(timed(lambda: each.sink.log(summary, step)))  # noqa: B023
    for each in trackers:
        each.close()
    skip = min(2, args.steps - 1)  # the first steps import and open things: not a logging step's cost
    median = {key: statistics.median(values[skip:]) for key, values in times.items()}
    median["sinks"] = sum(median[f"{name} gradtrace"] for name in args.trackers)
    median["added"] = median["drawing"] + median["sinks"]
    median["ratio"] = median["added"] / median["measure"]
    median["alone"] = sum(median[f"{name} alone"] for name in args.trackers)
    return median


def report(args: argparse.Namespace, median: dict[str, float]) -> None:
    skip = min(2, args.steps - 1)
    print(f"gradtrace from {gradtrace.__file__}")
    print(f"{args.layers} layers, {sum(p.numel() for p in model_of(args.layers).parameters()) / 1e3:.0f}k parameters, "
          f"median of logging steps {skip + 1}..{args.steps}, ms per logging step, one thread\n")
    print(f"{'':<14} {'alone':>8} {'+ gradtrace':>12}")
    for name in args.trackers:
        print(f"{name:<14} {median[f'{name} alone']:8.1f} {median[f'{name} gradtrace']:12.1f}")
    print(f"{'drawing':<14} {'':>8} {median['drawing']:12.1f}   (once per step, shared)")
    print(f"{'measure()':<14} {'':>8} {median['measure']:12.1f}")
    print(f"\ngradtrace adds {median['added']:.1f} ms per logging step with {len(args.trackers)} trackers "
          f"(drawing {median['drawing']:.1f} + sinks {median['sinks']:.1f}) = {median['ratio']:.2f}x measure(); "
          f"the trackers alone take {median['alone']:.1f} ms")


def compare(args: argparse.Namespace) -> None:
    """Run the measurement for ``args.against`` and this checkout in turn, ``args.rounds`` times each."""
    here = Path(__file__).resolve().parent.parent
    versions = {"before": Path(args.against).resolve(), "now": here}
    results: dict[str, list[dict[str, float]]] = {label: [] for label in versions}
    for round_ in range(args.rounds):
        for label, root in versions.items():
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                command = [sys.executable, __file__, "--layers", str(args.layers), "--steps", str(args.steps),
                           "--json", out.name, "--trackers", *args.trackers]
                env = {**os.environ, "PYTHONPATH": str(root)}
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{label} ({root}) failed:\n{done.stderr[-3000:]}")
                results[label].append(json.loads(Path(out.name).read_text()))
            print(f"round {round_ + 1}, {label} ({root}): adds {results[label][-1]['added']:.1f} ms = "
                  f"{results[label][-1]['ratio']:.2f}x measure()", flush=True)

    def spread(label: str, key: str, digits: int = 1) -> str:
        values = [r[key] for r in (results["before"] + results["now"] if label == "both" else results[label])]
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"

    print(f"\n{args.layers} layers, {args.steps} logging steps, {args.rounds} rounds each, alternating; ms per "
          "logging step (medians), range over the rounds")
    print(f"{'':<22} {'alone':>12} {'before':>14} {'now':>14}")
    for name in args.trackers:
        print(f"{name:<22} {spread('both', f'{name} alone'):>12} {spread('before', f'{name} gradtrace'):>14} "
              f"{spread('now', f'{name} gradtrace'):>14}")
    for key, title in (("drawing", "drawing (shared)"), ("measure", "measure()"), ("added", "gradtrace adds")):
        print(f"{title:<22} {'':>12} {spread('before', key):>14} {spread('now', key):>14}")
    print(f"{'x measure()':<22} {'':>12} {spread('before', 'ratio', 2):>14} {spread('now', 'ratio', 2):>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20, help="logging steps (one per optimizer step)")
    parser.add_argument("--trackers", nargs="+", default=["TensorBoard", "MLflow", "trackio", "W&B"])
    parser.add_argument("--against", metavar="DIR", help="another gradtrace checkout to compare with")
    parser.add_argument("--rounds", type=int, default=2, help="with --against: runs of each version")
    parser.add_argument("--json", metavar="FILE", help=argparse.SUPPRESS)  # --against's runs write here
    args = parser.parse_args()
    if args.against:
        compare(args)
        return
    median = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(median))
    else:
        report(args, median)


if __name__ == "__main__":
    main()
