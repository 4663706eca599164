"""The one protocol every sink implements: where summaries go besides the local run log."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    """Somewhere summaries go besides the local run log (e.g. W&B)."""

    name: str

    def log(self, summary: dict[str, Any], step: int) -> None: ...

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None: ...
