"""Checks shared by the tracker tests: a logged layer x step image shows the run log's values; ``pixels``
decodes a logged PNG.

The colour of each cell is computed here, independently of the sink: matplotlib's viridis colormap at
the run log's value, on 0..1 for the two sparsities and 0..max-so-far for the other metrics. Only the
cell geometry (where a cell lies in the PNG) is taken from :class:`gradtrace.views.live.LayerStepImage`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from gradtrace.views.live import LayerStepHistory


def expected_rgb(value: float, vmax: float, vmin: float = 0.0) -> np.ndarray:
    fraction = (value - vmin) / (vmax - vmin) if vmax > vmin else 0.0
    return np.round(np.asarray(colormaps["viridis"](fraction)[:3]) * 255)


def assert_layer_step_image(logged: np.ndarray, records: Sequence[dict[str, Any]], metric: str) -> None:
    """``logged`` (H x W x 3) is the layer x step image of ``metric`` after the run-log ``records``."""
    history = LayerStepHistory()
    for record in records:
        history.add(record)
    geometry = history.render(metric)  # only for where the cells are
    assert logged.shape[:2] == png_shape(geometry.png)
    layers = sorted({layer for r in records for layer in r["per_layer"]}, key=int)
    assert list(geometry.layers) == layers and list(geometry.steps) == [int(r["step"]) for r in records]
    values = [r["per_layer"][layer][metric] for r in records for layer in layers
              if r["per_layer"][layer].get(metric) is not None]
    # the colour scale is fit to the data: its smallest to largest value, as the image says
    vmin, vmax = min(values), max(values)
    assert (geometry.vmin, geometry.vmax) == (vmin, vmax)
    for record in records:
        for layer in layers:
            value = record["per_layer"][layer].get(metric)
            if value is None or not math.isfinite(value):
                continue
            x, y = geometry.cell_center(layer, int(record["step"]))
            got = logged[y, x, :3].astype(float)
            assert np.abs(got - expected_rgb(value, vmax, vmin)).max() <= 2, (metric, record["step"], layer, value, got)


def png_shape(png: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    width, height = Image.open(io.BytesIO(png)).size
    return height, width


def assert_grid_image(logged: np.ndarray, image: Any, values: Sequence[Sequence[float | None]]) -> None:
    """``logged`` (H x W x 3) shows ``values`` (rows x columns, on 0..1; None blank) in ``image``'s cells.

    ``image`` (a :class:`gradtrace.views.raster.GridImage`) gives only the geometry; the colour is read a
    few pixels inside each cell's top-left corner, clear of the value written at its centre.
    """
    assert logged.shape[:2] == png_shape(image.png)
    assert len(values) == len(image.rows) and all(len(row) == len(image.columns) for row in values)
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            left, top, right, bottom = image.cell_box(r, c)
            x, y = int(left) + 2, int(top) + 2
            assert x < right - 1 and y < bottom - 1, "cells too small to read back"
            expected = np.array([238, 238, 238]) if value is None else expected_rgb(value, 1.0)
            got = logged[y, x, :3].astype(float)
            assert np.abs(got - expected).max() <= 2, (image.rows[r], image.columns[c], value, got)


def pixels(png: bytes | Path) -> np.ndarray:
    image = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png)
    return np.asarray(image.convert("RGB"))
