"""Regenerate ``docs/tensorboard.png``, ``docs/mlflow.png`` and ``docs/trackio.png``: what each tracker shows
first of a run traced by gradtrace.

A short bf16 SFT of the demo's tiny model (``gradtrace.demo``, no downloads) with a ``GradTraceCallback`` and
``report_to=["tensorboard", "mlflow", "trackio"]`` (MLflow on a SQLite store, trackio's local store, all in a
temporary folder); then each dashboard on 127.0.0.1 (``tensorboard``, ``mlflow server``, ``trackio show``) and
headless Chromium (the system's, through playwright, with the helpers of ``tests/views/test_browser.py``) take the
pictures, as a person opening each would see it: no filter, nothing clicked but the side panels closed. W&B
has no local dashboard (an offline run is synced to wandb.ai first). From the repository root, with the
``test`` extra installed::

    HF_HUB_OFFLINE=1 .venv/bin/python docs/screenshots.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.helpers.browser: the same browser and server helpers the tests use

from PIL import Image  # noqa: E402

from tests.helpers.browser import (  # noqa: E402
    PAGE_TIMEOUT_MS,
    chromium,
    css_rgb,
    mlflow_server,
    tensorboard,
    trackio_show,
    wait_for_drawn,
)

DOCS = ROOT / "docs"
WINDOW = {"width": 1600, "height": 1000}
PROJECT, RUN = "gradtrace-demo", "sft-bf16"


def train(root: Path) -> dict:
    """The run the dashboards show; where each tracker keeps it."""
    import mlflow
    import torch

    import gradtrace
    from gradtrace.demo.runs import make_base_policy, run_sft

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(root / "tb" / RUN)  # the run's name in TensorBoard
    store = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store
    os.environ["MLFLOW_EXPERIMENT_NAME"] = PROJECT
    mlflow.set_tracking_uri(store)
    experiment = mlflow.MlflowClient(store).create_experiment(PROJECT, artifact_location=(root / "mlflow").as_uri())
    base = make_base_policy(root / "base", steps=40, per_device_train_batch_size=16, quiet=True)
    run_sft(base, root / "sft", dtype=torch.bfloat16, learning_rate=1e-4, max_steps=60, logging_steps=3,
            report_to=["tensorboard", "mlflow", "trackio"], run_name=RUN, quiet=True,
            callbacks=[gradtrace.GradTraceCallback()], project=PROJECT, trackio_static_space_id=False)
    [run] = mlflow.MlflowClient(store).search_runs([experiment])
    return {"tb": root / "tb", "mlflow": store, "experiment": experiment, "run_id": run.info.run_id}


def tensorboard_png(browser, log_dir: Path, root: Path) -> bytes:
    """TensorBoard's time series as it opens: gradtrace's sparsities, then its images."""
    with tensorboard(log_dir, log=root / "tensorboard.log") as url:
        page = browser.new_page(viewport=WINDOW)
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(url + "#timeseries", wait_until="load")
        page.get_by_role("button", name="Close side pane").click()  # the settings pane: room for more cards
        for tag in ("gradtrace/gradient_sparsity", "gradtrace/update_sparsity"):
            card = page.locator(f'scalar-card-component:has([title="{tag}"])').first
            wait_for_drawn(card.locator("canvas").first, css_rgb(card.locator(".row-circle span").first))
        time.sleep(1)
        return page.screenshot()


def mlflow_png(browser, run: dict, root: Path) -> bytes:
    """The run's "Model metrics" tab, scrolled to gradtrace's images (MLflow opens them at step 0, where
    gradtrace keeps the newest)."""
    with mlflow_server(run["mlflow"], log=root / "mlflow.log") as url:
        page = browser.new_page(viewport=WINDOW)
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(f"{url}#/experiments/{run['experiment']}/runs/{run['run_id']}/model-metrics", wait_until="load")
        heading = page.get_by_text("gradtrace_heatmap", exact=True)
        heading.wait_for()
        close = page.get_by_role("button", name="Close")
        if close.count():  # the assistant panel MLflow opens on a first visit
            close.first.click()
        heading.scroll_into_view_if_needed()
        images = page.locator('img[src*="gradtrace_heatmap"]')
        images.first.wait_for()
        for index in range(images.count()):  # each card lists the run's parameters above its image
            image = images.nth(index)
            image.scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        heading.evaluate("e => e.scrollIntoView({block: 'start'})")
        time.sleep(1)
        return page.screenshot()


def trackio_png(browser, trackio_dir: Path, root: Path) -> bytes:
    """``trackio show``: the gradtrace section, its curves against the trainer's step."""
    with trackio_show(PROJECT, trackio_dir, log=root / "trackio.log") as url:
        page = browser.new_page(viewport=WINDOW)
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(url, wait_until="load")
        plot = page.locator('.plot-container[data-metric="gradtrace/update_sparsity"]')
        plot.wait_for()
        plot.scroll_into_view_if_needed()
        wait_for_drawn(plot.locator("canvas"), css_rgb(plot.locator(".legend-dot")))
        return page.screenshot()


def save(png: bytes, name: str) -> None:
    # A palette PNG: a flat UI in a few hundred colours, a fraction of the true-colour file.
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path = DOCS / name
    image.save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gradtrace-screenshot-") as folder:
        root = Path(folder)
        os.environ["TRACKIO_DIR"] = str(root / "trackio")  # before trackio is imported: it fixes its folder then
        run = train(root)
        with chromium() as browser:
            shots = {"tensorboard.png": tensorboard_png(browser, run["tb"], root),
                     "mlflow.png": mlflow_png(browser, run, root),
                     "trackio.png": trackio_png(browser, root / "trackio", root)}
    for name, png in shots.items():
        save(png, name)


if __name__ == "__main__":
    main()
