"""Regenerate ``docs/tensorboard.png``: TensorBoard showing gradtrace's panels beside the Trainer's loss.

A short bf16 SFT of the demo's tiny model (``gradtrace.demo``, no downloads) with ``report_to="tensorboard"``
and a ``GradTraceCallback``; then ``tensorboard --logdir`` on 127.0.0.1 and headless Chromium (the system's,
through playwright) take the picture. From the repository root, with the ``test`` extra installed::

    HF_HUB_OFFLINE=1 .venv/bin/python docs/screenshots.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.helpers.browser: the same browser and server helpers the tests use

from PIL import Image  # noqa: E402

from tests.helpers.browser import (  # noqa: E402
    PAGE_TIMEOUT_MS,
    chromium,
    css_rgb,
    filter_tensorboard_tags,
    tensorboard,
    wait_for_drawn,
)

OUT = ROOT / "docs" / "tensorboard.png"
TAGS = "^train/loss$|^gradtrace/(update|gradient)_sparsity$|^gradtrace_layer_step/update_sparsity$"


def train(root: Path) -> Path:
    """The run TensorBoard shows, under ``root / "tb"``."""
    import torch

    import gradtrace
    from gradtrace.demo.runs import make_base_policy, run_sft

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(root / "tb" / "sft-bf16")  # the run's name in TensorBoard
    base = make_base_policy(root / "base", steps=40, per_device_train_batch_size=16, quiet=True)
    run_sft(base, root / "sft", dtype=torch.bfloat16, learning_rate=1e-4, max_steps=60, logging_steps=3,
            report_to="tensorboard", run_name="sft-bf16", quiet=True,
            callbacks=[gradtrace.GradTraceCallback()])
    return root / "tb"


def screenshot(log_dir: Path, root: Path) -> bytes:
    with tensorboard(log_dir, log=root / "tensorboard.log") as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1900, "height": 1000})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(url + "#timeseries", wait_until="load")
        filter_tensorboard_tags(page, TAGS)
        page.get_by_role("button", name="Close side pane").click()  # the settings pane: room for 4 cards
        for tag in ("gradtrace/update_sparsity", "gradtrace/gradient_sparsity", "train/loss"):
            card = page.locator(f'scalar-card-component:has([title="{tag}"])').first
            wait_for_drawn(card.locator("canvas").first, css_rgb(card.locator(".row-circle span").first))
        image = page.locator('image-card-component:has([title="gradtrace_layer_step/update_sparsity"]) img')
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        bottom = page.locator("scalar-card-component").first.bounding_box()
        return page.screenshot(clip={"x": 0, "y": 0, "width": 1900, "height": bottom["y"] + bottom["height"] + 16})


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gradtrace-screenshot-") as folder:
        root = Path(folder)
        png = screenshot(train(root), root)
    # A palette PNG: a flat UI in a few hundred colours, a fraction of the true-colour file.
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(OUT, optimize=True)
    print(f"{OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
