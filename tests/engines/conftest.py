"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest

from tests.helpers.launching import launch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no DeepSpeed, global batch 8: what every DeepSpeed run must reproduce.

    Within ``tests/engines/`` this replaces the root conftest's ``reference`` (a ``ReferenceRecorder``
    callback, which no engine test uses: their references are single-process runs)."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("reference")
    launch("trainer_deepspeed.py", str(out / "run"), "none", "8", "1", processes=1, cwd=out)
    return out / "run"
