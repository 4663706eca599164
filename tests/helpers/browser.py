"""Headless Chromium and local dashboard servers, for the browser tests and ``docs/screenshots.py``.

The browser is the system's Chromium (Debian's ``chromium`` package) driven by playwright, which is told
where it is (``executable_path``): playwright's own browser download is never used. Servers run in their
own process group on 127.0.0.1 and a free port, and are killed however the caller leaves.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What works as root in a container: no sandbox, no GPU, and nothing that reaches out to the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 60_000  # generous: two cores shared with other work render an Angular/Svelte app slowly


def chromium_installed() -> bool:
    return os.access(CHROMIUM, os.X_OK)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright ``Browser``); each ``new_page`` gets a fresh temporary profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bin_of(name: str) -> str:
    """A console script installed beside this interpreter (the venv's ``tensorboard``, ``trackio``)."""
    script = Path(sys.executable).with_name(name)
    return str(script) if script.exists() else name


@contextlib.contextmanager
def serve(command: Sequence[str], url: str, *, log: Path, env: Mapping[str, str] | None = None,
          timeout: float = 90.0) -> Iterator[str]:
    """Run a dashboard server until ``url`` answers 200; yield ``url``; kill the server's process group.

    The server's output goes to ``log``, which is quoted if it exits or does not answer in ``timeout`` s.
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def tensorboard(log_dir: str | os.PathLike, *, log: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    return serve([bin_of("tensorboard"), "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port)],
                 f"http://127.0.0.1:{port}/", log=log)


def trackio_show(project: str, trackio_dir: str | os.PathLike, *, log: Path) -> contextlib.AbstractContextManager[str]:
    """``trackio show`` on ``project`` of the store in ``trackio_dir``. ``BROWSER=true``: the command opens
    "a browser" on start, which must not be a real one."""
    port = free_port()
    env = {"TRACKIO_DIR": str(trackio_dir), "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "BROWSER": "true"}
    return serve([bin_of("trackio"), "show", "--project", project], f"http://127.0.0.1:{port}/?project={project}",
                 log=log, env=env)


def mlflow_server(store_uri: str, *, log: Path) -> contextlib.AbstractContextManager[str]:
    """``mlflow server`` on the tracking store ``store_uri`` (its runs' artifacts are read where they lie)."""
    port = free_port()
    return serve([bin_of("mlflow"), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"], f"http://127.0.0.1:{port}/", log=log, timeout=240)


def visible_titles(locator: Any) -> list[str]:
    """What a person reads of each TensorBoard card title (``tb-truncated-path`` elements): each part as
    shown, cut where its box ends with an ellipsis (the browser's own text measure, in the element's font)."""
    return locator.evaluate_all("""paths => paths.map(path => [...path.children].map(span => {
        const text = span.textContent;
        if (span.scrollWidth <= span.clientWidth) return text;
        const context = document.createElement('canvas').getContext('2d');
        const style = getComputedStyle(span);
        context.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
        const room = span.clientWidth - context.measureText('\u2026').width;
        let shown = text.length;
        while (shown > 0 && context.measureText(text.slice(0, shown)).width > room) shown--;
        return text.slice(0, shown) + '\u2026';
    }).join(''))""")


def tensorboard_card_titles(page: Any) -> dict[str, str]:
    """Every drawn TensorBoard card's tag and its title as shown (:func:`visible_titles`), paging through the
    groups that hold more cards than one page."""
    titles = page.locator("card-view tb-truncated-path")
    shown: dict[str, str] = {}
    while True:
        tags = titles.evaluate_all("paths => paths.map(p => p.getAttribute('title'))")
        shown.update(zip(tags, visible_titles(titles), strict=True))
        later = page.locator('button[aria-label="Next page"]:enabled')
        if not later.count():
            return shown
        later.first.click()
        page.wait_for_function("before => JSON.stringify([...document.querySelectorAll('card-view tb-truncated-path')]"
                               ".map(p => p.getAttribute('title'))) !== JSON.stringify(before)", arg=tags)


def filter_tensorboard_tags(page: Any, regex: str) -> None:
    """Type ``regex`` into TensorBoard's time-series tag filter (cards outside the viewport are not
    rendered, so a filter is how a test brings the ones it checks into the DOM)."""
    box = page.locator('input[placeholder="Filter tags (regex)"]')
    box.fill(regex)
    box.press("Escape")  # close the autocomplete list, which covers the cards


def css_rgb(locator: Any) -> tuple[int, int, int]:
    """An element's computed background colour (a legend dot: the colour its run is drawn in)."""
    text = locator.evaluate("e => getComputedStyle(e).backgroundColor")
    red, green, blue = (int(part) for part in re.findall(r"\d+", text)[:3])  # "rgb(66, 80, 102)"
    return red, green, blue


def wait_for_drawn(locator: Any, color: tuple[int, int, int], *, pixels: int = 50, tolerance: int = 24,
                   timeout: float = PAGE_TIMEOUT_MS / 1000) -> int:
    """Wait until ``locator`` (a chart's canvas) shows at least ``pixels`` pixels of ``color``: the
    run's line was drawn. Canvas charts draw after their data arrives, so the DOM alone cannot tell.
    Returns the count; raises ``TimeoutError`` with the last count."""
    import io

    import numpy as np
    from PIL import Image

    deadline = time.monotonic() + timeout
    while True:
        shot = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)
        count = int((np.abs(shot - np.array(color)).max(axis=-1) <= tolerance).sum())
        if count >= pixels:
            return count
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} pixels of {color} after {timeout:.0f} s (wanted {pixels})")
        time.sleep(0.5)
