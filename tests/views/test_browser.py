"""The live views in a real browser: TensorBoard's and trackio's own dashboards after a real Trainer run,
and ``gradtrace report``'s HTML, loaded in headless Chromium (playwright driving the system's browser).

What is checked is what a person would see: the gradtrace panels in the rendered page (not only in the
stores, which tests/sinks/test_trackers*.py read back), the number TensorBoard shows equal to the run log's,
the charts drawn, every report image decoded, no console error. A screenshot of each page is kept under
``$GRADTRACE_TEST_ARTIFACTS/<test name>/`` when that is set, else under the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.helpers.browser import (
    CHROMIUM,
    PAGE_TIMEOUT_MS,
    chromium,
    chromium_installed,
    css_rgb,
    filter_tensorboard_tags,
    tensorboard,
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
    """One real Trainer run reporting to TensorBoard and trackio at once (6 steps, a log every 2)."""
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("browser-run")
    project = f"gradtrace-browser-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TENSORBOARD_LOGGING_DIR", str(root / "tb"))
        args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=4, max_steps=6,
                                 logging_steps=2, report_to=["tensorboard", "trackio"], project=project,
                                 run_name="tiny", use_cpu=True, save_strategy="no", learning_rate=1e-3,
                                 disable_tqdm=True, seed=0, trackio_static_space_id=False)
        Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(),
                callbacks=[gradtrace.GradTraceCallback(strict=True)]).train()
    from trackio.utils import TRACKIO_DIR

    records = {int(r["step"]): r for r in read_run_log(root / "out" / "gradtrace")["logs"]}
    assert sorted(records) == [2, 4, 6]
    return {"root": root, "tb": root / "tb", "project": project, "trackio_dir": TRACKIO_DIR, "records": records}


def new_page(browser):
    """A page with its console errors and uncaught exceptions collected in ``page.errors``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    return page


def test_tensorboard_shows_the_gradtrace_curves_and_images(trained, browser, artifacts):
    with tensorboard(trained["tb"], log=artifacts / "tensorboard.log") as url:
        page = new_page(browser)
        try:
            page.goto(url + "#timeseries", wait_until="load")
            # The run's tag list (the dashboard's own menu) names gradtrace's curves.
            filter_tensorboard_tags(page, "^gradtrace(_layer_step)?/update_sparsity$")
            card = page.locator('scalar-card-component:has([title="gradtrace/update_sparsity"])')
            image_card = page.locator('image-card-component:has([title="gradtrace_layer_step/update_sparsity"])')
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
        page.screenshot(path=str(artifacts / "report.png"), full_page=True)
        assert not page.errors, page.errors
    finally:
        page.close()
