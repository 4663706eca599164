"""Shared fixtures: an offline environment, a saved tiny base model, and a reference recorder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from gradtrace.anatomy.parameter_names import tracked_name  # noqa: E402


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


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


class ReferenceRecorder(TrainerCallback):
    """The simplest independent bookkeeping: full boolean tensors, updated where the optimizer's
    gradient is final (``on_pre_optimizer_step``), and a full copy of the starting weights."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = {tracked_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.initial = {n: p.detach().clone() for n, p in self.params.items()}
        self.gradient = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in self.params.items()}
        self.optimizer_steps = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, param in self.params.items():
            if param.grad is not None:
                self.gradient[name] |= (param.grad != 0) & torch.isfinite(param.grad)
        self.optimizer_steps += 1

    def updated(self) -> dict[str, torch.Tensor]:
        return {n: raw_bits(p.detach()) != raw_bits(self.initial[n]) for n, p in self.params.items()}


@pytest.fixture
def reference() -> ReferenceRecorder:
    return ReferenceRecorder()


def assert_masks_equal_reference(masks, reference: ReferenceRecorder, *, some_without_gradient: bool = True) -> None:
    """Exported masks equal the reference bit for bit, and the reference is not trivial."""
    assert set(masks["gradient"]) == set(reference.gradient)
    updated = reference.updated()
    for name in reference.gradient:
        assert torch.equal(masks["gradient"][name], reference.gradient[name]), f"gradient mask differs: {name}"
        assert torch.equal(masks["update"][name], updated[name]), f"update mask differs: {name}"
    received = torch.cat([g.reshape(-1) for g in reference.gradient.values()])
    assert received.any()
    if some_without_gradient:
        assert not received.all(), "the run should leave some elements without gradient"
