"""``gradtrace report``: the HTML report and PNGs made from real tiny traced runs' logs.

Numbers the report shows are read back out of the HTML and compared with the run log; the layer x kind
grid is checked against the masks file, counted directly; the PNGs are opened and must not be blank.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradtrace import load_masks, read_run_log
from gradtrace.anatomy.naming import kind_of, layer_of
from gradtrace.cli import main as cli_main
from gradtrace.views.report import layer_step_images, write_report
from gradtrace.views.run_data import OUTSIDE_LAYERS, evolution_steps, layer_kind_grid, load_run, run_label
from tests.helpers.traced_runs import traced_run

LAYER_STEP = ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed")
# matplotlib's default cycle: the first run is drawn in C0, the second in C1.
C0, C1 = (31, 119, 180), (255, 127, 14)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two contrasting runs: bf16 with a small lr (sparse updates), fp32 with a large one (dense)."""
    root = tmp_path_factory.mktemp("runs")
    sparse = traced_run(root / "run-a", dtype=torch.bfloat16, lr=1e-5, tokens=32, label="grpo-like")
    dense = traced_run(root / "sft", dtype=torch.float32, lr=1e-3, tokens=48)
    return sparse, dense


class Page(HTMLParser):
    """Tables (by id: rows of ``(attrs, text)`` cells) and images of the report."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self.images: list[dict] = []
        self.sources: list[str] = []
        self._table: list | None = None
        self._cell: tuple[dict, list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.sources.append(attrs[key])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = (attrs, [])
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append((self._cell[0], "".join(self._cell[1])))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def rgb(png: bytes | Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("RGB"))


def has_color(image: np.ndarray, color: tuple[int, int, int], tolerance: int = 3) -> bool:
    return bool((np.abs(image.astype(int) - np.array(color)).max(axis=-1) <= tolerance).any())


def final_record(run_dir: Path) -> dict:
    return read_run_log(run_dir)["logs"][-1]


def assert_matrix_table_equals(rows: list[list[tuple[dict, str]]], per_matrix: dict) -> None:
    """Each shown fraction equals the run log's value exactly (``data-value``) and is shown as that %."""
    header = [text for _, text in rows[0]]
    assert header[:4] == ["name", "layer", "kind", "numel"]
    body = {cells[0][1]: cells for cells in rows[1:]}
    assert list(body) == list(per_matrix)  # one row per matrix, in model order
    for name, values in per_matrix.items():
        cells = dict(zip(header, body[name], strict=True))
        assert cells["layer"][1] == ("—" if layer_of(name) is None else str(layer_of(name)))
        assert cells["kind"][1] == kind_of(name)
        assert int(cells["numel"][0]["data-value"]) == values["numel"]
        for metric, value in values.items():
            if metric == "numel":
                continue
            attrs, text = cells[metric]
            assert float(attrs["data-value"]) == value, (name, metric)
            assert text == f"{100 * value:.3f}%"


def test_two_run_report_from_the_cli(runs, tmp_path, capsys):
    sparse, dense = runs
    assert cli_main(["report", str(sparse), str(dense), "-o", str(tmp_path / "out")]) == 0
    html_path = Path(capsys.readouterr().out.strip())
    assert html_path == tmp_path / "out" / "report.html"
    page = parse(html_path)

    # Self-contained: every image is a data URI, nothing is fetched from anywhere.
    assert page.sources and all(src.startswith("data:image/png;base64,") for src in page.sources)
    expected_pngs = {"curves.png", "breakdown.png", "histogram.png", "heatmap-grpo-like.png", "heatmap-sft.png",
                     "heatmap-diff-sft-vs-grpo-like.png", "evolution-grpo-like.png", "evolution-sft.png",
                     *(f"layer-step-{run}-{metric}.png" for run in ("grpo-like", "sft") for metric in LAYER_STEP)}
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == expected_pngs
    assert {img["data-file"] for img in page.images} == expected_pngs
    for img in page.images:
        embedded = base64.b64decode(img["src"].split(",", 1)[1])
        assert embedded == (tmp_path / "out" / img["data-file"]).read_bytes()  # the PNG beside it
        pixels = rgb(embedded)
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 400, img["data-file"]
        assert pixels.std() > 10 or img.get("data-vmin") == img.get("data-vmax"), f"{img['data-file']} looks blank"
    # Overlaid: both runs are drawn in the curves and the histogram.
    for name in ("curves.png", "histogram.png", "breakdown.png"):
        image = rgb(tmp_path / "out" / name)
        assert has_color(image, C0) and has_color(image, C1), name

    # Labels: info["label"] when given, else the directory name.
    info_header = [text for _, text in page.tables["info"][0]]
    assert info_header[1:] == ["grpo-like", "sft"]

    # The numbers shown equal the run logs.
    finals = [final_record(sparse), final_record(dense)]
    global_rows = {cells[0][1]: cells[1:] for cells in page.tables["global"][1:]}
    for metric in ("gradient_sparsity", "update_sparsity", "update_sparsity_abs_1e-05", "update_sparsity_rel_0.001",
                   "cancelled", "absorbed", "changed_without_gradient"):
        for cell, final in zip(global_rows[metric], finals, strict=True):
            assert float(cell[0]["data-value"]) == final["global"][metric], metric
    for cell, final in zip(global_rows["optimizer_steps"], finals, strict=True):
        assert int(cell[0]["data-value"]) == final["global"]["optimizer_steps"] == 8
    assert_matrix_table_equals(page.tables["matrices-grpo-like"], finals[0]["per_matrix"])
    assert_matrix_table_equals(page.tables["matrices-sft"], finals[1]["per_matrix"])
    # The two runs really differ (else "overlaid" proves nothing).
    assert finals[0]["global"]["update_sparsity"] > 0.5 > finals[1]["global"]["update_sparsity"]


def test_output_may_name_the_html_file(runs, tmp_path, capsys):
    target = tmp_path / "shared" / "grpo-vs-sft.html"
    assert cli_main(["report", str(runs[0]), str(runs[1]), "-o", str(target)]) == 0
    assert Path(capsys.readouterr().out.strip()) == target
    assert target.is_file() and not (target / "report.html").exists()
    assert not (tmp_path / "shared" / "report.html").exists()
    page = parse(target)
    pngs = {p.name for p in target.parent.glob("*.png")}
    assert "curves.png" in pngs and {img["data-file"] for img in page.images} == pngs  # PNGs beside it


def test_layer_kind_grid_equals_masks_counted_directly(runs):
    for run_dir in runs:
        final = json.loads((run_dir / "summary.json").read_text())
        masks = load_masks(run_dir / "masks.safetensors")
        for metric, kind in (("update_sparsity", "update"), ("gradient_sparsity", "gradient")):
            unchanged: dict[tuple[str, str], list[int]] = {}
            for name, mask in masks[kind].items():
                layer = layer_of(name)
                cell = unchanged.setdefault((OUTSIDE_LAYERS if layer is None else str(layer), kind_of(name)), [0, 0])
                cell[0] += int((~mask).sum())
                cell[1] += mask.numel()
            grid = layer_kind_grid(final["per_matrix"], metric)
            assert grid.rows == ["0", "1", OUTSIDE_LAYERS]
            assert grid.columns == ["embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"]
            for row in grid.rows:
                for column in grid.columns:
                    if (row, column) in unchanged:
                        zeros, total = unchanged[(row, column)]
                        assert grid.cell(row, column) == pytest.approx(zeros / total, abs=1e-12), (row, column)
                    else:
                        assert grid.cell(row, column) is None  # e.g. no q projection outside the layers
            assert grid.cell("0", "norm") is not None and grid.cell(OUTSIDE_LAYERS, "norm") is not None


def test_report_of_a_run_still_being_written(runs, tmp_path):
    """No end record, no summary.json, a half-written last line: the report shows the last complete log."""
    source = runs[0]
    live = tmp_path / "live"
    live.mkdir()
    lines = (source / "log.jsonl").read_text().splitlines(keepends=True)
    start_and_two_logs = lines[:3]
    assert [json.loads(line)["event"] for line in start_and_two_logs] == ["start", "log", "log"]
    (live / "log.jsonl").write_text("".join(start_and_two_logs) + lines[3][:50])
    html_path = write_report([live])
    assert html_path == live / "report" / "report.html"
    page = parse(html_path)
    shown = json.loads(start_and_two_logs[-1])
    assert shown["step"] == 4
    assert_matrix_table_equals(page.tables["matrices-grpo-like"], shown["per_matrix"])
    info = {cells[0][1]: cells[1][1] for cells in page.tables["info"][1:]}
    assert info["status"].startswith("running") and info["last step"] == "4"
    image = rgb(live / "report" / "curves.png")
    assert has_color(image, C0) and not has_color(image, C1)  # one run: nothing overlaid


def test_labels_and_errors(tmp_path, runs, capsys):
    trainer_dir = tmp_path / "my-sft-run" / "gradtrace"  # where GradTraceCallback writes by default
    assert run_label(trainer_dir, {}) == "my-sft-run"
    assert run_label(tmp_path / "x", {"label": "grpo"}) == "grpo"
    # Two runs with one name are told apart.
    twin = tmp_path / "twin" / "run-a"
    shutil.copytree(runs[0], twin)
    page = parse(write_report([runs[0], twin], tmp_path / "twins"))
    assert [text for _, text in page.tables["info"][0]][1:] == ["grpo-like", "grpo-like #2"]

    assert cli_main(["report", str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text('{"event": "start", "info": {}}\n')
    with pytest.raises(ValueError, match="has not logged a measurement yet"):
        write_report([tmp_path / "empty"])


def test_evolution_steps_spread_over_the_run():
    assert evolution_steps([2, 4, 6]) == [2, 4, 6]
    assert evolution_steps(list(range(10, 210, 10)), 5) == [10, 60, 110, 150, 200]


def test_grid_cells_weight_matrices_by_numel():
    """Mixture-of-experts: several matrices share a (layer, kind) cell and are weighted by size (the
    routed experts' kind is ``expert.down``, apart from a dense ``down``)."""
    per_matrix = {
        "model.layers.0.mlp.experts.0.down_proj.weight": {"update_sparsity": 0.1, "cancelled": None, "numel": 100},
        "model.layers.0.mlp.experts.1.down_proj.weight": {"update_sparsity": 0.5, "cancelled": 0.25, "numel": 300},
        "model.layers.1.self_attn.q_proj.weight": {"update_sparsity": 1.0, "cancelled": None, "numel": 50},
    }
    grid = layer_kind_grid(per_matrix, "update_sparsity")
    assert grid.rows == ["0", "1"] and grid.columns == ["q", "expert.down"]
    assert grid.cell("0", "expert.down") == pytest.approx((0.1 * 100 + 0.5 * 300) / 400)
    assert grid.cell("1", "q") == 1.0 and grid.cell("0", "q") is None and grid.cell("1", "expert.down") is None
    cancelled = layer_kind_grid(per_matrix, "cancelled")
    assert cancelled.cell("0", "expert.down") == 0.25  # the unknown value is left out, not counted as 0
    assert cancelled.cell("1", "q") is None


def test_layer_step_views_cover_every_layer_and_step_on_the_data_range(runs, tmp_path):
    """One layer x step image per metric and run, every layer and logged step, its colour scale the data's
    smallest to largest per-layer value (as the title says), each cell in the colour of its value."""
    from matplotlib import colormaps

    page = parse(write_report(list(runs), tmp_path))
    for run_dir, label in zip(runs, ("grpo-like", "sft"), strict=True):
        logs = read_run_log(run_dir)["logs"]
        shown = {img["data-metric"]: img for img in page.images if img["data-file"].startswith(f"layer-step-{label}-")}
        assert sorted(shown) == sorted(LAYER_STEP)
        for metric, img in shown.items():
            values = {(layer, r["step"]): v[metric] for r in logs for layer, v in r["per_layer"].items()}
            low, high = min(values.values()), max(values.values())
            assert float(img["data-vmin"]) == low and float(img["data-vmax"]) == high, (label, metric)
            assert f"colour scale {100 * low:.2f}% to {100 * high:.2f}%" in img["title"]
            pixels = rgb(tmp_path / img["data-file"])
            # The cells' centres as drawn (raster's GridImage layout), read back.
            image, _ = layer_step_images(load_run(run_dir))[metric]
            assert image.rows == ("0", "1") and image.steps == tuple(r["step"] for r in logs)
            if high == low:
                continue
            for (layer, step), value in values.items():
                x, y = image.cell_center(layer, step)
                expected = np.array(colormaps["viridis"]((value - low) / (high - low), bytes=True)[:3], dtype=int)
                assert np.abs(pixels[y, x].astype(int) - expected).max() <= 2, (label, metric, layer, step)


def test_estimates_are_marked_exactly_where_sampled_sums_split_the_elements(tmp_path):
    """cancellation="sampled": a cancelled / absorbed value is an estimate where there was something to split
    (elements with a gradient that kept their value, less those at lr 0); there it reads ≈ with a legend, and
    nowhere else. bf16 at a small lr: estimates everywhere; fp32 at a large lr: nothing to split, exact."""
    sampled = [traced_run(tmp_path / name, dtype=dtype, lr=lr, tokens=32, steps=4, cancellation="sampled",
                          label=name) for name, dtype, lr in (("bf16", torch.bfloat16, 1e-5), ("fp32", torch.float32, 1e-3))]
    html_path = write_report(sampled, tmp_path / "report")
    page = parse(html_path)
    counts = []
    for run_dir in sampled:
        final = final_record(run_dir)
        rows = page.tables[f"matrices-{run_dir.name}"]
        header = [text for _, text in rows[0]]
        marked = {(cells[0][1], header[i]) for cells in rows[1:] for i, (attrs, text) in enumerate(cells)
                  if "estimate" in attrs.get("class", "") or text.startswith("≈")}
        expected = {(name, metric) for name, values in final["per_matrix"].items() for metric in ("cancelled", "absorbed")
                    if values["gradient_unchanged"] - values["zero_lr"] > 0}
        assert marked == expected
        for cells in rows[1:]:
            for (attrs, text), metric in zip(cells, header, strict=True):
                if (cells[0][1], metric) in expected:
                    assert text == f"≈{100 * float(attrs['data-value']):.3f}%"
        counts.append(len(expected))
    assert counts[0] == 2 * len(final_record(sampled[0])["per_matrix"]) and counts[1] == 0  # both cases met
    global_rows = {cells[0][1]: cells[1:] for cells in page.tables["global"][1:]}
    for metric in ("cancelled", "absorbed"):
        assert [text.startswith("≈") for _, text in global_rows[metric]] == [True, False]
    assert [text.startswith("≈") for _, text in global_rows["update_sparsity"]] == [False, False]
    assert html_path.read_text().count("≈ an estimate") == 3  # under the global table, the bf16 matrices, its layers


def test_heatmap_labels_stay_inside_the_figure():
    """Long module kinds (a MoE's shared expert) under a layer x kind heatmap: the tick labels and the axis label
    are drawn inside the image, not cut at its edge."""
    from gradtrace.views.figures import heatmap_figure
    from gradtrace.views.run_data import Grid

    kinds = ["q", "o", "shared_expert.gate_up", "shared_expert.down", "expert.gate_up"]
    grid = Grid("update_sparsity", ["0", "1"], kinds, [[0.5] * len(kinds)] * 2)
    figure = heatmap_figure([grid, grid], ["update", "gradient"], suptitle="layer x module kind")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes[:2]:
        for text in [ax.xaxis.label, *ax.get_xticklabels()]:
            box = text.get_window_extent(renderer)
            assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= figure.bbox.width, text.get_text()
