"""GradTraceCallback in TRL 1.16's ``trl.experimental`` trainers that the paper's algorithm list maps to:
ORPO, CPO (sigmoid and SimPO losses), Online DPO and GKD, on the tiny local Qwen2 model, CPU.

Each run carries the independent ReferenceRecorder; the exported masks must equal it bit for bit.
Async GRPO (``trl.experimental.async_grpo``) is not here: its rollouts and weight sync go through a vLLM
server (``VLLMClient``), which cannot run on this CPU-only machine.
"""

from __future__ import annotations

import pytest
import torch

from gradtrace import GradTraceCallback, load_masks
from gradtrace.demo.runs import reward_exact_match
from gradtrace.demo.tiny import load_base, load_tokenizer, preference_dataset, prompt_dataset
from tests.helpers.reference import assert_masks_equal_reference

pytestmark = pytest.mark.filterwarnings("error::gradtrace.GradTraceWarning")

COMMON = dict(max_steps=3, logging_steps=1, learning_rate=1e-2, per_device_train_batch_size=4, report_to="none",
              use_cpu=True, save_strategy="no", lr_scheduler_type="constant", disable_tqdm=True, seed=0)


def _check(tmp_path, callback, reference, steps: int = 3) -> None:
    assert_masks_equal_reference(load_masks(tmp_path / "gradtrace" / "masks.safetensors"), reference)
    assert reference.optimizer_steps == steps and callback.summary["optimizer_steps"] == steps


def _callbacks():
    from tests.helpers.reference import ReferenceRecorder

    callback = GradTraceCallback(strict=True, wandb=False, cancellation="full")
    reference = ReferenceRecorder()
    return callback, reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_trainer(tmp_path, base_path, loss_type):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    callback, reference = _callbacks()
    extra = {"cpo_alpha": 0.0, "simpo_gamma": 0.5} if loss_type == "simpo" else {}
    args = CPOConfig(output_dir=str(tmp_path), loss_type=loss_type, max_length=32, **extra, **COMMON)
    CPOTrainer(model=load_base(base_path), args=args, train_dataset=preference_dataset(n=16),
               processing_class=load_tokenizer(base_path), callbacks=[callback, reference]).train()
    _check(tmp_path, callback, reference)


def test_orpo_trainer(tmp_path, base_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    callback, reference = _callbacks()
    args = ORPOConfig(output_dir=str(tmp_path), max_length=32, **COMMON)
    ORPOTrainer(model=load_base(base_path), args=args, train_dataset=preference_dataset(n=16),
                processing_class=load_tokenizer(base_path), callbacks=[callback, reference]).train()
    _check(tmp_path, callback, reference)


def test_online_dpo_trainer(tmp_path, base_path):
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    callback, reference = _callbacks()
    args = OnlineDPOConfig(output_dir=str(tmp_path), max_new_tokens=4, **COMMON)
    OnlineDPOTrainer(model=load_base(base_path), reward_funcs=reward_exact_match, args=args,
                     train_dataset=prompt_dataset(n=16), processing_class=load_tokenizer(base_path),
                     callbacks=[callback, reference]).train()
    _check(tmp_path, callback, reference)


def test_gkd_trainer(tmp_path, base_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    callback, reference = _callbacks()
    tokenizer = load_tokenizer(base_path)
    # GKD's ChatML collator renders conversations: a plain template for the character tokenizer
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    pairs = preference_dataset(n=16)
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                           for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)]})
    torch.manual_seed(1)
    teacher = load_base(base_path)
    with torch.no_grad():  # a teacher that differs from the student, so the distillation loss is not zero
        for param in teacher.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    args = GKDConfig(output_dir=str(tmp_path), max_length=32, max_new_tokens=4, lmbda=0.5, **COMMON)
    GKDTrainer(model=load_base(base_path), teacher_model=teacher, args=args, train_dataset=data,
               processing_class=tokenizer, callbacks=[callback, reference]).train()
    _check(tmp_path, callback, reference)
