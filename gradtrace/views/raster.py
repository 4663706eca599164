"""Heatmap images drawn with NumPy and Pillow: fast enough to redraw at every logging step.

The live trackers get a few heatmaps at every logging step (layer x step per metric, layer x kind, layer x
expert). Drawn as matplotlib figures they cost 0.1-0.6 s each, most of it in figure layout, text and the
Agg renderer, while the picture is a grid of coloured cells with labels. Here the picture is drawn as one
byte per pixel, an index into a 256-colour palette (:data:`PALETTE`: the colormap, white, the blank-cell
grey and 15 shades of ink for antialiased text), and written as a palette PNG: a third of the bytes of an
RGB one to filter and compress, and a third to read back for the trackers that decode it
(``benchmarks/live_charts.py`` and ``benchmarks/logging_step.py`` measure it). The static report keeps
matplotlib, where its layout matters more than its speed.

The palette holds the colormap's 256 colours less 17 that it merges with a neighbour differing by at
most 1 in each channel, so a cell reads within 1/255 of ``matplotlib``'s own colour for its value. A
grid with values written in its cells (``annotate``: at most 200 cells) is the exception: its text is
blended over each cell's colour, which no fixed palette holds, so it is written as an RGB PNG.

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
WHITE = (255, 255, 255)
BLANK = (238, 238, 238)  # no value for that cell (no such matrix in that layer, nothing logged yet)
INK = (40, 40, 40)
INK_LEVELS = 15  # shades of ink over white for antialiased text (and 0, white): no eye tells 15 from 255
_TOP, _BOTTOM_MIN, _RIGHT = 45, 45, 110  # pixels: title, x labels, colour bar and its labels
_BAR_W, _BAR_GAP = 15, 15
_MAX_ROW_LABELS, _MAX_COLUMN_LABELS = 32, 12  # past these, every n-th label only (readable at any depth)
# zlib level of the PNGs. Level 3 cost least for the four images of benchmarks/logging_step.py's 24-layer
# model (48 kB): encoding them, W&B decoding them, and TensorBoard's checksum of their bytes (pure Python
# without TensorFlow: 0.1-0.2 ms per kB). Level 1 wrote 59 kB in the same time, level 6 36 kB in three times it.
COMPRESS_LEVEL = 3


@dataclass(frozen=True)
class Palette:
    """The 256 colours of the live images and where each kind of pixel sits in them."""

    colours: Any  # (256, 3) uint8
    colormap: Any  # (256,) uint8: the slot of each of the colormap's 256 entries
    white: int
    blank: int
    ink: Any  # (INK_LEVELS + 1,) uint8: the slot of each ink level, 0 (white) to INK_LEVELS (INK)
    # (256, INK_LEVELS + 1) uint8: a slot with text of each ink level written over it. White and ink slots
    # take the darker of the two; the others (cells, colour bar) stay as they are.
    inked: Any


@functools.lru_cache(maxsize=1)
def palette() -> Palette:
    """The palette (built once): the colormap in its first slots, then white, blank and the ink shades."""
    import numpy as np
    from matplotlib import colormaps

    lut = colormaps[CMAP](np.arange(256), bytes=True)[:, :3].astype(np.int16)  # integer input: the LUT itself
    slots = 256 - (2 + INK_LEVELS)  # left for the colormap
    # Merge the closest neighbours (each entry at most once) until the colormap fits in its slots.
    distance = np.abs(np.diff(lut, axis=0)).max(axis=1)
    joined = np.zeros(256, dtype=bool)  # joined[i]: entry i shares entry i-1's slot
    for i in np.argsort(distance, kind="stable"):
        if joined.sum() == 256 - slots:
            break
        if not joined[i] and not joined[i + 1] and (i + 2 > 255 or not joined[i + 2]):
            joined[i + 1] = True
    slot_of = (np.cumsum(~joined) - 1).astype(np.uint8)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:slots] = lut[~joined]  # a merged slot keeps its first entry's colour
    white, blank = slots, slots + 1
    colours[white], colours[blank] = WHITE, BLANK
    ink = np.array([white, *range(slots + 2, 256)], dtype=np.uint8)
    shades = np.linspace(0.0, 1.0, INK_LEVELS + 1)[1:, None]
    colours[slots + 2:] = np.rint((1 - shades) * np.array(WHITE) + shades * np.array(INK))
    inked = np.repeat(np.arange(256, dtype=np.uint8)[:, None], INK_LEVELS + 1, axis=1)
    levels = np.arange(INK_LEVELS + 1)
    for level, slot in enumerate(ink):
        inked[slot] = ink[np.maximum(level, levels)]
    return Palette(colours, slot_of, white, blank, ink, _read_only(inked))


@dataclass(frozen=True)
class GridImage:
    """A rendered heatmap and where its cells are, in PNG pixels (origin top left)."""

    png: bytes
    rows: tuple[str, ...]  # top to bottom
    columns: tuple[str, ...]  # left to right
    box: tuple[float, float, float, float]  # cell area: left, top, right, bottom
    vmin: float
    vmax: float
    # The picture as drawn, for trackers that take pixels without decoding the PNG: (height, width) palette
    # slots (:func:`palette`), or (height, width, 3) RGB for an annotated grid.
    canvas: Any = field(repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.canvas.shape[0], self.canvas.shape[1]

    @property
    def pixels(self) -> Any:
        """The picture as an (height, width, 3) uint8 RGB array (what the PNG decodes to)."""
        return self.canvas if self.canvas.ndim == 3 else palette().colours[self.canvas]

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


@functools.lru_cache(maxsize=4096)
def text_width(text: str, size: int) -> float:
    """Width of ``text`` at ``size`` in pixels (the labels repeat from one logging step to the next)."""
    return font(size).getlength(text)


def percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def colormap_entries(fractions: Any) -> Any:
    """The colormap's LUT entry (0..255) of each fraction in 0..1, as ``matplotlib`` picks it."""
    import numpy as np

    return np.minimum((np.clip(fractions, 0.0, 1.0) * 256).astype(np.intp), 255)


def draw_grid(values: Any, rows: Sequence[str], columns: Sequence[str], *, title: str, width: int, height: int,
              vmin: float = 0.0, vmax: float = 1.0, row_label: str = "layer", column_label: str = "",
              vertical_columns: bool = False, annotate: bool = False) -> GridImage:
    """Draw ``values`` (rows x columns; NaN / inf blank) in a ``width`` x ``height`` pixel cell area.

    Args:
        vertical_columns: write column labels top to bottom (long names: module kinds); else centred.
        annotate: write each value in % in its cell (small grids only).
    """
    import numpy as np

    colours = palette()
    data = np.asarray(values, dtype=float).reshape(len(rows), len(columns))
    row_labels_w = max((text_width(r, 10) for r in rows), default=0)
    left = int(max(45, row_labels_w + 14))
    column_labels_h = (max((text_width(c, 10) for c in columns), default=0) + 8) if vertical_columns else 16
    bottom = int(max(_BOTTOM_MIN, column_labels_h + 22))
    canvas = np.full((_TOP + height + bottom, left + width + _RIGHT), colours.white, dtype=np.uint8)

    span = vmax - vmin if vmax > vmin else 1.0
    cells = colours.colormap[colormap_entries(np.nan_to_num((data - vmin) / span))]
    cells[~np.isfinite(data)] = colours.blank
    # Pixel y (x) of the cell area belongs to row floor(y * rows / height): cells as equal as pixels allow.
    row_of = np.arange(height) * len(rows) // height
    column_of = np.arange(width) * len(columns) // width
    canvas[_TOP:_TOP + height, left:left + width] = cells[row_of][:, column_of]
    bar_left = left + width + _BAR_GAP
    canvas[_TOP:_TOP + height, bar_left:bar_left + _BAR_W] = colours.colormap[
        colormap_entries(np.linspace(1.0, 0.0, height))][:, None]

    ink = colours.ink[INK_LEVELS]
    _outline(canvas, left - 1, _TOP - 1, left + width, _TOP + height, ink)
    _outline(canvas, bar_left - 1, _TOP - 1, bar_left + _BAR_W, _TOP + height, ink)
    write(canvas, (left + width / 2, _TOP / 2), title, size=12, anchor="mm")
    cell_w, cell_h = width / len(columns), height / len(rows)
    every = max(1, math.ceil(len(rows) / _MAX_ROW_LABELS))
    for row in range(0, len(rows), every):
        write(canvas, (left - 5, _TOP + (row + 0.5) * cell_h), rows[row], size=10, anchor="rm")
    write(canvas, (left - 5, _TOP - 4), row_label, size=11, anchor="rb")
    every = 1 if vertical_columns else max(1, math.ceil(len(columns) / _MAX_COLUMN_LABELS))
    for column in range(0, len(columns), every):
        x = int(left + (column + 0.5) * cell_w)
        canvas[_TOP + height:_TOP + height + 4, x] = ink
        if vertical_columns:
            write(canvas, (x, _TOP + height + 5), columns[column], size=10, anchor="lm", vertical=True)
        else:
            write(canvas, (x, _TOP + height + 5), columns[column], size=10, anchor="mt")
    if column_label:
        write(canvas, (left + width / 2, canvas.shape[0] - 6), column_label, size=11, anchor="mb")
    for fraction in np.linspace(0.0, 1.0, 5):
        y = _TOP + (1.0 - fraction) * (height - 1)
        canvas[int(y), bar_left + _BAR_W:bar_left + _BAR_W + 4] = ink
        write(canvas, (bar_left + _BAR_W + 6, y), percent(vmin + fraction * (vmax - vmin)), size=10, anchor="lm")
    box = (float(left), float(_TOP), float(left + width), float(_TOP + height))
    if annotate:
        return _annotated(colours.colours[canvas], data, rows, columns, box, vmin, vmax)
    return GridImage(png=png_of(canvas), rows=tuple(rows), columns=tuple(columns), box=box, vmin=vmin, vmax=vmax,
                     canvas=_read_only(canvas))


def _annotated(pixels: Any, data: Any, rows: Sequence[str], columns: Sequence[str],
               box: tuple[float, float, float, float], vmin: float, vmax: float) -> GridImage:
    """``pixels`` (RGB) with each finite value written in % in its cell, dark on light cells, as an RGB PNG."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(pixels)
    left, top, right, bottom = box
    cell_w, cell_h = (right - left) / len(columns), (bottom - top) / len(rows)
    for (row, column), value in np.ndenumerate(data):
        if math.isfinite(value):
            x, y = left + (column + 0.5) * cell_w, top + (row + 0.5) * cell_h
            red, green, blue = (int(c) for c in pixels[int(y), int(x)])
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 127  # dark text on light cells
            mask, dx, dy = _text_mask(f"{100 * value:.0f}", 10, "mm", False)
            image.paste((0, 0, 0) if light else (255, 255, 255), (round(x) + dx, round(y) + dy), mask)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=COMPRESS_LEVEL)
    return GridImage(png=buffer.getvalue(), rows=tuple(rows), columns=tuple(columns), box=box, vmin=vmin, vmax=vmax,
                     canvas=_read_only(np.asarray(image)))


def png_of(canvas: Any) -> bytes:
    """A palette PNG of ``canvas`` (palette slots, :func:`palette`)."""
    from PIL import Image

    image = Image.fromarray(canvas)  # mode L; with a palette, mode P
    image.putpalette(palette().colours.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=COMPRESS_LEVEL)
    return buffer.getvalue()


def _read_only(array: Any) -> Any:
    array.flags.writeable = False  # shared by every tracker of the step
    return array


def _outline(canvas: Any, left: int, top: int, right: int, bottom: int, slot: int) -> None:
    """A one-pixel rectangle outline, corners included (Pillow's ``rectangle(outline=)``)."""
    canvas[top, left:right + 1] = canvas[bottom, left:right + 1] = slot
    canvas[top:bottom + 1, left] = canvas[top:bottom + 1, right] = slot


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int, anchor: str, vertical: bool) -> tuple[Any, int, int]:
    """``text`` rendered once as a coverage mask (a Pillow "L" image), and its offset from the anchor point.

    The labels (layers, kinds, steps, the values written in cells) repeat from one logging step to the
    next; rendering each through FreeType again was most of a heatmap's drawing time.
    """
    from PIL import Image, ImageDraw

    if not vertical and anchor[0] in _ALONG and anchor[1] in _ACROSS and text.count(" ") >= _MIN_SPACES:
        return _words_mask(text, size, anchor)
    text_font = font(size)
    left, top, right, bottom = text_font.getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=text_font, anchor=anchor)
    if vertical:  # read top to bottom, hanging from the anchor point
        mask = mask.rotate(-90, expand=True)
        return mask, -mask.width // 2, 0
    return mask, left, top


_ALONG, _ACROSS = "lmr", "ms"  # the anchors _words_mask places (left / middle / right; middle / baseline)
_MIN_SPACES = 3  # titles: their step and colour range change at every logging step, most words do not


def _words_mask(text: str, size: int, anchor: str) -> tuple[Any, int, int]:
    """``text`` as :func:`_text_mask` makes it, put together from its words' cached masks.

    A title names the step and the colour range, so it is new at every logging step, and FreeType took
    3-4 ms to render one: its words, most of them the same at every step, are rendered once each and
    laid out at the font's advance widths (Pillow's own layout, less kerning across spaces: a pixel at most).
    """
    from PIL import Image

    placed, x, space = [], 0.0, text_width(" ", size)
    for word in text.split(" "):
        if word:
            mask, left, top = _text_mask(word, size, "ls", False)
            placed.append((mask, round(x) + left, top))
        x += text_width(word, size) + space
    advance = x - space
    x0, y0 = min(left for _, left, _ in placed), min(top for _, _, top in placed)
    x1 = max(left + mask.width for mask, left, _ in placed)
    y1 = max(top + mask.height for mask, _, top in placed)
    line = Image.new("L", (x1 - x0, y1 - y0), 0)
    for mask, left, top in placed:
        line.paste(255, (left - x0, top - y0), mask)
    shift_x = {"l": 0.0, "m": -advance / 2, "r": -advance}[anchor[0]]
    return line, x0 + math.floor(shift_x), y0 + _baseline_below(size, anchor[1])


@functools.lru_cache(maxsize=64)
def _baseline_below(size: int, across: str) -> int:
    """How far below a vertical anchor (``across``: Pillow's "m", "s"...) the baseline lies, in pixels."""
    text_font = font(size)
    return text_font.getbbox("x", anchor=f"l{across}")[1] - text_font.getbbox("x", anchor="ls")[1]


@functools.lru_cache(maxsize=4096)
def _ink_mask(text: str, size: int, anchor: str, vertical: bool) -> tuple[Any, int, int]:
    """:func:`_text_mask` as ink levels (0..:data:`INK_LEVELS`, a uint8 array), and its offset."""
    import numpy as np

    mask, left, top = _text_mask(text, size, anchor, vertical)
    levels = (np.asarray(mask, dtype=np.uint16) * INK_LEVELS + 127) // 255
    return _read_only(levels.astype(np.intp)), left, top


def write(canvas: Any, xy: tuple[float, float], text: str, *, size: int, anchor: str = "la",
          vertical: bool = False) -> None:
    """Write ``text`` in ink at ``xy`` (Pillow's ``anchor``; ``vertical``: top to bottom, hanging from ``xy``)
    on ``canvas`` (palette slots), from the cached mask.

    Only white and ink pixels take it (each keeps the darker of its ink and the text's): text never
    covers a cell or the colour bar.
    """
    levels, left, top = _ink_mask(text, size, anchor, vertical)
    x0, y0 = round(xy[0]) + left, round(xy[1]) + top
    x1, y1 = min(x0 + levels.shape[1], canvas.shape[1]), min(y0 + levels.shape[0], canvas.shape[0])
    if x0 < 0 or y0 < 0:  # clipped on the left / top: the part of the mask inside the canvas
        levels, x0, y0 = levels[max(0, -y0):, max(0, -x0):], max(0, x0), max(0, y0)
    if x1 <= x0 or y1 <= y0:
        return
    region = canvas[y0:y1, x0:x1]
    region[:] = palette().inked[region, levels[:y1 - y0, :x1 - x0]]


def grid_image(grid: Any, *, title: str, column_label: str, vertical_columns: bool = False) -> GridImage:
    """A :class:`gradtrace.views.run_data.Grid` (layer x kind, layer x expert) on 0..100%, values written in
    the cells while there are at most 200."""
    rows, columns = len(grid.rows), len(grid.columns)
    values = [[math.nan if v is None else v for v in row] for row in grid.values]
    return draw_grid(values, grid.rows, grid.columns, title=title, column_label=column_label,
                     vertical_columns=vertical_columns, annotate=rows * columns <= 200,
                     width=max(240, min(42 * columns, 900)), height=max(120, min(26 * rows, 900)))
