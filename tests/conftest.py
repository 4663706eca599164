"""Shared fixtures: an offline environment, a saved tiny base model, a reference recorder, offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.reference import ReferenceRecorder  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: as fast for these tiny models, and two thrash on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_path(tmp_path_factory) -> str:
    """A freshly built tiny Qwen2 model and its tokenizer, saved as a local folder (float32)."""
    from gradtrace.demo.tiny import build_model, build_tokenizer, save_base

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, dtype=torch.float32, seed=0, hidden_size=32, num_hidden_layers=2,
                        intermediate_size=64)
    return save_base(model, tokenizer, tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def reference() -> ReferenceRecorder:
    return ReferenceRecorder()


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """Offline W&B writing only under ``tmp_path`` (run files, artifact staging, caches)."""
    import wandb

    root = tmp_path / "wandb_root"
    for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_PROJECT", "gradtrace-tests")
    # wandb reads the environment once per process, at its first setup: start from a fresh one so the
    # variables above apply (the Trainer calls wandb.init itself, without dir=).
    wandb.teardown()
    yield root
    if wandb.run is not None:  # a failed test must not leave its run open for the next one
        wandb.finish()
    wandb.teardown()
