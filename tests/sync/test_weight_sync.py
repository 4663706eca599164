"""The weight-sync budget (gradtrace.sync) in real Trainer runs, against weights saved after every step.

The reference casts the trainer's weights to the sync dtype after every optimizer step and compares them
bitwise with the previous step's (per step) and with those of the last sync (per window); a bf16 copy
patched step by step must equal the trainer's cast weights bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from gradtrace import GradTraceCallback
from gradtrace.anatomy.parameter_names import tracked_name
from gradtrace.demo import runs
from gradtrace.sync import ENCODINGS, Patch, SyncObserver, diff_weights
from gradtrace.sync.patch import read_varint_deltas, varint_bytes, varint_deltas
from tests.helpers.sync_reference import assert_sync_section, changed

STEPS, EVERY = 20, 4


class CastEveryStep(TrainerCallback):
    """After each optimizer step (after gradtrace's callback): the weights cast to the sync dtype, the
    observer's patch applied to a bf16 copy, and the summary checked against the reference."""

    def __init__(self, gradtrace_callback: GradTraceCallback, dtype: torch.dtype | None):
        self.gradtrace, self.dtype = gradtrace_callback, dtype
        self.checked_steps = self.checked_windows = 0
        self.step_fractions: list[float] = []

    def cast(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(self.dtype or p.dtype).clone() for n, p in self.params.items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = {tracked_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.previous = self.synced = self.cast()
        self.engine = self.cast()  # the inference engine's copy, patched step by step
        self.masks = self.window_masks = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        current = self.cast()
        self.masks = {n: changed(self.previous[n], current[n]) for n in current}
        sync = self.gradtrace.session.sync
        for name, mask in self.masks.items():  # the patch names exactly the changed elements, new values
            part = sync.patch.tensors[name]
            assert torch.equal(part.indices.long(), mask.nonzero().reshape(-1)), name
            assert torch.equal(part.values, current[name].reshape(-1)[mask]), name
        sync.patch.apply(self.engine)
        for name in current:
            assert torch.equal(self.engine[name].view(torch.int16 if self.engine[name].element_size() == 2
                                                      else torch.int32),
                               current[name].view(torch.int16 if current[name].element_size() == 2
                                                  else torch.int32)), name
        for encoding in ENCODINGS:  # byte counts are the encoded buffers' lengths
            assert sync.patch.nbytes(encoding) == len(sync.patch.encode(encoding, current)), encoding
        self.step_fractions.append(sum(int(m.sum()) for m in self.masks.values())
                                   / sum(m.numel() for m in self.masks.values()))
        self.previous = current
        if (state.global_step + 1) % EVERY == 0:
            self.window_masks = {n: changed(self.synced[n], current[n]) for n in current}
            self.synced = current

    def on_step_end(self, args, state, control, **kwargs):
        summary = self.gradtrace.summary
        assert summary["step"] == state.global_step
        section = summary["sync"]
        assert section["step"] == state.global_step
        assert_sync_section(section, "step_changed", self.masks)
        assert summary["global"]["sync_step_changed"] == section["global"]["step_changed"]
        self.checked_steps += 1
        if self.window_masks is not None:
            assert section["window_end_step"] == state.global_step - state.global_step % EVERY
            assert_sync_section(section, "window_changed", self.window_masks)
            self.checked_windows += 1


def _run(base_path, tmp_path, *, dtype, sync_dtype, bf16_autocast: bool, every: int = EVERY):
    callback = GradTraceCallback(strict=True, wandb=False, sync_dtype=sync_dtype, sync_every=every)
    check = CastEveryStep(callback, torch.bfloat16 if sync_dtype == "bfloat16" else None)
    trainer = runs.build_trainer(base_path, tmp_path, callbacks=[callback, check], max_steps=STEPS,
                                 logging_steps=1, dtype=dtype, learning_rate=3e-4, use_cpu=True,
                                 bf16=bf16_autocast, quiet=True)
    trainer.train()
    return callback, check


def test_fp32_weights_bf16_autocast_per_step_and_window_in_bf16(base_path, tmp_path):
    callback, check = _run(base_path, tmp_path, dtype=torch.float32, sync_dtype="bfloat16", bf16_autocast=True)
    assert check.checked_steps == STEPS and check.checked_windows == STEPS - EVERY + 1
    # fp32 Adam steps change nearly every fp32 element but leave many bf16 casts as they were
    assert 0 < min(check.step_fractions) and max(check.step_fractions) < 1
    summary = json.loads((tmp_path / "gradtrace" / "summary.json").read_text())
    section = summary["sync"]
    assert section["dtype"] == "bfloat16" and section["sync_every"] == EVERY
    numel = sum(p.numel() for p in check.params.values())
    assert section["host_bytes"] == 3 * 2 * numel  # after and before the step, and the last sync: 2 B each
    assert section["step_best_encoding"] == min(section["step_bytes"], key=section["step_bytes"].get)
    assert section["step_bytes"]["dense"] == 2 * numel
    # cumulative and per-step kept apart: the cumulative update_sparsity is its own number
    assert "update_sparsity" in summary["global"] and "update_sparsity" not in section["global"]


def test_bf16_weights_storage_dtype(base_path, tmp_path):
    callback, check = _run(base_path, tmp_path, dtype=torch.bfloat16, sync_dtype="storage", bf16_autocast=False)
    assert check.checked_steps == STEPS
    assert callback.summary["sync"]["dtype"] == "storage"
    assert callback.summary["sync"]["host_bytes"] == 3 * 2 * sum(p.numel() for p in check.params.values())


def test_off_by_default_and_bad_arguments_are_clear(base_path, tmp_path):
    callback = GradTraceCallback(strict=True, wandb=False)
    runs.build_trainer(base_path, tmp_path, callbacks=[callback], max_steps=2, logging_steps=1,
                       use_cpu=True, quiet=True).train()
    assert callback.session.sync is None and "sync" not in callback.summary
    assert not any(key.startswith("sync_") for key in callback.summary["global"])
    with pytest.raises(ValueError, match="sync_dtype='int8'"):
        GradTraceCallback(sync_dtype="int8")
    with pytest.raises(ValueError, match="sync_every"):
        SyncObserver([("w", torch.zeros(3))], "bfloat16", every=0)


def test_patch_encodings_decode_to_the_same_changes():
    """Every sparse encoding carries the indices and values; a peer can decode them back."""
    generator = torch.Generator().manual_seed(0)
    before = {"a": torch.randn(300, 7, generator=generator), "b": torch.randn(5, generator=generator)}
    after = {n: t.clone() for n, t in before.items()}
    after["a"].view(-1)[torch.tensor([0, 1, 129, 2099])] += 1.0
    after["b"][3] = -0.0 if before["b"][3] == 0 else 0.0  # only the sign bit: still a change
    patch = diff_weights(before, after, "bfloat16")
    assert patch.changed == 5
    cast = {n: t.to(torch.bfloat16) for n, t in after.items()}
    a = patch.tensors["a"]
    raw = patch.tensors["a"].encode("delta_indices_values")
    values = a.values.view(torch.int16).numpy().tobytes()
    assert raw.endswith(values)
    assert read_varint_deltas(raw[: len(raw) - len(values)], a.changed).tolist() == [0, 1, 129, 2099]
    assert a.encode("indices_values")[: 4 * a.changed] == a.indices.numpy().tobytes()
    assert len(patch.encode("dense", cast)) == 2 * (2100 + 5) == patch.nbytes("dense")
    engine = {n: t.to(torch.bfloat16) for n, t in before.items()}
    patch.apply(engine)
    assert all(torch.equal(engine[n].view(torch.int16), cast[n].view(torch.int16)) for n in cast)
    with pytest.raises(ValueError, match="pass the current weights"):
        patch.encode("dense")
    with pytest.raises(KeyError, match="'b'"):
        Patch(patch.tensors).apply({"a": engine["a"]})


def test_byte_counts_computed_without_encoding_equal_the_encoded_lengths():
    """The summary's byte counts come from the changed counts (and, for delta-coded indices, the varint widths
    summed) without building the buffers: each equals the encoded buffer's length, gaps of every LEB128
    width included (1 to 5 bytes in int32 indices, up to 10 past 2^31 elements)."""
    int32 = np.cumsum([0, 1, 127, 128, 2**14 - 1, 2**14, 2**21, 2**28 - 1, 2**28, 3]).astype(np.int32)
    int64 = np.cumsum([5, 2**31, 2**35, 2**42, 2**49, 2**56, 2**62]).astype(np.int64)
    for indices in (int32, int64, np.zeros(0, dtype=np.int32)):
        assert varint_bytes(indices) == len(varint_deltas(indices))
        if indices.size:
            assert read_varint_deltas(varint_deltas(indices), indices.size).tolist() == indices.tolist()
    assert len(varint_deltas(int64[-1:])) == 9 and len(varint_deltas(int32[-1:])) == 5
    generator = torch.Generator().manual_seed(1)
    before = torch.randn(4000, 3, generator=generator)
    after = before.clone()
    after.view(-1)[torch.randperm(12000, generator=generator)[:700]] *= 1.5  # scattered: gaps of 1 and 2 bytes
    after.view(-1)[11990:] += 1.0
    current = after.to(torch.bfloat16)
    patch = diff_weights({"w": before}, {"w": after}, "bfloat16")
    assert 700 < patch.changed < 12000
    for encoding in ENCODINGS:
        assert patch.nbytes(encoding) == len(patch.encode(encoding, {"w": current})), encoding


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_per_step_and_window_match_the_gathered_weights(tmp_path, mode):
    """2 gloo processes: per-step and window fractions (summed over FSDP2's shards) equal those of the
    full weights gathered and cast to bf16 after every step."""
    from tests.helpers.launching import launch

    launch("loop_sync.py", mode, str(tmp_path / mode), processes=2, cwd=tmp_path)
    weights = torch.load(tmp_path / mode / "weights.pt")
    saved = json.loads((tmp_path / mode / "sections.json").read_text())
    assert saved["sharded"] == (mode == "fsdp2")
    numel = sum(t.numel() for t in weights[0].values())
    every = saved["sections"][0]["sync_every"]
    for step, section in enumerate(saved["sections"], start=1):
        masks = {n: changed(weights[step - 1][n], weights[step][n]) for n in weights[step]}
        assert_sync_section(section, "step_changed", masks)
        window_end = step - step % every
        if window_end:
            window = {n: changed(weights[window_end - every][n], weights[window_end][n]) for n in weights[0]}
            assert_sync_section(section, "window_changed", window)
        assert section["step_bytes"]["dense"] == 2 * numel  # the shards' bytes add up to the whole
        assert section["step_bytes"]["indices_values"] == sum(int(m.sum()) for m in masks.values()) * (4 + 2)


def test_per_expert_fractions_of_a_fused_moe(tmp_path):
    """Qwen3-MoE's fused expert tensors: each routed expert's per-step changed fraction is that of its
    slice along dim 0 (plus nothing else: its tensors are fused), as counted from the cast weights."""
    import gradtrace
    from gradtrace.anatomy.naming import layer_key
    from tests.helpers.moe_models import VOCAB, qwen3_moe

    torch.manual_seed(0)
    model = qwen3_moe()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, strict=True,
                             sync_dtype="bfloat16")
    params = dict(tracer.tracker.named_parameters())
    before = {n: p.detach().to(torch.bfloat16).clone() for n, p in params.items()}
    batch = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after = {n: p.detach().to(torch.bfloat16).clone() for n, p in params.items()}
        expected: dict[str, list[int]] = {}
        for name, tensor in after.items():
            if ".experts." in name and tensor.shape[0] == 8:
                rows = changed(before[name], tensor).reshape(8, -1)
                for expert in range(8):
                    entry = expected.setdefault(f"{layer_key(name)}/{expert}", [0, 0])
                    entry[0] += int(rows[expert].sum())
                    entry[1] += rows.shape[1]
        section = tracer.session.last_summary["sync"]
        assert {k: v["step_changed"] for k, v in section["per_expert"].items()} == \
            {k: c / n for k, (c, n) in expected.items()}
        fractions = [c / n for c, n in expected.values()]
        assert min(fractions) < max(fractions)  # top-1 routing: some experts got no token, others did
        before = after
    tracer.finish()
