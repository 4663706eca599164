"""The live views in a real browser: TensorBoard's, MLflow's and trackio's own dashboards after a real Trainer
run, and ``gradtrace report``'s HTML, loaded in headless Chromium (playwright driving the system's browser).

What is checked is what a person would see: the gradtrace panels in the rendered page (not only in the
stores, which tests/sinks/test_trackers*.py read back), the number TensorBoard shows equal to the run log's,
TensorBoard's first cards the sparsities and no two card titles alike as shown, MLflow's run page showing a
gradtrace image without touching its slider, the charts drawn, every report image decoded, no console error.
A screenshot of each page is kept under ``$GRADTRACE_TEST_ARTIFACTS/<test name>/`` when that is set, else
under the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.helpers.browser import (
    CHROMIUM,
    PAGE_TIMEOUT_MS,
    chromium,
    chromium_installed,
    css_rgb,
    filter_tensorboard_tags,
    mlflow_server,
    tensorboard,
    tensorboard_card_titles,
    trackio_show,
    wait_for_drawn,
)

pytestmark = pytest.mark.skipif(not chromium_installed(), reason=f"Chromium is not installed ({CHROMIUM})")
pytest.importorskip("playwright.sync_api")

# trackio fixes its store's folder at import: a private one, unless another test module already chose one.
if "trackio" not in __import__("sys").modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="gradtrace-trackio-")

import gradtrace  # noqa: E402
from gradtrace import read_run_log  # noqa: E402
from tests.helpers.models import Tokens, tiny_llama  # noqa: E402
from tests.helpers.traced_runs import traced_run  # noqa: E402


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    root = os.environ.get("GRADTRACE_TEST_ARTIFACTS")
    folder = Path(root) / request.node.name if root else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real Trainer run reporting to TensorBoard, MLflow (a SQLite store) and trackio at once (6 steps,
    a log every 2)."""
    import mlflow
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("browser-run")
    project = f"gradtrace-browser-{uuid.uuid4().hex[:8]}"
    store = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TENSORBOARD_LOGGING_DIR", str(root / "tb"))
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "gradtrace-browser")
        mlflow.set_tracking_uri(store)
        experiment = mlflow.MlflowClient(store).create_experiment(
            "gradtrace-browser", artifact_location=(root / "mlflow-artifacts").as_uri())
        args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=4, max_steps=6,
                                 logging_steps=2, report_to=["tensorboard", "trackio", "mlflow"], project=project,
                                 run_name="tiny", use_cpu=True, save_strategy="no", learning_rate=1e-3,
                                 disable_tqdm=True, seed=0, trackio_static_space_id=False)
        Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(),
                callbacks=[gradtrace.GradTraceCallback(strict=True)]).train()
        while mlflow.active_run() is not None:
            mlflow.end_run()
    from trackio.utils import TRACKIO_DIR

    [run] = mlflow.MlflowClient(store).search_runs([experiment])
    records = {int(r["step"]): r for r in read_run_log(root / "out" / "gradtrace")["logs"]}
    assert sorted(records) == [2, 4, 6]
    return {"root": root, "tb": root / "tb", "project": project, "trackio_dir": TRACKIO_DIR, "records": records,
            "mlflow": store, "experiment": experiment, "run_id": run.info.run_id}


def new_page(browser):
    """A page with its console errors and uncaught exceptions collected in ``page.errors``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.errors = []

    def collect(text):
        # Chromium reports a ResizeObserver whose callback resized what it observes as an error event; the spec
        # calls it benign (the notifications arrive next frame) and MLflow's layout triggers it at random.
        if "ResizeObserver loop" not in text:
            page.errors.append(text)

    page.on("console", lambda message: collect(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: collect(str(error)))
    return page


def test_tensorboard_shows_the_gradtrace_curves_and_images(trained, browser, artifacts):
    with tensorboard(trained["tb"], log=artifacts / "tensorboard.log") as url:
        page = new_page(browser)
        try:
            page.goto(url + "#timeseries", wait_until="load")
            # The run's tag list (the dashboard's own menu) names gradtrace's curves.
            filter_tensorboard_tags(page, "^gradtrace/update_sparsity$|^gradtrace_heatmap/update.layer_x_step$")
            # (the cards of the filtered view: the groups TensorBoard opened before the filter may linger, hidden)
            card = page.locator('scalar-card-component:has([title="gradtrace/update_sparsity"]) >> visible=true')
            image_card = page.locator(
                'image-card-component:has([title="gradtrace_heatmap/update.layer_x_step"]) >> visible=true')
            card.wait_for()
            image_card.locator("img").wait_for()
            # The card's data table shows the last step's value: the run log's, to TensorBoard's rounding.
            page.wait_for_function(
                "card => /Relative\\s+\\S+\\s+\\S+\\s+\\S+\\s+\\d+/.test(card.innerText)", arg=card.element_handle())
            match = re.search(r"Relative\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)", card.inner_text())
            _run, _smoothed, value, step = match.groups()
            assert int(step) == 6
            assert float(value) == pytest.approx(trained["records"][6]["global"]["update_sparsity"], rel=0.01)
            # The run's line is drawn, in the colour of its dot in the data table.
            wait_for_drawn(card.locator("canvas").first, css_rgb(card.locator(".row-circle span").first))
            # The layer x step image loaded (decoded, not a broken image).
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=image_card.locator("img").element_handle())
            page.screenshot(path=str(artifacts / "tensorboard.png"))
            assert not page.errors, page.errors
        finally:
            page.close()


def test_tensorboard_opens_on_the_sparsities_and_no_two_card_titles_look_alike(trained, browser, artifacts):
    from tests.helpers.tensorboard_events import tb_events

    tags = tb_events(trained["tb"]).Tags()
    expected = sorted({*tags["scalars"], *tags["images"], *tags["histograms"]})
    assert {"train/loss", "gradtrace/update_sparsity", "gradtrace_split/cancellation_ratio"} <= set(expected)
    with tensorboard(trained["tb"], log=artifacts / "tensorboard.log") as url:
        # Tall enough that every card is drawn (TensorBoard renders only the cards in view); the width, and
        # so how much of each title shows, is an ordinary 1280-pixel window's.
        page = browser.new_page(viewport={"width": 1280, "height": 16000})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            page.goto(url + "#timeseries", wait_until="load")
            titles = page.locator("card-view tb-truncated-path")
            titles.first.wait_for()
            # TensorBoard opens the first two groups (alphabetical) and folds the others: what a person sees
            # first is the headline sparsities, then the images.
            groups = page.locator(".card-group .group-title").all_inner_texts()
            assert groups == sorted(groups) and groups[:2] == ["gradtrace", "gradtrace_heatmap"], groups
            page.wait_for_function("() => document.querySelectorAll('.card-group:has(card-view)').length == 2")
            opened = titles.evaluate_all("paths => paths.map(p => p.getAttribute('title'))")
            assert opened[:4] == ["gradtrace/gradient_sparsity", "gradtrace/update_sparsity",
                                  "gradtrace/update_sparsity_abs_1e-05", "gradtrace/update_sparsity_rel_0.001"]
            assert all(tag.startswith("gradtrace_heatmap/") for tag in opened[4:])
            page.screenshot(path=str(artifacts / "tensorboard-first-screen.png"), clip={"x": 0, "y": 0, "width": 1280,
                                                                                     "height": 900})
            folded = page.locator('.card-group:not(:has(card-view)) button[aria-label="Expand group"]')
            while folded.count():  # open the others, to read every title
                folded.first.click()
            shown = tensorboard_card_titles(page)
            assert sorted(shown) == expected
            # Each title as it reads, cut to the card's width: no two of gradtrace's alike.
            ours = {tag: text for tag, text in shown.items() if tag.startswith("gradtrace")}
            assert len(set(ours.values())) == len(ours), sorted(ours.values())
            assert any("\u2026" in text for text in ours.values())  # some titles are cut: the check bites
            (artifacts / "tensorboard-titles.txt").write_text("".join(f"{t}\t{s}\n" for t, s in shown.items()))
        finally:
            page.close()


def test_tensorboard_text_tables_keep_every_number_whole(trained, browser, artifacts):
    """TensorBoard's TEXT tab breaks words anywhere in a table wider than its card (the 15-column table it had
    showed '2048' as '20' over '48'): each number of gradtrace's per-matrix tables, as rendered in a 1280-pixel
    window, lies on one line."""
    with tensorboard(trained["tb"], log=artifacts / "tensorboard.log") as url:
        page = new_page(browser)
        try:
            page.goto(url + "#text", wait_until="load")
            # (TensorBoard puts each text in a one-cell table of its own: the tables inside it are gradtrace's)
            tables = page.locator("tf-markdown-view table:has(th:text-is('matrix')):not(:has(table))")
            tables.first.wait_for()
            tables.first.scroll_into_view_if_needed()
            assert tables.count() == 4  # sparsities, within a tolerance, where the elements went (two)
            cells = tables.locator("td").evaluate_all(
                "cells => cells.filter(td => /^≈?[0-9.,]+$/.test(td.textContent.trim())).map(td => {"
                " const range = document.createRange(); range.selectNodeContents(td);"
                " return [td.textContent.trim(), range.getClientRects().length]; })")
            per_matrix = trained["records"][6]["per_matrix"]
            assert len(cells) >= len(per_matrix) * 10  # every row's numbers were found
            page.screenshot(path=str(artifacts / "tensorboard-text.png"))
            assert [text for text, lines in cells if lines != 1] == [], "numbers broken over lines"
            assert not page.errors, page.errors
        finally:
            page.close()


def test_mlflow_run_page_shows_a_gradtrace_image_without_interaction(trained, browser, artifacts):
    with mlflow_server(trained["mlflow"], log=artifacts / "mlflow.log") as url:
        page = new_page(browser)
        try:
            page.goto(f"{url}#/experiments/{trained['experiment']}/runs/{trained['run_id']}/model-metrics",
                      wait_until="load")
            # The run's chart sections: gradtrace's sparsities first, then its images.
            heading = page.get_by_text("gradtrace_heatmap", exact=True)
            heading.wait_for()
            # Section headings read "<name>\n(<charts>)", in page order.
            sections = re.findall(r"^(\S+)\n\(\d+\)$", page.inner_text("body"), re.M)
            assert sections[:3] == ["gradtrace", "gradtrace_heatmap", "gradtrace_kind"], sections
            # An image card opens at step 0: it shows gradtrace's newest image there, not "No image logged".
            heading.scroll_into_view_if_needed()  # MLflow draws the cards in view
            image = page.locator('img[src*="gradtrace_heatmap"]').first
            image.wait_for()
            image.scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            [shown] = parse_qs(urlparse(image.get_attribute("src")).query)["path"]
            assert shown.startswith("images/gradtrace_heatmap~") and shown.endswith("+training-step-6+compressed.png")
            assert page.get_by_text("No image logged at this step").count() == 0
            page.screenshot(path=str(artifacts / "mlflow.png"))
            assert not [e for e in page.errors if "404" not in e], page.errors  # the UI probes optional endpoints
        finally:
            page.close()


def test_trackio_shows_a_gradtrace_section_with_drawn_charts(trained, browser, artifacts):
    with trackio_show(trained["project"], trained["trackio_dir"], log=artifacts / "trackio.log") as url:
        page = new_page(browser)
        try:
            page.goto(url, wait_until="load")
            # gradtrace/... keys: a "gradtrace" section whose chart update_sparsity is that exact metric.
            page.get_by_text(re.compile(r"^gradtrace \(\d+\)$")).wait_for()
            plot = page.locator('.plot-container[data-metric="gradtrace/update_sparsity"]')
            plot.wait_for()
            assert plot.locator(".plot-title").inner_text() == "update_sparsity"
            assert "tiny" in plot.locator(".custom-legend").inner_text()
            # The run's line is drawn on the chart's canvas, in the legend's colour.
            plot.scroll_into_view_if_needed()  # charts are drawn once they come into view
            wait_for_drawn(plot.locator("canvas"), css_rgb(plot.locator(".legend-dot")))
            page.screenshot(path=str(artifacts / "trackio.png"))
            assert not page.errors, page.errors
        finally:
            page.close()


def test_report_html_renders_every_image_without_console_errors(tmp_path, browser, artifacts):
    import torch

    from gradtrace.views.report import write_report

    runs = [traced_run(tmp_path / "a", dtype=torch.bfloat16, lr=1e-5, tokens=32, steps=6, label="sparse-bf16"),
            traced_run(tmp_path / "b", dtype=torch.float32, lr=1e-3, tokens=48, steps=6, label="dense-fp32")]
    html_path = write_report(runs, tmp_path / "report")
    source = html_path.read_text(encoding="utf-8")
    page = new_page(browser)
    try:
        page.goto(html_path.as_uri(), wait_until="load")
        images = page.locator("img")
        assert images.count() == source.count("<img ") > 0
        broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                               ".map(i => i.alt)")
        assert broken == []
        text = page.inner_text("body")
        assert "sparse-bf16" in text and "dense-fp32" in text  # both runs are labelled in the rendered page
        # No page wider than the window: the 21-row, 15-column matrix tables scroll inside their own boxes.
        assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
        box = page.locator("#matrices-sparse-bf16").locator("xpath=..")
        assert box.evaluate("div => div.scrollWidth > div.clientWidth")  # it does scroll: the check bites
        # Every layer over training: an image per metric and run, titled with the run log's range of that metric.
        for run_dir, label in zip(runs, ("sparse-bf16", "dense-fp32"), strict=True):
            logs = read_run_log(run_dir)["logs"]
            for metric in ("gradient_sparsity", "update_sparsity", "cancelled", "absorbed"):
                values = [v[metric] for r in logs for v in r["per_layer"].values()]
                image = page.locator(f'#layer-step-{label} img[data-metric="{metric}"]')
                assert image.evaluate("img => img.complete && img.naturalWidth > 0")
                assert f"colour scale {100 * min(values):.2f}% to {100 * max(values):.2f}%" in image.get_attribute("title")
        # A click on a column header sorts the table by it; a second click, the other way.
        table = page.locator("#matrices-sparse-bf16")
        header = [h.strip() for h in table.locator("thead th").all_inner_texts()]
        column = header.index("update_sparsity")
        read = f"t => [...t.tBodies[0].rows].map(r => Number(r.cells[{column}].dataset.value))"
        before = table.evaluate(read)
        assert before != sorted(before)  # model order first
        table.locator("thead th").nth(column).click()
        assert table.evaluate(read) == sorted(before)
        table.locator("thead th").nth(column).click()
        assert table.evaluate(read) == sorted(before, reverse=True)
        names = table.evaluate("t => [...t.tBodies[0].rows].map(r => r.cells[0].textContent)")
        final = read_run_log(runs[0])["logs"][-1]["per_matrix"]
        assert sorted(names) == sorted(final)  # the rows moved whole
        assert [final[n]["update_sparsity"] for n in names] == sorted(before, reverse=True)
        page.screenshot(path=str(artifacts / "report.png"), full_page=True)
        assert not page.errors, page.errors
    finally:
        page.close()
