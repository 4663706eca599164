"""The pieces of ``gradtrace watch``'s terminal view: bars, sparklines with their range, and the per-group
(per layer, per kind) tables fitted into a terminal's width and height.

A 24-layer model's table, one row per layer, does not fit a 40-line terminal under the global table, and
a terminal crops what does not fit: the last layers were simply missing. :func:`fit_groups` keeps every
group on the screen by changing the layout instead: one row per group while the rows fit, else the groups
in several side-by-side columns (numbers kept), else a heat strip (one character per group and metric,
scaled to the values' range, the range printed), wrapped over as many bands as the width needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from gradtrace.views.run_data import percent

SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"
# The two metrics of the per-group views, with their colour.
GROUP_METRICS = (("update_sparsity", "update", "green"), ("gradient_sparsity", "grad", "cyan"))
_VALUE_W = 7  # "100.00%"
_GAP = "  "  # between the side-by-side columns of groups


def fraction_bar(value: float | None, width: int = 30) -> str:
    """A bar ``width`` characters wide filled to ``value`` (0..1), in eighths of a character."""
    if value is None or not math.isfinite(value) or width <= 0:
        return " " * max(width, 0)
    eighths = round(max(0.0, min(1.0, value)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def shown_history(values: Sequence[float], width: int) -> list[float]:
    """The finite values of ``values`` that a sparkline ``width`` characters wide draws: the last ``width``."""
    return [v for v in values if math.isfinite(v)][-width:]


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """The last ``width`` values as a sparkline scaled to their own range (:func:`spark_range` prints it)."""
    values = shown_history(values, width)
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARK[round((v - low) / span * (len(SPARK) - 1)) if span else 0] for v in values)


def spark_range(values: Sequence[float], width: int = 24) -> str:
    """The range the sparkline of the same arguments is scaled to: ``"83.86%–85.91%"``; ``""`` when empty."""
    values = shown_history(values, width)
    return f"{percent(min(values))}–{percent(max(values))}" if values else ""


def bars_table(title: str, groups: Mapping[str, Mapping[str, Any]], label: str, width: int) -> Table:
    """Update and gradient sparsity of each group as bars, one row per group, fitted into ``width`` columns."""
    label_width = max([len(label), *(len(k) for k in groups)])
    # Two bars share what the label, the two percentages and the column padding leave.
    bar_width = max(5, min(40, (width - label_width - 2 * _VALUE_W - 5 * 2) // 2))
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
    table.add_column(label, justify="right", style="bold", no_wrap=True, min_width=label_width)
    for metric, _, _ in GROUP_METRICS:
        table.add_column(f"{metric.replace('_', ' ')}", no_wrap=True, min_width=bar_width)
        table.add_column("", justify="right", no_wrap=True, min_width=_VALUE_W)
    for key, values in groups.items():
        cells: list[Any] = [key]
        for metric, _, style in GROUP_METRICS:
            cells += [Text(fraction_bar(values.get(metric), bar_width), style=style), percent(values.get(metric))]
        table.add_row(*cells)
    return table


def columns_view(title: str, groups: Mapping[str, Mapping[str, Any]], label: str, width: int,
                 rows: int) -> Text | None:
    """The groups in side-by-side columns of at most ``rows`` lines (read down, then across), each group
    its label and both percentages (and small bars where the width allows); ``None`` when the columns this
    takes do not fit in ``width``. A title and a header line above."""
    keys = list(groups)
    if rows < 1 or not keys:
        return None
    count = math.ceil(len(keys) / rows)
    rows = math.ceil(len(keys) / count)  # as even as the columns allow
    label_width = max(len(k) for k in keys)  # the title names the groups: the header's label may be left out
    narrowest = label_width + len(GROUP_METRICS) * (1 + _VALUE_W)
    column_width = (width + len(_GAP)) // count - len(_GAP)
    if column_width < narrowest:
        return None
    bar_width = min(12, (column_width - narrowest) // len(GROUP_METRICS) - 1)
    bar_width = bar_width if bar_width >= 2 else 0
    cell_width = (1 + bar_width if bar_width else 0) + 1 + _VALUE_W
    text = Text(f"{title} (all {len(keys)}, in {count} columns)\n")
    head = (label if len(label) <= label_width else "").rjust(label_width)
    head += "".join(name[:cell_width - 1].rjust(cell_width) for _, name, _ in GROUP_METRICS)
    text.append(_GAP.join([head] * count), style="bold")
    for row in range(rows):
        text.append("\n")
        for column in range(count):
            index = column * rows + row
            if index >= len(keys):
                break
            if column:
                text.append(_GAP)
            values = groups[keys[index]]
            text.append(keys[index].rjust(label_width), style="bold")
            for metric, _, style in GROUP_METRICS:
                if bar_width:
                    text.append(" " + fraction_bar(values.get(metric), bar_width), style=style)
                text.append(" " + percent(values.get(metric)).rjust(_VALUE_W))
    return text


def heat_strip(title: str, groups: Mapping[str, Mapping[str, Any]], label: str, width: int) -> Text:
    """One character cell per group and metric, scaled to the metric's range over the groups (printed), the
    groups' labels above; wrapped into as many bands as ``width`` needs. For when even columns do not fit."""
    keys = list(groups)
    cell = max(len(k) for k in keys) + 1
    prefix = max(len(label), *(len(name) for _, name, _ in GROUP_METRICS)) + 1
    per_band = max(1, (width - prefix) // cell)
    text = Text(f"{title}: each block's height within its range")
    ranges = {}
    for metric, name, _ in GROUP_METRICS:
        values = [v for k in keys if isinstance(v := groups[k].get(metric), (int, float)) and math.isfinite(v)]
        ranges[metric] = (min(values), max(values)) if values else (0.0, 0.0)
        text.append(f"\n{name.rjust(prefix - 1)} {percent(ranges[metric][0])}–{percent(ranges[metric][1])}")
    for start in range(0, len(keys), per_band):
        band = keys[start:start + per_band]
        text.append("\n" + label.rjust(prefix - 1) + " " + "".join(k.rjust(cell - 1) + " " for k in band), style="bold")
        for metric, name, style in GROUP_METRICS:
            low, high = ranges[metric]
            text.append("\n" + name.rjust(prefix - 1) + " ")
            for key in band:
                value = groups[key].get(metric)
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    block = " "
                else:
                    block = SPARK[round((value - low) / (high - low) * (len(SPARK) - 1)) if high > low else 0]
                text.append((block * (cell - 1)).rjust(cell - 1) + " ", style=style)
    return text


def heat_strip_lines(count: int, label_width: int, width: int, label: str = "layer") -> int:
    """How many lines :func:`heat_strip` of ``count`` groups (labels ``label_width`` wide) takes."""
    prefix = max(len(label), *(len(name) for _, name, _ in GROUP_METRICS)) + 1
    per_band = max(1, (width - prefix) // (label_width + 1))
    return 1 + len(GROUP_METRICS) + math.ceil(count / per_band) * (1 + len(GROUP_METRICS))


def fit_groups(title: str, groups: Mapping[str, Mapping[str, Any]], label: str, width: int,
               lines: int | None) -> tuple[Any, int] | None:
    """The most detailed view of ``groups`` that fits in ``lines`` terminal lines (``None``: no limit), and
    the lines it takes: one row per group, else side-by-side columns; ``None`` if neither fits."""
    if lines is None or len(groups) + 2 <= lines:
        return bars_table(title, groups, label, width), len(groups) + 2
    view = columns_view(title, groups, label, width, lines - 2)
    if view is None:
        return None
    return view, len(view.plain.splitlines())
