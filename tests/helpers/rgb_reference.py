"""An independent RGB drawing of a live heatmap, to check :mod:`gradtrace.views.raster` against.

It draws the picture the straightforward way, with nothing cached: a white RGB canvas, each cell in
matplotlib's viridis at its value, every label through Pillow's ``ImageDraw.text`` in the ink colour (full
antialiasing, no palette). Only the layout constants and rules are shared with the renderer (where a title
or a tick goes), so a stale cache, a wrong palette slot or a misplaced word shows as a difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from gradtrace.views.raster import (
    _BAR_GAP,
    _BAR_W,
    _BOTTOM_MIN,
    _MAX_COLUMN_LABELS,
    _MAX_ROW_LABELS,
    _RIGHT,
    _TOP,
    BLANK,
    INK,
    font,
    percent,
)


def draw_rgb(values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], *, title: str, width: int,
             height: int, vmin: float = 0.0, vmax: float = 1.0, row_label: str = "layer", column_label: str = "",
             vertical_columns: bool = False) -> np.ndarray:
    """The (height, width, 3) uint8 picture :func:`gradtrace.views.raster.draw_grid` draws (no annotation)."""
    data = np.asarray(values, dtype=float).reshape(len(rows), len(columns))
    small = font(10)
    left = int(max(45, max((small.getlength(r) for r in rows), default=0) + 14))
    labels_h = (max((small.getlength(c) for c in columns), default=0) + 8) if vertical_columns else 16
    bottom = int(max(_BOTTOM_MIN, labels_h + 22))
    canvas = np.full((_TOP + height + bottom, left + width + _RIGHT, 3), 255, dtype=np.uint8)
    cmap = colormaps["viridis"]
    span = vmax - vmin if vmax > vmin else 1.0
    cells = cmap(np.clip(np.nan_to_num((data - vmin) / span), 0.0, 1.0), bytes=True)[..., :3]
    cells[~np.isfinite(data)] = BLANK
    canvas[_TOP:_TOP + height, left:left + width] = cells[np.arange(height) * len(rows) // height][
        :, np.arange(width) * len(columns) // width]
    bar_left = left + width + _BAR_GAP
    canvas[_TOP:_TOP + height, bar_left:bar_left + _BAR_W] = cmap(np.linspace(1.0, 0.0, height), bytes=True)[:, None, :3]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)

    def text(xy: tuple[float, float], words: str, size: int, anchor: str) -> None:
        draw.text((round(xy[0]), round(xy[1])), words, fill=INK, font=font(size), anchor=anchor)

    draw.rectangle((left - 1, _TOP - 1, left + width, _TOP + height), outline=INK)
    draw.rectangle((bar_left - 1, _TOP - 1, bar_left + _BAR_W, _TOP + height), outline=INK)
    text((left + width / 2, _TOP / 2), title, 12, "mm")
    cell_w, cell_h = width / len(columns), height / len(rows)
    for row in range(0, len(rows), max(1, math.ceil(len(rows) / _MAX_ROW_LABELS))):
        text((left - 5, _TOP + (row + 0.5) * cell_h), rows[row], 10, "rm")
    text((left - 5, _TOP - 4), row_label, 11, "rb")
    every = 1 if vertical_columns else max(1, math.ceil(len(columns) / _MAX_COLUMN_LABELS))
    for column in range(0, len(columns), every):
        x = int(left + (column + 0.5) * cell_w)
        draw.line((x, _TOP + height, x, _TOP + height + 3), fill=INK)
        if vertical_columns:
            box = small.getbbox(columns[column], anchor="lm")
            label = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
            ImageDraw.Draw(label).text((-box[0], -box[1]), columns[column], fill=255, font=small, anchor="lm")
            label = label.rotate(-90, expand=True)  # reads top to bottom, hanging from the tick
            image.paste(INK, (x - (label.width + 1) // 2, _TOP + height + 5), label)  # centred, odd widths leftwards
        else:
            text((x, _TOP + height + 5), columns[column], 10, "mt")
    if column_label:
        text((left + width / 2, image.height - 6), column_label, 11, "mb")
    for fraction in np.linspace(0.0, 1.0, 5):
        y = _TOP + (1.0 - fraction) * (height - 1)
        draw.line((bar_left + _BAR_W, int(y), bar_left + _BAR_W + 3, int(y)), fill=INK)
        text((bar_left + _BAR_W + 6, y), percent(vmin + fraction * (vmax - vmin)), 10, "lm")
    return np.asarray(image)
