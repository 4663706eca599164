"""GradTraceCallback inside real trainers (transformers Trainer, TRL SFT / DPO / GRPO), tiny model, CPU.

Each run also carries an independent ReferenceRecorder; the masks gradtrace exports must equal it.
"""

from __future__ import annotations

import os

import pytest
import torch

from gradtrace import GradTraceCallback, load_masks, read_run_log
from gradtrace.demo import runs
from tests.helpers.reference import assert_masks_equal_reference
from tests.helpers.trainer_callbacks import StopAt

pytestmark = pytest.mark.filterwarnings("error::gradtrace.GradTraceWarning")


def traced(tmp_path, reference, **kwargs):
    callback = GradTraceCallback(strict=True, wandb=False, cancellation="full", **kwargs)
    return callback, [callback, reference]


def test_trainer_bf16_with_accumulation_and_clipping(tmp_path, base_path, reference):
    callback, callbacks = traced(tmp_path, reference)
    result = runs.run_trainer(base_path, tmp_path, callbacks=callbacks, max_steps=6, logging_steps=2,
                              gradient_accumulation_steps=3, per_device_train_batch_size=4,
                              max_grad_norm=0.5, learning_rate=1e-2, dtype=torch.bfloat16)
    masks = load_masks(tmp_path / "gradtrace" / "masks.safetensors")
    assert_masks_equal_reference(masks, reference)
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    assert reference.optimizer_steps == 6  # optimizer steps, not the 18 micro-batches
    log = read_run_log(tmp_path / "gradtrace")
    assert [r["step"] for r in log["logs"]] == [2, 4, 6]
    assert log["logs"][-1]["optimizer_steps"] == 6
    assert log["info"]["gradient_accumulation_steps"] == 3 and log["info"]["max_grad_norm"] == 0.5
    assert log["info"]["parameters"]["elements_by_dtype"] == {
        "bfloat16": sum(p.numel() for p in result.model.parameters())}
    # the unused letters' embedding rows never get a gradient: the add task uses digits and + =
    from gradtrace.demo.tiny import build_tokenizer

    letter_row = build_tokenizer().convert_tokens_to_ids("q")
    assert not masks["gradient"]["model.embed_tokens.weight"][letter_row].any()
    g = log["logs"][-1]["global"]
    parts = [g[c] for c in ("no_gradient", "changed_without_gradient", "updated", "cancelled", "absorbed")]
    assert sum(parts) == pytest.approx(1.0)


def test_sft_trainer(tmp_path, base_path, reference):
    callback, callbacks = traced(tmp_path, reference)
    runs.run_sft(base_path, tmp_path, callbacks=callbacks, max_steps=4, logging_steps=2, learning_rate=1e-2,
                 per_device_train_batch_size=4)
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace" / "masks.safetensors"), reference)
    assert callback.summary["optimizer_steps"] == 4


def test_dpo_trainer(tmp_path, base_path, reference):
    callback, callbacks = traced(tmp_path, reference)
    runs.run_dpo(base_path, tmp_path, callbacks=callbacks, max_steps=3, logging_steps=1, learning_rate=1e-2,
                 per_device_train_batch_size=4)
    masks = load_masks(tmp_path / "gradtrace" / "masks.safetensors")
    assert_masks_equal_reference(masks, reference)
    assert masks.info["model_class"] == "Qwen2ForCausalLM"


def test_grpo_trainer(tmp_path, base_path, reference):
    callback, callbacks = traced(tmp_path, reference)
    runs.run_grpo(base_path, tmp_path, callbacks=callbacks, max_steps=3, logging_steps=1, learning_rate=1e-2,
                  per_device_train_batch_size=8, num_generations=4)
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace" / "masks.safetensors"), reference)
    log = read_run_log(tmp_path / "gradtrace")
    assert [r["step"] for r in log["logs"]] == [1, 2, 3]


def test_lora_tracks_only_the_adapters(tmp_path, base_path, reference):
    callback, callbacks = traced(tmp_path, reference)
    runs.run_trainer(base_path, tmp_path, callbacks=callbacks, max_steps=3, logging_steps=1, learning_rate=1e-2,
                     peft_config=runs.default_lora_config(), dtype=torch.float32)
    masks = load_masks(tmp_path / "gradtrace" / "masks.safetensors")
    names = list(masks["gradient"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert_masks_equal_reference(masks, reference, some_without_gradient=False)  # LoRA: every adapter element
    kinds = set(callback.summary["per_kind"])
    assert kinds == {"q.lora_A", "q.lora_B", "v.lora_A", "v.lora_B"}


def test_resume_from_checkpoint_ends_with_the_masks_of_an_uninterrupted_run(tmp_path, base_path):
    common = dict(max_steps=6, save_steps=3, logging_steps=1, learning_rate=1e-2, dtype=torch.bfloat16,
                  per_device_train_batch_size=4)
    whole = tmp_path / "whole"
    runs.run_trainer(base_path, whole, callbacks=[GradTraceCallback(strict=True, wandb=False)], **common)

    parts = tmp_path / "parts"
    runs.run_trainer(base_path, parts, callbacks=[GradTraceCallback(strict=True, wandb=False), StopAt(3)],
                     **common)
    assert load_masks(parts / "gradtrace" / "masks.safetensors").step == 3
    assert os.path.isfile(parts / "checkpoint-3" / "gradtrace" / "tracker_state.safetensors")
    trainer = runs.build_trainer(base_path, parts, callbacks=[GradTraceCallback(strict=True, wandb=False)],
                                 **common)
    trainer.train(resume_from_checkpoint=True)

    expected = load_masks(whole / "gradtrace" / "masks.safetensors")
    resumed = load_masks(parts / "gradtrace" / "masks.safetensors")
    assert resumed.step == expected.step == 6
    for kind in ("gradient", "update"):
        for name, mask in expected[kind].items():
            assert torch.equal(resumed[kind][name], mask), (kind, name)
    updated = torch.cat([m.reshape(-1) for m in expected["update"].values()])
    assert updated.any() and not updated.all()
    log = read_run_log(parts / "gradtrace")
    assert [r["step"] for r in log["logs"]] == [1, 2, 3, 4, 5, 6]
    whole_log = read_run_log(whole / "gradtrace")
    assert log["logs"][-1]["global"] == whole_log["logs"][-1]["global"]


def test_a_failing_instrument_never_stops_training(tmp_path, base_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run directory should be")
    callback = GradTraceCallback(output_dir=blocker / "run", wandb=False)
    with pytest.warns(Warning, match="gradtrace") as caught:
        result = runs.run_trainer(base_path, tmp_path / "out", callbacks=[callback], max_steps=3,
                                  logging_steps=1, learning_rate=1e-2)
    assert result.trainer.state.global_step == 3
    assert sum("gradtrace" in str(w.message) for w in caught) == 1  # said once


def _trl_args(config_class, output_dir, **extra):
    """CPU settings shared with the demo runs (no autocast, no checkpointing, no saving)."""
    from gradtrace.demo.runs import _common_args

    common = _common_args(output_dir, learning_rate=1e-2, max_steps=3, seed=0, report_to="none", logging_steps=1,
                          per_device_train_batch_size=4, gradient_accumulation_steps=1, max_grad_norm=1.0,
                          save_steps=None, run_name=None, use_cpu=True)
    return config_class(**common, **extra)


def test_rloo_trainer(tmp_path, base_path, reference):
    from trl import RLOOConfig, RLOOTrainer

    from gradtrace.demo.tiny import load_base, load_tokenizer, prompt_dataset, reward_exact_match

    callback, callbacks = traced(tmp_path, reference)
    args = _trl_args(RLOOConfig, tmp_path, num_generations=4, max_completion_length=4)
    trainer = RLOOTrainer(model=load_base(base_path, torch.bfloat16), reward_funcs=reward_exact_match, args=args,
                          train_dataset=prompt_dataset("add", n=64), processing_class=load_tokenizer(base_path),
                          callbacks=callbacks)
    trainer.train()
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace" / "masks.safetensors"), reference)
    assert callback.summary["optimizer_steps"] == 3


def test_kto_trainer(tmp_path, base_path, reference):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from gradtrace.demo.tiny import load_base, load_tokenizer, preference_dataset

    pairs = preference_dataset("add", n=32)
    unpaired = Dataset.from_dict({
        "prompt": list(pairs["prompt"]) * 2,
        "completion": list(pairs["chosen"]) + list(pairs["rejected"]),
        "label": [True] * len(pairs) + [False] * len(pairs),
    }).shuffle(seed=0)
    callback, callbacks = traced(tmp_path, reference)
    trainer = KTOTrainer(model=load_base(base_path, torch.float32), args=_trl_args(KTOConfig, tmp_path),
                         train_dataset=unpaired, processing_class=load_tokenizer(base_path), callbacks=callbacks)
    trainer.train()
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace" / "masks.safetensors"), reference)
