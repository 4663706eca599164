"""Heatmap images drawn with NumPy and Pillow: fast enough to redraw at every logging step.

The live trackers get a few heatmaps at every logging step (layer x step per metric, layer x kind, layer x
expert). Drawn as matplotlib figures they cost 0.1-0.6 s each, most of it in figure layout, text and the
Agg renderer, while the picture is a grid of coloured cells with labels. Here the cells are an array
indexed into the colormap's own lookup table, the labels are Pillow text, and the PNG is written with
fast compression: a few tens of milliseconds (``benchmarks/live_charts.py`` measures both). The static
report keeps matplotlib, where its layout matters more than its speed.

:class:`GridImage` says where each cell lies in the PNG, so a test (or a user) can read a colour back.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CMAP = "viridis"
BLANK = (238, 238, 238)  # no value for that cell (no such matrix in that layer, nothing logged yet)
INK = (40, 40, 40)
_TOP, _BOTTOM_MIN, _RIGHT = 45, 45, 110  # pixels: title, x labels, colour bar and its labels
_BAR_W, _BAR_GAP = 15, 15
_MAX_ROW_LABELS, _MAX_COLUMN_LABELS = 32, 12  # past these, every n-th label only (readable at any depth)


@dataclass(frozen=True)
class GridImage:
    """A rendered heatmap and where its cells are, in PNG pixels (origin top left)."""

    png: bytes
    rows: tuple[str, ...]  # top to bottom
    columns: tuple[str, ...]  # left to right
    box: tuple[float, float, float, float]  # cell area: left, top, right, bottom
    vmin: float
    vmax: float
    # The same picture as an (height, width, 3) uint8 array: trackers that take pixels get them without
    # decoding the PNG again (one decode per tracker and image was a third of a logging step's cost).
    pixels: Any = field(repr=False, compare=False)

    def cell_box(self, row: int, column: int) -> tuple[float, float, float, float]:
        """Pixel box (left, top, right, bottom) of the cell at ``row``, ``column`` (indices)."""
        left, top, right, bottom = self.box
        width, height = (right - left) / len(self.columns), (bottom - top) / len(self.rows)
        return left + column * width, top + row * height, left + (column + 1) * width, top + (row + 1) * height


@functools.lru_cache(maxsize=8)
def font(size: int) -> Any:
    """Pillow's font at ``size`` (loaded once: loading it took a millisecond per label)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):  # an old Pillow, or one built without FreeType
        return ImageFont.load_default()


def percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def draw_grid(values: Any, rows: Sequence[str], columns: Sequence[str], *, title: str, width: int, height: int,
              vmin: float = 0.0, vmax: float = 1.0, row_label: str = "layer", column_label: str = "",
              vertical_columns: bool = False, annotate: bool = False) -> GridImage:
    """Draw ``values`` (rows x columns; NaN / inf blank) in a ``width`` x ``height`` pixel cell area.

    Args:
        vertical_columns: write column labels top to bottom (long names: module kinds); else centred.
        annotate: write each value in % in its cell (small grids only).
    """
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    data = np.asarray(values, dtype=float).reshape(len(rows), len(columns))
    small = font(10)
    row_labels_w = max((small.getlength(r) for r in rows), default=0)
    left = int(max(45, row_labels_w + 14))
    column_labels_h = (max((small.getlength(c) for c in columns), default=0) + 8) if vertical_columns else 16
    bottom = int(max(_BOTTOM_MIN, column_labels_h + 22))
    canvas = np.full((_TOP + height + bottom, left + width + _RIGHT, 3), 255, dtype=np.uint8)

    cmap = colormaps[CMAP]
    span = vmax - vmin if vmax > vmin else 1.0
    cells = cmap(np.clip(np.nan_to_num((data - vmin) / span), 0.0, 1.0), bytes=True)[..., :3]
    cells[~np.isfinite(data)] = BLANK
    # Pixel y (x) of the cell area belongs to row floor(y * rows / height): cells as equal as pixels allow.
    row_of = np.arange(height) * len(rows) // height
    column_of = np.arange(width) * len(columns) // width
    canvas[_TOP:_TOP + height, left:left + width] = cells[row_of][:, column_of]
    bar_left = left + width + _BAR_GAP
    canvas[_TOP:_TOP + height, bar_left:bar_left + _BAR_W] = cmap(np.linspace(1.0, 0.0, height), bytes=True)[:, None, :3]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, _TOP - 1, left + width, _TOP + height), outline=INK)
    draw.rectangle((bar_left - 1, _TOP - 1, bar_left + _BAR_W, _TOP + height), outline=INK)
    write(image, (left + width / 2, _TOP / 2), title, size=12, anchor="mm")
    cell_w, cell_h = width / len(columns), height / len(rows)
    every = max(1, math.ceil(len(rows) / _MAX_ROW_LABELS))
    for row in range(0, len(rows), every):
        write(image, (left - 5, _TOP + (row + 0.5) * cell_h), rows[row], size=10, anchor="rm")
    write(image, (left - 5, _TOP - 4), row_label, size=11, anchor="rb")
    every = 1 if vertical_columns else max(1, math.ceil(len(columns) / _MAX_COLUMN_LABELS))
    for column in range(0, len(columns), every):
        x = left + (column + 0.5) * cell_w
        draw.line((x, _TOP + height, x, _TOP + height + 3), fill=INK)
        if vertical_columns:
            _vertical_text(image, columns[column], (x, _TOP + height + 5), 10)
        else:
            write(image, (x, _TOP + height + 5), columns[column], size=10, anchor="mt")
    if column_label:
        write(image, (left + width / 2, image.height - 6), column_label, size=11, anchor="mb")
    for fraction in np.linspace(0.0, 1.0, 5):
        y = _TOP + (1.0 - fraction) * (height - 1)
        draw.line((bar_left + _BAR_W, y, bar_left + _BAR_W + 3, y), fill=INK)
        write(image, (bar_left + _BAR_W + 6, y), percent(vmin + fraction * (vmax - vmin)), size=10, anchor="lm")
    if annotate:
        for (row, column), value in np.ndenumerate(data):
            if math.isfinite(value):
                red, green, blue = (int(c) for c in cells[row, column])
                light = 0.299 * red + 0.587 * green + 0.114 * blue > 127  # dark text on light cells
                write(image, (left + (column + 0.5) * cell_w, _TOP + (row + 0.5) * cell_h), f"{100 * value:.0f}",
                      size=10, anchor="mm", fill=(0, 0, 0) if light else (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: these images are re-sent at every logging step
    pixels = np.asarray(image)
    pixels.flags.writeable = False  # shared by every tracker of the step
    return GridImage(png=buffer.getvalue(), rows=tuple(rows), columns=tuple(columns),
                     box=(float(left), float(_TOP), float(left + width), float(_TOP + height)), vmin=vmin, vmax=vmax,
                     pixels=pixels)


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int, anchor: str, vertical: bool) -> tuple[Any, int, int]:
    """``text`` rendered once as a coverage mask, and its offset from the anchor point.

    The labels (layers, kinds, steps, the values written in cells) repeat from one logging step to the
    next; rendering each through FreeType again was most of a heatmap's drawing time.
    """
    from PIL import Image, ImageDraw

    text_font = font(size)
    left, top, right, bottom = text_font.getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=text_font, anchor=anchor)
    if vertical:  # read top to bottom, hanging from the anchor point
        mask = mask.rotate(-90, expand=True)
        return mask, -mask.width // 2, 0
    return mask, left, top


def write(image: Any, xy: tuple[float, float], text: str, *, size: int, anchor: str = "la",
          fill: tuple[int, int, int] = INK) -> None:
    """Write ``text`` at ``xy`` (Pillow's ``anchor``) in ``fill``, from the cached mask."""
    mask, left, top = _text_mask(text, size, anchor, False)
    image.paste(fill, (round(xy[0]) + left, round(xy[1]) + top), mask)


def _vertical_text(image: Any, text: str, top_center: tuple[float, float], size: int) -> None:
    """Write ``text`` rotated to read top to bottom, centred on ``top_center``'s x, starting at its y."""
    mask, left, top = _text_mask(text, size, "lm", True)
    image.paste(INK, (round(top_center[0]) + left, round(top_center[1]) + top), mask)


def grid_image(grid: Any, *, title: str, column_label: str, vertical_columns: bool = False) -> GridImage:
    """A :class:`gradtrace.views.run_data.Grid` (layer x kind, layer x expert) on 0..100%, values written in
    the cells while there are at most 200."""
    rows, columns = len(grid.rows), len(grid.columns)
    values = [[math.nan if v is None else v for v in row] for row in grid.values]
    return draw_grid(values, grid.rows, grid.columns, title=title, column_label=column_label,
                     vertical_columns=vertical_columns, annotate=rows * columns <= 200,
                     width=max(240, min(42 * columns, 900)), height=max(120, min(26 * rows, 900)))
