"""The report's HTML: its style and table-sorting script, its tables (the runs' settings, the values at the
end, one row per parameter matrix or routed expert) and how a value reads in them.

Fractions show as percentages and keep their exact value in ``data-value`` (for tools, tests and the sorting
script). Values estimated from sampled gradient sums (:func:`~gradtrace.views.run_data.is_estimate`) read
``≈12.500%`` with class ``estimate``, and the table is followed by a line saying what that means; counted
values have no sign. The long tables scroll inside their own box and sort on a click on a column header, so
the page stays as wide as the window whatever the number of matrices; the script is a few lines inlined in
the page, which stays one self-contained file that opens offline.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gradtrace.views.run_data import (
    CURVE_METRICS,
    RunData,
    expert_rows,
    is_estimate,
    matrix_rows,
    metric_keys,
    percent,
    sampling_stride,
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; overflow-wrap: anywhere; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em;
margin-top: 2em; }
.scroll { overflow: auto; max-width: 100%; max-height: 75vh; margin: .5em 0 1em; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; } td.text { text-align: left; font-family: monospace; }
table.sortable th { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.estimate { color: #8a5a00; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: .9em; }
details { margin: .5em 0; } summary { cursor: pointer; font-weight: 600; }
.layer-step { display: flex; flex-wrap: wrap; gap: 1em; } .layer-step figure { margin: 0; max-width: 100%; }
figcaption { color: #666; font-size: .85em; width: 0; min-width: 100%; }
"""

# Click a header: sort the rows by that column (ascending, then descending); numbers by data-value, unknown
# values (no data-value, shown "—") last either way, text in natural order ("layers.2" before "layers.10").
SORT_SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, column) => th.addEventListener("click", () => {
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    heads.forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = row => {
      const cell = row.cells[column], value = cell.dataset.value;
      return value === undefined || value === "" ? cell.textContent : Number(value);
    };
    const rows = [...table.tBodies[0].rows].sort((a, b) => {
      const x = key(a), y = key(b);
      if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
      const order = typeof x === "number" ? x - y : x.localeCompare(y, undefined, {numeric: true});
      return ascending ? order : -order;
    });
    table.tBodies[0].append(...rows);
  }));
}
"""
ESTIMATE_SIGN = "≈"


def slug(text: str) -> str:
    """``text`` as a file-name and id part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def cell(value: Any, *, fraction: bool, estimate: bool = False) -> str:
    """A table cell; fractions show as % and keep their exact value in ``data-value``; an estimate is marked."""
    if fraction:
        exact = repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        if estimate:
            return (f'<td class="estimate" data-value="{exact}" title="estimated from sampled gradient sums">'
                    f"{ESTIMATE_SIGN}{html.escape(percent(value, 3))}</td>")
        return f'<td data-value="{exact}">{html.escape(percent(value, 3))}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td data-value="{value}">{value:,}</td>'
    return f'<td class="text">{html.escape("—" if value is None else str(value))}</td>'


def scroll_box(table: str) -> str:
    """A table in a box that scrolls (both ways) rather than widening the page."""
    return f'<div class="scroll">{table}</div>'


def estimate_note(stride: int | None) -> str:
    """The legend line under a table that holds estimates (``""`` when the run counted every element)."""
    if stride is None:
        return ""
    return (f'<p class="note">{ESTIMATE_SIGN} an estimate: <i>cancelled</i> and <i>absorbed</i> split the elements '
            "that received a gradient but kept their value in the proportion seen on the elements whose gradient "
            f'sums are kept, every {stride}th (cancellation="sampled"); a matrix with few sampled elements can '
            "read 0% or 100%. Values without the sign are counted on every element.</p>")


def _sortable_table(table_id: str, css_class: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                    keys: Sequence[Mapping[str, Any]], first_fraction: int, stride: int | None) -> str:
    """``rows`` (one per entry of ``keys``: its summary values) with a header that sorts on a click."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(cell(v, fraction=i >= first_fraction,
                              estimate=i >= first_fraction and is_estimate(values, columns[i], stride))
                         for i, v in enumerate(row)) + "</tr>"
        for row, values in zip(rows, keys, strict=True))
    return (f'<table id="{html.escape(table_id)}" class="{css_class} sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}</tbody></table>")


def matrix_table_html(per_matrix: Mapping[str, Mapping[str, Any]], table_id: str, stride: int | None = None) -> str:
    """The per-matrix table: one row per parameter matrix (fractions in %, exact values in data-value,
    estimates from sampled sums at ``stride`` marked), sortable, in its scroll box."""
    columns, rows = matrix_rows(per_matrix)
    return scroll_box(_sortable_table(table_id, "per-matrix", columns, rows, list(per_matrix.values()), 4, stride))


def expert_table_html(per_expert: Mapping[str, Mapping[str, Any]], table_id: str, stride: int | None = None) -> str:
    """The per-expert table: one row per routed expert of each MoE layer, like :func:`matrix_table_html`."""
    columns, rows = expert_rows(per_expert)
    return scroll_box(_sortable_table(table_id, "per-expert", columns, rows, list(per_expert.values()), 3, stride))


def global_table_html(runs: Sequence[RunData]) -> str:
    """The values at the end, one column per run: the fractions, then the counters."""
    metrics = metric_keys({k: None for run in runs for k in run.final["global"]},
                          (*CURVE_METRICS, "no_gradient", "gradient_unchanged", "ever_changed"))
    strides = [sampling_stride(run.info) for run in runs]
    head = "<th>metric</th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = [f'<tr><td class="text">{html.escape(m)}</td>'
            + "".join(cell(r.final["global"].get(m), fraction=True, estimate=is_estimate(r.final["global"], m, s))
                      for r, s in zip(runs, strides, strict=True)) + "</tr>" for m in metrics]
    counts = ("optimizer_steps", "zero_gradient_steps", "nonfinite_gradient_steps", "skipped_overflow_steps",
              "tracked_elements",
              *(k for k in ("experts", "experts_without_gradient") if any(k in r.final["global"] for r in runs)))
    for key in counts:
        rows.append(f'<tr><td class="text">{key}</td>'
                    + "".join(cell(r.final["global"].get(key), fraction=False) for r in runs) + "</tr>")
    note = estimate_note(next((s for s in strides if s is not None), None))
    return scroll_box(f'<table id="global"><tr>{head}</tr>\n' + "\n".join(rows) + "</table>") + note


def info_table_html(runs: Sequence[RunData]) -> str:
    """What the numbers depend on: optimizer, lr, weight decay, clipping, dtypes, tracker settings."""

    def describe(run: RunData) -> dict[str, str]:
        info = run.info
        optimizer = info.get("optimizer") or {}
        groups = optimizer.get("param_groups") or [{}]
        params = info.get("parameters") or {}
        config = info.get("tracker_config") or {}
        return {
            "directory": str(run.path),
            "status": "finished" if run.ended else "running (or stopped without finishing)",
            "last step": str(run.final.get("step")),
            "optimizer": str(optimizer.get("class", "—")).rsplit(".", 1)[-1],
            "learning rate": ", ".join(sorted({f"{g['lr']:g}" for g in groups if "lr" in g})) or "—",
            "weight decay": ", ".join(sorted({f"{g['weight_decay']:g}" for g in groups if "weight_decay" in g})) or "—",
            "max grad norm": str(info.get("max_grad_norm", "—")),
            "gradient accumulation": str(info.get("gradient_accumulation_steps", "—")),
            "mixed precision": str(info.get("mixed_precision", "—")),
            "stored dtypes (elements)": ", ".join(f"{k}: {v:,}" for k, v in
                                                   (params.get("elements_by_dtype") or {}).items()) or "—",
            "master weights dtype": str(info.get("master_weights_dtype")),
            "cancellation": f"{config.get('cancellation', '—')} (ε = {config.get('cancel_epsilon', '—')}, "
                            f"stride {config.get('sample_stride', '—')})",
            "tolerances": f"abs {config.get('abs_tolerance', '—')}, rel {config.get('rel_tolerance', '—')}",
        }

    described = [describe(run) for run in runs]
    head = "<th></th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = [f'<tr><td class="text">{html.escape(key)}</td>'
            + "".join(f'<td class="text">{html.escape(d[key])}</td>' for d in described) + "</tr>"
            for key in described[0]]
    return scroll_box(f'<table id="info"><tr>{head}</tr>\n' + "\n".join(rows) + "</table>")


def anatomy_warnings_html(runs: Sequence[RunData]) -> str:
    """Each run's ``anatomy_warnings`` (an unrecognised MoE layout) as a visible paragraph; ``""`` if none."""
    out = []
    for run in runs:
        for warning in (run.final or {}).get("anatomy_warnings") or []:
            out.append(f'<p style="color:#b00"><b>{html.escape(run.label)}: model anatomy:</b> '
                       f"{html.escape(warning)}</p>")
    return "".join(out)
