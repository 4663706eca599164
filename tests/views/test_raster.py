"""The live heatmaps as palette PNGs with cached text: the same picture as an independent RGB drawing of the
same data, at every step of a run (so no cache goes stale), and a changed value changes its cell."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib import colormaps
from PIL import Image

from gradtrace.views import raster
from gradtrace.views.live import LayerStepHistory
from gradtrace.views.raster import INK_LEVELS, draw_grid, palette
from tests.helpers.rgb_reference import draw_rgb
from tests.helpers.tracker_checks import expected_rgb

INK_STEP = math.ceil(255 / INK_LEVELS / 2)  # text antialiasing in INK_LEVELS shades: half a shade apart at most
KINDS = ["embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"]


def decoded(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "P"  # a palette PNG, not RGB
    return np.asarray(image.convert("RGB"))


def run_values(layers: int, steps: int) -> dict[int, dict[str, float]]:
    """A per-layer metric over a run: a different value for each layer and step."""
    return {step: {str(layer): 0.9 / (1 + 0.1 * step) + 0.003 * layer for layer in range(layers)}
            for step in range(1, steps + 1)}


def assert_same_picture(png: bytes, reference: np.ndarray) -> None:
    """``png`` shows ``reference``: the same size, every pixel within half an ink shade, the cells and
    colour bar within 1 (the palette's merged colormap neighbours)."""
    shown = decoded(png).astype(int)
    assert shown.shape == reference.shape
    difference = np.abs(shown - reference.astype(int)).max(axis=2)
    assert difference.max() <= INK_STEP, np.argwhere(difference > INK_STEP)[:5]
    assert (difference > 1).mean() < 0.02  # only antialiased text edges differ by more than 1


def test_the_palette_holds_the_colormap_within_1():
    colours = palette()
    lut = colormaps["viridis"](np.arange(256), bytes=True)[:, :3].astype(int)
    assert np.abs(colours.colours[colours.colormap].astype(int) - lut).max() <= 1
    assert len(set(colours.colormap.tolist())) + 2 + INK_LEVELS == 256
    assert colours.colours[colours.ink[INK_LEVELS]].tolist() == list(raster.INK)


def test_each_step_of_a_run_matches_a_fresh_rgb_drawing():
    """At every logging step (titles, steps and the colour range new each time, most labels cached from the
    steps before) the palette PNG is the picture the reference draws from nothing."""
    history = LayerStepHistory(max_columns=12)
    for step, per_layer in run_values(layers=20, steps=30).items():
        history.add({"step": step, "per_layer": {layer: {"update_sparsity": v} for layer, v in per_layer.items()}})
        image = history.render("update_sparsity")
        data = [[history.value(layer, s, "update_sparsity") for s in image.steps] for layer in image.layers]
        title = (f"update sparsity per layer, steps {image.steps[0]} to {image.steps[-1]} "
                 f"(colour: {raster.percent(image.vmin)} to {raster.percent(image.vmax)})")
        reference = draw_rgb(data, image.layers, [str(s) for s in image.steps], title=title, width=600, height=280,
                             vmin=image.vmin, vmax=image.vmax, column_label="step")
        assert_same_picture(image.png, reference)
        assert np.array_equal(image.pixels, decoded(image.png))  # what the trackers that take pixels get


def test_a_layer_x_kind_grid_with_blank_cells_matches_a_fresh_rgb_drawing():
    rng = np.random.default_rng(0)
    values = rng.random((25, len(KINDS)))
    values[:24, [0, -1]] = math.nan  # embed, lm_head: no such matrix inside a layer
    rows = [str(i) for i in range(24)] + ["outside"]
    for step in (1, 2):
        title = f"update sparsity at step {step}"
        image = draw_grid(values, rows, KINDS, title=title, width=420, height=650, column_label="module kind",
                          vertical_columns=True)
        reference = draw_rgb(values, rows, KINDS, title=title, width=420, height=650, column_label="module kind",
                             vertical_columns=True)
        assert_same_picture(image.png, reference)


def test_a_changed_value_changes_its_cell_and_only_there():
    rows, columns = [str(i) for i in range(12)], [str(s) for s in range(1, 21)]
    values = np.linspace(0.0, 1.0, len(rows) * len(columns)).reshape(len(rows), len(columns))
    first = draw_grid(values, rows, columns, title="update sparsity", width=600, height=240)
    changed = values.copy()
    changed[5, 7] = 0.0 if values[5, 7] > 0.5 else 1.0
    second = draw_grid(changed, rows, columns, title="update sparsity", width=600, height=240)
    before, after = decoded(first.png), decoded(second.png)
    left, top, right, bottom = (round(v) for v in first.cell_box(5, 7))
    differs = np.argwhere(np.any(before != after, axis=2))
    assert len(differs) == (right - left) * (bottom - top)  # every pixel of that cell, none elsewhere
    assert differs[:, 0].min() == top and differs[:, 0].max() == bottom - 1
    assert differs[:, 1].min() == left and differs[:, 1].max() == right - 1
    centre = after[(top + bottom) // 2, (left + right) // 2].astype(float)
    assert np.abs(centre - expected_rgb(changed[5, 7], 1.0)).max() <= 1
