"""The ``report`` and ``watch`` sub-commands of the ``gradtrace`` command line.

``gradtrace.cli`` builds the top-level parser and calls :func:`add_parsers`; each sub-command sets
``func``, which takes the parsed arguments and returns the process exit code.

    gradtrace report runs/grpo runs/sft -o runs/compare
    gradtrace watch runs/grpo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _report(args: argparse.Namespace) -> int:
    from gradtrace.formats.output_path import unwritable_reason
    from gradtrace.views.report import REPORT_NAME, write_report

    if args.output is not None:  # checked before the figures are drawn; exit 2, like a usage error
        html = args.output if args.output.suffix.lower() in (".html", ".htm") else args.output / REPORT_NAME
        problem = unwritable_reason(html)
        if problem:
            print(f"gradtrace report: error: -o: {problem}", file=sys.stderr)
            return 2
    try:
        path = write_report(args.run_dirs, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"gradtrace report: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. the default RUN_DIR/report on a read-only file system
        print(f"gradtrace report: error: cannot write the report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _watch(args: argparse.Namespace) -> int:
    from gradtrace.views.watch import watch

    return watch(args.run_dir, once=args.once, interval=args.interval)


def add_parsers(subparsers: Any) -> None:
    """Register ``report`` and ``watch`` on ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    report = subparsers.add_parser(
        "report", help="write an HTML report (and PNGs) from one or more run directories",
        description="Make a self-contained HTML report from run logs (log.jsonl, summary.json): curves "
                    "over training, layer x module-kind heatmaps, cancellation histogram, per-matrix "
                    "table. Several runs are overlaid for comparison.")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a gradtrace run directory (holds log.jsonl)")
    report.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                        help="where the report goes: a directory (report.html and the PNGs in it) or a file name ending in .html (the PNGs beside it); default: RUN_DIR/report of the first run")
    report.set_defaults(func=_report)

    watch = subparsers.add_parser(
        "watch", help="live terminal view of a run, following its log",
        description="Follow RUN_DIR/log.jsonl and show step, global fractions and per-layer bars; exits "
                    "when the run ends or on Ctrl-C.")
    watch.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    watch.add_argument("--once", action="store_true", help="render the current state once and exit")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    watch.set_defaults(func=_watch)
