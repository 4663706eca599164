"""The ``gradtrace`` command: ``demo`` and the tools that read runs and masks.

The top room, with :mod:`gradtrace.demo`: it parses arguments and calls into the rooms below (the sub-commands
of :mod:`.report` and :mod:`.tools`), importing each only when its command runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_demo_parser(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="trace GRPO vs SFT (in- and out-of-distribution) on an embedded tiny model",
        description="Builds a tiny causal LM and tokenizer locally (no downloads), gives it a policy with a "
                    "short SFT, then from that same base, with the same learning rate and number of steps, "
                    "traces TRL GRPO, SFT on in-distribution data and SFT on out-of-distribution data in bf16, "
                    "plus one fp32 run, and prints a side-by-side table.")
    demo.add_argument("--output-dir", default="gradtrace-demo", help="where runs, masks and logs go")
    demo.add_argument("--lr", type=float, default=1e-5, help="learning rate of every traced run")
    demo.add_argument("--steps", type=int, default=30, help="optimizer steps of every traced run")
    demo.add_argument("--base-steps", type=int, default=150, help="SFT steps that make the base policy")
    demo.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="weight dtype of the main runs")
    demo.add_argument("--no-fp32-contrast", action="store_true", help="skip the extra fp32 GRPO run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--wandb", action="store_true",
                      help="log to W&B (offline unless WANDB_MODE says otherwise)")
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    from gradtrace.demo.pipeline import run_demo

    run_demo(output_dir=args.output_dir, learning_rate=args.lr, steps=args.steps, base_steps=args.base_steps,
             dtype=args.dtype, fp32_contrast=not args.no_fp32_contrast, seed=args.seed, use_wandb=args.wandb)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradtrace", description="See which parameters fine-tuning touches.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(subparsers)
    from gradtrace.cli import report as cli_report
    from gradtrace.cli import tools as cli_tools
    cli_tools.add_parsers(subparsers)
    cli_report.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
