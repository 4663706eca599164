"""Subnetwork-only training: masked-out weights stay bit-identical, masked-in weights train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtrace.anatomy.parameter_names import matching_key
from gradtrace.formats.masks_file import save_masks
from gradtrace.masks.subnetwork import (
    SubnetworkCallback,
    SubnetworkError,
    restrict_to_subnetwork,
)

INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view(INT_OF[t.element_size()]).clone()


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def random_masks(model: nn.Module, density: float = 0.3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 6, after_backward=None) -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def changed_fractions(model, start, masks, prefix=""):
    """(changed elements outside the mask, fraction of elements inside the mask that changed)."""
    outside, inside_changed, inside = 0, 0, 0
    for name, p in model.named_parameters():
        key = name.removeprefix(prefix)
        diff = bits(p) != start[key]
        outside += int((diff & ~masks[key]).sum())
        inside_changed += int((diff & masks[key]).sum())
        inside += int(masks[key].sum())
    return outside, inside_changed / inside


def test_adamw_with_weight_decay_leaves_masked_out_weights_bit_identical():
    model = tiny_model()
    masks = random_masks(model)
    start = {n: bits(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = restrict_to_subnetwork(model, optimizer, masks)
    train(model, optimizer)
    outside, inside = changed_fractions(model, start, masks)
    assert outside == 0
    assert inside > 0.99  # every masked-in element moves (gradient or, at least, weight decay)
    assert handle.verify() == 0
    assert handle.frozen_elements == sum(int((~m).sum()) for m in masks.values())
    # After remove() the hooks are gone: training moves masked-out weights again.
    handle.remove()
    train(model, optimizer, steps=1)
    assert changed_fractions(model, start, masks)[0] > 0


def test_masking_gradients_alone_does_not_freeze_weights_with_weight_decay():
    """The control experiment that motivates the restore step (see REFERENCE.md)."""
    model = tiny_model()
    masks = random_masks(model)
    start = {n: bits(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def mask_grads():
        for n, p in model.named_parameters():
            p.grad.mul_(masks[n])

    train(model, optimizer, after_backward=mask_grads)
    assert changed_fractions(model, start, masks)[0] > 0


def test_gradients_are_masked_before_clipping_and_momentum():
    model = tiny_model()
    masks = random_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restrict_to_subnetwork(model, optimizer, masks)
    seen, inside_nonzero = [], []

    def check():  # runs right after backward, before clip_grad_norm_ and optimizer.step()
        for n, p in model.named_parameters():
            seen.append(bool((p.grad[~masks[n]] == 0).all()))
            inside_nonzero.append(int((p.grad[masks[n]] != 0).sum()))

    train(model, optimizer, steps=2, after_backward=check)
    assert seen and all(seen)
    assert sum(inside_nonzero) > 0
    for n, p in model.named_parameters():
        buf = optimizer.state[p]["momentum_buffer"]
        assert bool((buf[~masks[n]] == 0).all())


def test_masks_file_and_module_prefixes(tmp_path):
    """Masks saved without a wrapper prefix fit a DDP-style wrapped model, and vice versa."""

    class Wrapper(nn.Module):  # what DDP / DataParallel look like by name: "module." + name
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    inner = tiny_model()
    masks = random_masks(inner)
    path = tmp_path / "masks.safetensors"
    save_masks(path, {"gradient": masks, "update": masks})
    model = Wrapper(inner)
    start = {n: bits(p) for n, p in inner.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    restrict_to_subnetwork(model, optimizer, path)
    train(model, optimizer, steps=3)
    assert changed_fractions(inner, start, masks)[0] == 0
    plain = tiny_model()
    prefixed = {f"module.{n}": m for n, m in random_masks(plain).items()}
    restrict_to_subnetwork(plain, None, prefixed).remove()
    assert matching_key("module.base_model.model.model.layers.0.q_proj.base_layer.weight") == \
        "model.layers.0.q_proj.weight"
    assert matching_key("_orig_mod.model.layers.0.q_proj.lora_A.default.weight") == \
        "model.layers.0.q_proj.lora_A.weight"  # as PEFT names it in a saved adapter


def test_masks_that_do_not_fit_the_model_fail_at_once(tmp_path):
    model = tiny_model()
    masks = random_masks(model)
    wrong_shape = dict(masks)
    wrong_shape["0.weight"] = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(SubnetworkError, match=r"wrong shape.*'0\.weight' mask \[8, 16\] vs parameter \[16, 8\]"):
        restrict_to_subnetwork(model, None, wrong_shape)
    missing = {n: m for n, m in masks.items() if n != "2.bias"}
    with pytest.raises(SubnetworkError, match=r"trainable parameters have no mask \('2\.bias'\)"):
        restrict_to_subnetwork(model, None, missing)
    other_model = {"model.layers.0.q_proj.weight": torch.ones(4, 4, dtype=torch.bool), **masks}
    with pytest.raises(SubnetworkError, match="name no parameter"):
        restrict_to_subnetwork(model, None, other_model)
    path = tmp_path / "m.safetensors"
    save_masks(path, {"gradient": masks})
    with pytest.raises(SubnetworkError, match=r"no 'update' masks.*gradient"):
        restrict_to_subnetwork(model, None, path)
    # Frozen parameters need no mask.
    model[2].bias.requires_grad_(False)
    restrict_to_subnetwork(model, None, missing).remove()


def test_tied_weights_use_the_union_of_their_masks_and_buffer_masks_are_ignored():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight  # one tensor, two names
            self.register_buffer("scale", torch.ones(6))

        def forward(self, ids):
            return self.head(self.embed(ids) * self.scale)

    torch.manual_seed(0)
    model = Tied()
    g = torch.Generator().manual_seed(4)
    m_embed, m_head = torch.rand(10, 6, generator=g) < 0.2, torch.rand(10, 6, generator=g) < 0.2
    masks = {"embed.weight": m_embed, "head.weight": m_head, "scale": torch.ones(6, dtype=torch.bool)}
    start = bits(model.embed.weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = restrict_to_subnetwork(model, optimizer, masks)
    assert handle.ignored_buffer_masks == 1
    ids = torch.randint(0, 10, (4, 5), generator=g)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, 10), ids.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = bits(model.embed.weight) != start
    union = m_embed | m_head
    assert not bool((changed & ~union).any())
    assert bool((changed & m_embed & ~m_head).any()) and bool((changed & m_head & ~m_embed).any())


def test_peft_lora_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("up", nn.Linear(8, 16))
    base.add_module("act", nn.ReLU())
    base.add_module("down", nn.Linear(16, 4))
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(3)
    # Masks keyed as the un-wrapped model would name them (no "base_model.model." prefix).
    masks = {matching_key(n): torch.rand(p.shape, generator=g) < 0.4 for n, p in trainable.items()}
    start = {matching_key(n): bits(p) for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    restrict_to_subnetwork(model, optimizer, masks)
    train(model, optimizer, steps=3)
    now = {matching_key(n): p for n, p in trainable.items()}
    assert all(int(((bits(now[k]) != start[k]) & ~masks[k]).sum()) == 0 for k in masks)
    assert any(int(((bits(now[k]) != start[k]) & masks[k]).sum()) > 0 for k in masks)
    # Masks of a full fine-tuning run do not cover the adapters: a clear error, not a silent no-op.
    full_ft = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in base.named_parameters()
               if "lora_" not in n}
    with pytest.raises(SubnetworkError, match="no mask.*lora_A"):
        restrict_to_subnetwork(model, None, full_ft)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _trainer(model, tmp_path, callbacks, steps=3):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 16), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_trainer_callback_keeps_masked_out_weights_bit_identical(tmp_path):
    model = _tiny_llama()
    masks = random_masks(model, density=0.3)
    path = tmp_path / "masks.safetensors"
    save_masks(path, {"update": masks})
    start = {n: bits(p) for n, p in model.named_parameters()}
    callback = SubnetworkCallback(path)
    _trainer(model, tmp_path, [callback]).train()
    outside, inside = changed_fractions(model, start, masks)
    assert outside == 0
    assert inside > 0.9
    assert callback.restriction is not None and callback.restriction.verify() == 0


def test_trainer_callback_rejects_masks_of_another_model(tmp_path):
    model = _tiny_llama()
    masks = random_masks(tiny_model())
    trainer = _trainer(model, tmp_path, [SubnetworkCallback(masks)])
    with pytest.raises(SubnetworkError, match="do not fit this model"):
        trainer.train()


def test_plain_loop_api_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, torch, gradtrace.masks.subnetwork as s; m = torch.nn.Linear(2, 2); "
            "s.restrict_to_subnetwork(m, None, {n: torch.ones_like(p, dtype=torch.bool) for n, p in "
            "m.named_parameters()}); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_subnetwork_only_example_runs_and_stays_inside_the_mask(capsys):
    """examples/subnetwork_only.py, shortened: the sub run only moves weights the full run moved."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "subnetwork_only.py"
    spec = importlib.util.spec_from_file_location("subnetwork_only_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--steps", "6"])
    assert summary["inside"] == 1.0
    assert 0.3 < summary["sparsity"] < 0.99  # bf16 absorbs many updates at this lr: a real subnetwork
    assert summary["identical"] > 0.8
    assert "θ_sub vs θ_full" in capsys.readouterr().out
