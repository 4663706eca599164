"""Command-line front ends of the mask toolkit: ``gradtrace diff``, ``gradtrace overlap``, ``gradtrace rank``.

The main CLI (:mod:`gradtrace.cli`) calls :func:`add_parsers` on its sub-parsers; each sub-command sets
``func``, a handler taking the parsed namespace and returning the exit status (0 success, 1 when the
inputs cannot be compared, with the reason on stderr; 2, as for argparse's usage errors, when an output
path cannot be written, which is checked before anything is read). :func:`main` runs the three stand-alone::

    python -m gradtrace.cli.tools diff BASE TUNED --tolerance 0 --tolerance 1e-5 --json

This module only presents: numbers come from :mod:`gradtrace.masks.diff`,
:mod:`gradtrace.masks.overlap` and :mod:`gradtrace.masks.rank`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradtrace.formats.atomic import write_atomic
from gradtrace.formats.masks_file import MaskFileError
from gradtrace.formats.output_path import unwritable_reason
from gradtrace.masks.diff import (
    DEFAULT_TOLERANCES,
    CheckpointDiffError,
    DiffResult,
    diff_checkpoints,
    make_criteria,
)
from gradtrace.masks.hub import DEFAULT_TIMEOUT, parse_hub_ref
from gradtrace.masks.overlap import OverlapError, overlap_report
from gradtrace.masks.rank import update_ranks

_INPUT_ERRORS = (CheckpointDiffError, OverlapError, MaskFileError, OSError)


def _pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def _tolerance(text: str) -> str:
    """argparse type: keep the spelling (it is the JSON key) but reject what is not a number >= 0."""
    try:
        make_criteria([text])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text.strip()


def _count(text: str) -> int:
    """argparse type: an integer >= 0 (a retry count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _seconds(text: str, positive: bool = False) -> float:
    """argparse type: a finite number of seconds, >= 0 (> 0 with ``positive``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds {'>' if positive else '>='} 0")
    return value


def _emit(text: str, output: str | None) -> None:
    """``text`` to stdout, or to the file ``output`` atomically (a failed write leaves no half file)."""
    text = text if text.endswith("\n") else text + "\n"
    if output:
        write_atomic(output, lambda tmp: tmp.write_text(text))
    else:
        sys.stdout.write(text)


def _unwritable(command: str, **paths: str | None) -> int | None:
    """Exit status 2 with a clear error when one of ``paths`` (by option name) cannot be written, else ``None``."""
    for option, path in paths.items():
        problem = None if path is None else unwritable_reason(path)
        if problem:
            Console(stderr=True, highlight=False).print(
                f"[bold red]gradtrace {command}: error:[/] {escape(option)}: {escape(problem)}; nothing was read")
            return 2
    return None


def _write_failed(command: str, output: str | None, err: OSError) -> int:
    """Exit status 2 with a clear error: the result could not be written to ``output`` (the temporary
    file of the atomic write is not named: it is gone)."""
    Console(stderr=True, highlight=False).print(f"[bold red]gradtrace {command}: error:[/] cannot write the "
                                                f"result to {escape(output or 'stdout')}: {escape(err.strerror or str(err))}")
    return 2


def _dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2, allow_nan=False)


@contextmanager
def _progress(enabled: bool, description: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """A transient progress bar on stderr with bytes read and ETA (only on a terminal, so pipes and logs
    stay clean). The callback takes (bytes done, bytes in all, current tensor)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{description} {name[-48:]}")

        yield update


def _closing_line(command: str, bytes_read: int, seconds: float) -> None:
    """``gradtrace diff: read 1.23 GB in 4.5 s (273 MB/s)`` on stderr, whatever the output format."""
    rate = f" ({bytes_read / seconds / 1e6:.0f} MB/s)" if seconds > 0 else ""
    Console(stderr=True, highlight=False).print(f"gradtrace {command}: read {bytes_read / 1e9:.3g} GB of tensor "
                                                f"data in {seconds:.1f} s{rate}")


def _is_hub_id(ref: str) -> bool:
    return not Path(ref).exists() and parse_hub_ref(ref) is not None


def _resume_file(args: argparse.Namespace) -> str | None:
    """``--resume FILE``, else for hub inputs a state file beside the output (or in the working folder)."""
    if args.resume:
        return args.resume
    if not (_is_hub_id(args.base) or _is_hub_id(args.tuned)):
        return None  # a local diff reads from disk: rerunning it costs little
    beside = args.output or args.masks_out
    if beside:
        return f"{beside}.resume.jsonl"
    what = [args.base, args.tuned, *(args.tolerance or ()), "rel", *(args.relative or ()), str(args.masks_out)]
    digest = hashlib.sha256("\0".join(what).encode()).hexdigest()[:12]
    return f"gradtrace-diff-{digest}.resume.jsonl"


def _fail(command: str, err: Exception) -> int:
    Console(stderr=True, highlight=False).print(f"[bold red]gradtrace {command}: error:[/] {escape(str(err))}")
    return 1


def _add_output_options(parser: argparse.ArgumentParser, csv: bool = True) -> None:
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    if csv:
        fmt.add_argument("--csv", action="store_true", help="print CSV (one row per group) instead of tables")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the JSON/CSV to FILE instead of stdout")


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", action="store_true",
                        help="hub inputs: download through the Hugging Face cache (repeated diffs cost nothing) "
                             "instead of streaming them with range reads")
    parser.add_argument("--retries", type=_count, default=5, metavar="N",
                        help="hub inputs: retries of a transient HTTP error (default 5)")
    parser.add_argument("--backoff", type=_seconds, default=1.0, metavar="SECONDS",
                        help="hub inputs: wait before the first retry, doubled for each next one (default 1)")
    parser.add_argument("--timeout", type=lambda text: _seconds(text, positive=True), default=DEFAULT_TIMEOUT,
                        metavar="SECONDS", help="hub inputs: how long one request may wait for the server before "
                                                f"it counts as failed and is retried (default {DEFAULT_TIMEOUT:g})")


# --------------------------------------------------------------------------------------------------
# diff


def run_diff(args: argparse.Namespace) -> int:
    """``gradtrace diff``: update sparsity between two checkpoints."""
    tolerances = args.tolerance or list(DEFAULT_TOLERANCES)
    resume = _resume_file(args)
    refused = _unwritable("diff", **{"-o": args.output, "--masks-out": args.masks_out, "--resume": resume})
    if refused is not None:
        return refused
    try:
        with _progress(True, "diff") as progress:
            # keep_resume: the state goes only once the result is written, so a failed write costs no rereading
            result = diff_checkpoints(args.base, args.tuned, tolerances=tolerances, relative=args.relative or (),
                                      masks_out=args.masks_out, allow_missing=args.allow_missing,
                                      device=args.device, progress=progress, cache=args.cache, resume=resume,
                                      retries=args.retries, backoff=args.backoff, timeout=args.timeout,
                                      keep_resume=True)
    except _INPUT_ERRORS as err:
        return _fail("diff", err)
    _closing_line("diff", result.bytes_read, result.seconds)
    if args.json or args.csv:
        try:
            _emit(_dumps(result.to_dict()) if args.json else result.to_csv(), args.output)
        except OSError as err:
            return _write_failed("diff", args.output, err)
    else:
        _print_diff_tables(args, result)
    if resume is not None:
        Path(resume).unlink(missing_ok=True)
    return 0


def _print_diff_tables(args: argparse.Namespace, result: DiffResult) -> None:
    """The diff as tables (global, per layer, per kind, per matrix with --per-matrix) and its notes."""
    console = Console()
    data = result.to_dict()
    columns = [f"|Δ|≤{c.label} %" if c.value else "bit-exact %" for c in result.tolerances]
    columns += [f"rel≤{c.label} %" for c in result.relative]

    def table(title: str, rows: dict[str, dict[str, Any]], first: str) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column(first)
        t.add_column("elements", justify="right")
        for col in columns:
            t.add_column(col, justify="right")
        for name, row in rows.items():
            values = list(row["sparsity"].values()) + list(row.get("sparsity_relative", {}).values())
            t.add_row(escape(str(name)), f"{row['numel']:,}", *(_pct(v) for v in values))
        return t

    console.print(f"[bold]update sparsity[/] of {escape(args.tuned)} relative to {escape(args.base)} "
                  "(% of elements unchanged, per criterion)")
    everything = {"all": {"numel": data["numel"], "sparsity": data["global"],
                          "sparsity_relative": data.get("global_relative", {})}}
    console.print(table("global", everything, ""))
    if data["per_layer"]:
        console.print(table("per layer", data["per_layer"], "layer"))
    console.print(table("per module kind", data["per_kind"], "kind"))
    if args.per_matrix:
        console.print(table("per matrix", data["per_matrix"], "tensor"))
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    if args.masks_out:
        console.print(f"masks written to {escape(args.masks_out)} (kind 'update' = bitwise change)")


# --------------------------------------------------------------------------------------------------
# overlap


def run_overlap(args: argparse.Namespace) -> int:
    """``gradtrace overlap``: how much the subnetworks of several runs coincide."""
    if len(args.masks) < 2:
        print("gradtrace overlap: needs at least two masks files (or run directories)", file=sys.stderr)
        return 2
    refused = _unwritable("overlap", **{"-o": args.output})
    if refused is not None:
        return refused
    try:
        report = overlap_report(args.masks, kind=args.kind)
    except _INPUT_ERRORS as err:
        return _fail("overlap", err)
    if args.json:
        try:
            _emit(_dumps(report), args.output)
        except OSError as err:
            return _write_failed("overlap", args.output, err)
        return 0
    console = Console()
    if "global" in report:
        a, b = report["runs"]
        console.print(f"[bold]overlap[/] of {escape(repr(args.kind))} masks: run 1 = {escape(a)}, run 2 = {escape(b)}")
        console.print("o₁ = |I₁∩I₂|/|I₁| (chance 1−s₂), o₂ = |I₁∩I₂|/|I₂| (chance 1−s₁), "
                      "Jaccard J (chance pq/(p+q−pq)); d = density; all in %")
        t = Table(title_justify="left")
        for col in ("group", "d₁", "d₂", "o₁", "chance", "o₂", "chance", "J", "chance"):
            t.add_column(col, justify="left" if col == "group" else "right")
        groups = [("all", report["global"])]
        groups += [(f"layer {k}", v) for k, v in report["per_layer"].items()]
        groups += [(f"kind {k}", v) for k, v in report["per_kind"].items()]
        for name, g in groups:
            d1 = None if g["sparsity_1"] is None else 1 - g["sparsity_1"]
            d2 = None if g["sparsity_2"] is None else 1 - g["sparsity_2"]
            t.add_row(escape(name), _pct(d1), _pct(d2), _pct(g["overlap"]), _pct(g["chance"]), _pct(g["overlap_2"]),
                      _pct(g["chance_2"]), _pct(g["jaccard"]), _pct(g["jaccard_chance"]))
        console.print(t)
        return 0
    runs = report["runs"]
    console.print(f"[bold]pairwise overlap[/] of {escape(repr(args.kind))} masks; runs:")
    for i, run in enumerate(runs):
        console.print(f"  {i + 1}: {escape(run)} (update sparsity {_pct(report['sparsity'][i])} %)")
    for key, title in (("overlap", escape("o = |Iᵢ∩Iⱼ| / |Iᵢ| % (row i, column j) [chance]")),
                       ("jaccard", escape("Jaccard % [chance]"))):
        t = Table(title=title, title_justify="left")
        t.add_column("")
        for j in range(len(runs)):
            t.add_column(str(j + 1), justify="right")
        chance = report["matrix"]["chance" if key == "overlap" else "jaccard_chance"]
        for i in range(len(runs)):
            t.add_row(str(i + 1), *(escape(f"{_pct(report['matrix'][key][i][j], 1)} [{_pct(chance[i][j], 1)}]")
                                    for j in range(len(runs))))
        console.print(t)
    return 0


# --------------------------------------------------------------------------------------------------
# rank


def run_rank(args: argparse.Namespace) -> int:
    """``gradtrace rank``: rank of each update matrix and of a random matrix with the same support."""
    refused = _unwritable("rank", **{"-o": args.output})
    if refused is not None:
        return refused
    try:
        with _progress(True, "rank") as progress:
            result = update_ranks(args.base, args.tuned, max_dim=args.max_dim, baseline=not args.no_baseline,
                                  seed=args.seed, allow_missing=args.allow_missing, device=args.device,
                                  progress=progress, cache=args.cache, retries=args.retries, backoff=args.backoff,
                                  timeout=args.timeout)
    except _INPUT_ERRORS as err:
        return _fail("rank", err)
    data = result.to_dict()
    if args.json:
        try:
            _emit(_dumps(data), args.output)
        except OSError as err:
            return _write_failed("rank", args.output, err)
        return 0
    console = Console()
    g = data["global"]
    console.print(f"[bold]update rank[/] of {escape(args.tuned)} − {escape(args.base)}: mean rank/min(m,n) over "
                  f"{g['matrices']} matrices = {_pct(g['mean_rank_fraction'])} % "
                  f"(random matrix on the same support: {_pct(g['mean_random_rank_fraction'])} %)")
    rows = data["per_matrix"] if args.per_matrix else data["per_kind"]
    t = Table(title="per matrix" if args.per_matrix else "per module kind (means)", title_justify="left")
    t.add_column("tensor" if args.per_matrix else "kind")
    for col in ("shape" if args.per_matrix else "matrices", "density %", "rank %", "random-support rank %"):
        t.add_column(col, justify="right")
    for name, row in rows.items():
        if args.per_matrix:
            t.add_row(escape(name), "×".join(map(str, row["shape"])), _pct(row["density"]), _pct(row["rank_fraction"]),
                      _pct(row["random_rank_fraction"]))
        else:
            t.add_row(escape(name), str(row["matrices"]), _pct(row["mean_density"]), _pct(row["mean_rank_fraction"]),
                      _pct(row["mean_random_rank_fraction"]))
    console.print(t)
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    return 0


# --------------------------------------------------------------------------------------------------


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``diff``, ``overlap`` and ``rank`` on a sub-parsers object; each sets ``func=handler``."""
    p = subparsers.add_parser(
        "diff", help="update sparsity between two checkpoints (post hoc)",
        description="Fraction of elements unchanged between two checkpoints (HF folders, sharded or not, "
                    ".safetensors files, or hub repos org/name[@revision] read with HTTP ranges, nothing "
                    "written to disk), streamed one tensor at a time. Tolerance 0 = bit-exact equality; "
                    "other tolerances: |θ₁−θ₀| ≤ tol with the delta in the stored dtype (Mukherjee et al.). "
                    "FP8 checkpoints in the DeepSeek-V3 layout are compared dequantized.")
    p.add_argument("base", help="checkpoint before training (folder, .safetensors file or hub id org/name[@revision])")
    p.add_argument("tuned", help="checkpoint after training (same forms)")
    p.add_argument("--tolerance", "-t", action="append", type=_tolerance, metavar="TOL",
                   help="absolute tolerance; repeat for several (default: 0 and 1e-5)")
    p.add_argument("--relative", action="append", type=_tolerance, metavar="ETA",
                   help="relative tolerance of Zhu et al.: unchanged iff |ŵ−w| ≤ η·max(|w|,|ŵ|), in fp32 (e.g. 1e-3)")
    p.add_argument("--masks-out", metavar="FILE",
                   help="write the changed-element masks (kind 'update' = bitwise) as a gradtrace masks file")
    p.add_argument("--per-matrix", action="store_true", help="also show one row per tensor")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (with a note) tensors present in only one checkpoint instead of failing")
    p.add_argument("--device", default="cpu", help="device to compare on (default: cpu)")
    _add_hub_options(p)
    p.add_argument("--resume", metavar="FILE",
                   help="record finished tensors in FILE and skip them on a rerun (default for hub inputs: "
                        "beside -o / --masks-out, else gradtrace-diff-<hash>.resume.jsonl here; removed when done)")
    _add_output_options(p)
    p.set_defaults(func=run_diff)

    p = subparsers.add_parser(
        "overlap", help="overlap between the masks of two or more runs",
        description="o₁ = |I₁∩I₂|/|I₁|, o₂ = |I₁∩I₂|/|I₂| and Jaccard, each beside its value for independent "
                    "random masks of the same densities; global, per layer, per module kind; a pairwise "
                    "matrix for more than two runs.")
    p.add_argument("masks", nargs="+", type=str, metavar="MASKS", help="gradtrace masks files (at least two)")
    p.add_argument("--kind", default="update", help="mask kind to compare: update (default) or gradient")
    _add_output_options(p, csv=False)
    p.set_defaults(func=run_overlap)

    p = subparsers.add_parser(
        "rank", help="rank of the update matrices ΔW between two checkpoints",
        description="torch.linalg.matrix_rank (default tolerance) of each 2-D ΔW = W₁−W₀ in fp32, as % of "
                    "min(m,n), beside the rank of a random matrix on the same sparse support.")
    p.add_argument("base", help="checkpoint before training (folder, .safetensors file or hub id org/name[@revision])")
    p.add_argument("tuned", help="checkpoint after training (same forms)")
    p.add_argument("--max-dim", type=int, metavar="N", help="skip matrices with a side longer than N (noted)")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-support baseline (halves the time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default 0)")
    p.add_argument("--per-matrix", action="store_true", help="one row per matrix instead of per module kind")
    p.add_argument("--allow-missing", action="store_true", help="skip tensors present in only one checkpoint")
    p.add_argument("--device", default="cpu", help="device for the SVDs (default: cpu)")
    _add_hub_options(p)
    _add_output_options(p, csv=False)
    p.set_defaults(func=run_rank)
