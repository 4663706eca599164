"""Param groups at learning rate 0, through a real Trainer: what such a group received and kept unchanged
is ``zero_lr`` (nothing could change it), never "absorbed by rounding" nor "cancelled"."""

from __future__ import annotations

import pytest
import torch

from gradtrace import GradTraceCallback, load_masks
from gradtrace.demo import runs


def _trainer_with_groups(base_path, output_dir, lr_of_layer0: float, max_steps: int = 4):
    callback = GradTraceCallback(strict=True, wandb=False, cancellation="full")
    trainer = runs.build_trainer(base_path, output_dir, callbacks=[callback], max_steps=max_steps,
                                 logging_steps=2, per_device_train_batch_size=4, dtype=torch.float32,
                                 learning_rate=1e-3)
    model = trainer.model
    layer0 = [p for n, p in model.named_parameters() if n.startswith("model.layers.0.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.layers.0.")]
    trainer.optimizer = torch.optim.AdamW([{"params": layer0, "lr": lr_of_layer0}, {"params": rest, "lr": 1e-3}],
                                          weight_decay=0.0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return callback, model, initial


def test_a_group_at_lr_zero_is_zero_lr_not_absorbed(tmp_path, base_path):
    callback, model, initial = _trainer_with_groups(base_path, tmp_path, lr_of_layer0=0.0)
    summary = callback.summary
    layer0, layer1 = summary["per_layer"]["0"], summary["per_layer"]["1"]
    # independent facts: layer 0 never moved, and it did receive gradients
    moved = {n: bool((p.detach() != initial[n]).any()) for n, p in model.named_parameters()}
    assert not any(v for n, v in moved.items() if n.startswith("model.layers.0."))
    assert any(v for n, v in moved.items() if n.startswith("model.layers.1."))
    masks = load_masks(tmp_path / "gradtrace")
    received = sum(int(m.sum()) for n, m in masks["gradient"].items() if n.startswith("model.layers.0."))
    numel = sum(m.numel() for n, m in masks["gradient"].items() if n.startswith("model.layers.0."))
    assert 0 < received
    assert layer0["zero_lr"] == pytest.approx(received / numel)
    assert layer0["absorbed"] == 0.0 and layer0["cancelled"] == 0.0 and layer0["updated"] == 0.0
    assert layer1["zero_lr"] == 0.0
    categories = ("no_gradient", "changed_without_gradient", "updated", "cancelled", "absorbed", "zero_lr")
    for values in (layer0, layer1, summary["global"]):
        assert sum(values[c] for c in categories) == pytest.approx(1.0)
    assert summary["global"]["zero_lr_steps"] == 0  # the other group stepped every time
    total = sum(m.numel() for m in masks["gradient"].values())
    assert summary["global"]["zero_lr"] == pytest.approx(received / total)


def test_a_group_with_a_nonzero_lr_has_no_zero_lr_elements(tmp_path, base_path):
    callback, _, _ = _trainer_with_groups(base_path, tmp_path, lr_of_layer0=1e-3)
    assert all(v["zero_lr"] == 0.0 for v in callback.summary["per_layer"].values())
    assert callback.summary["global"]["zero_lr"] == 0.0
