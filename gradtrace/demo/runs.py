"""Build and run small trainers (TRL GRPO/SFT/DPO and a plain ``transformers.Trainer``) on the tiny model.

Every ``run_*`` function loads the policy from a saved base folder (see :func:`make_base_policy`), takes a
``callbacks`` list (so a ``GradTraceCallback`` can be passed), trains, and returns a :class:`RunResult`. Each
has a ``build_*`` twin that returns the trainer before ``.train()``, for tests that want to look first.

Common keyword arguments: ``callbacks``, ``task`` (``"in"``/``"add"`` or ``"out"``/``"reverse"``),
``learning_rate``, ``max_steps``, ``dtype``, ``seed``, ``report_to`` (``"none"``/``"wandb"``), ``logging_steps``,
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_grad_norm``, ``save_steps`` (None: no
checkpoints), ``run_name``, ``use_cpu`` (None: CPU unless CUDA is visible), ``peft_config``, ``quiet`` (drop the
callback that prints each log dict) and ``**config_overrides`` passed on to the config class.

CPU notes (TRL 1.16 / transformers 5.x):

* ``dtype`` is the dtype of the *weights* (default bfloat16: pure-bf16 training, no autocast). Mixed precision
  is switched off (``bf16=False, fp16=False``): TRL configs default ``bf16`` to True, which would put fp32
  weights under CPU autocast.
* With bf16 weights an Adam step below about half a bf16 ulp (~0.2-0.4% of the weight) is rounded away. The
  tiny model's weights are ~0.02-0.05, so the default ``learning_rate=1e-4`` sits where that matters (30 GRPO
  steps change ~60% of bf16 entries vs ~90% in fp32) while still training stably; 1e-3 is unstable.
* TRL configs default ``gradient_checkpointing=True``; it only costs time on this model, so it is off.
* The learning rate is constant (no warmup or decay) so every step is comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput

from gradtrace.demo.tiny import (
    IN_TASK,
    build_model,
    build_tokenizer,
    get_task,
    load_base,
    load_tokenizer,
    max_completion_tokens,
    preference_dataset,
    prompt_dataset,
    reward_exact_match,
    save_base,
    sft_dataset,
    text_dataset,
)

__all__ = [
    "CausalLMCollator",
    "RunResult",
    "build_dpo",
    "build_grpo",
    "build_sft",
    "build_trainer",
    "default_lora_config",
    "make_base_policy",
    "run_dpo",
    "run_grpo",
    "run_sft",
    "run_trainer",
]


_CHECKPOINTING_FLAG = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    else "gradient_checkpointing"
)


@dataclass
class RunResult:
    """What a ``run_*`` function hands back: the trained trainer plus a few conveniences."""

    trainer: Trainer
    train_output: TrainOutput
    seconds: float  # wall time of ``trainer.train()`` only
    output_dir: str
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> PreTrainedModel:
        """The trained model (unwrapped; a ``PeftModel`` when LoRA was used)."""
        return self.trainer.model


def default_lora_config(r: int = 4, alpha: int = 8) -> Any:
    """A ``peft.LoraConfig`` on ``q_proj``/``v_proj`` for causal-LM fine-tuning (imports peft lazily)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )


def _common_args(
    output_dir: str | Path,
    *,
    learning_rate: float,
    max_steps: int,
    seed: int,
    report_to: str | list[str],
    logging_steps: int,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float,
    save_steps: int | None,
    run_name: str | None,
    use_cpu: bool | None,
) -> dict[str, Any]:
    """Keyword arguments shared by ``TrainingArguments`` and every TRL config (see module docstring)."""
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        logging_strategy="steps",
        logging_steps=logging_steps,
        report_to=report_to,
        run_name=run_name,
        save_strategy="steps" if save_steps else "no",
        use_cpu=use_cpu,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    # TRL defaults to checkpointing on; transformers>=5.x renamed the flag (the old name warns).
    kwargs[_CHECKPOINTING_FLAG] = False
    if save_steps:
        kwargs["save_steps"] = save_steps
    return kwargs


def _quiet(trainer: Trainer, quiet: bool) -> Trainer:
    """With ``quiet``, drop the ``PrinterCallback`` that prints every log dict to stdout."""
    if quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer


def _finish(trainer: Trainer, output_dir: str | Path) -> RunResult:
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    return RunResult(trainer, out, seconds, str(output_dir), list(trainer.state.log_history))


# ------------------------------------------------------------------------------------------------------- base
def make_base_policy(
    output_dir: str | Path,
    steps: int = 300,
    *,
    learning_rate: float = 3e-3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    arch: str = "qwen2",
    per_device_train_batch_size: int = 32,
    callbacks: list[TrainerCallback] | None = None,
    report_to: str | list[str] = "none",
    logging_steps: int = 50,
    quiet: bool = False,
) -> str:
    """SFT a freshly built tiny model on the in-distribution task and save it as ``output_dir/base``.

    Gives GRPO a policy that already earns some reward (partial credit at least). Trains in float32 by default
    (the base is the starting point, not the run under study); the saved weights are cast to ``dtype``.
    Returns the absolute path of the saved folder, loadable with :func:`~gradtrace.demo.tiny.load_base`.
    """
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, dtype=torch.float32, seed=seed, arch=arch)
    kwargs = _common_args(
        output_dir / "base-sft",
        learning_rate=learning_rate,
        max_steps=steps,
        seed=seed,
        report_to=report_to,
        logging_steps=logging_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        save_steps=None,
        run_name="base-sft",
        use_cpu=None,
    )
    kwargs["lr_scheduler_type"] = "cosine"  # anneal so the saved base is not mid-jump
    args = SFTConfig(**kwargs, max_length=32)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(IN_TASK, n=steps * per_device_train_batch_size, seed=seed),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer, quiet).train()
    model = trainer.model.to(dtype)
    return save_base(model, tokenizer, output_dir / "base")


# ------------------------------------------------------------------------------------------------------- GRPO
def build_grpo(
    base_path: str | Path,
    output_dir: str | Path,
    *,
    callbacks: list[TrainerCallback] | None = None,
    task: str = IN_TASK,
    learning_rate: float = 1e-4,
    max_steps: int = 30,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    report_to: str | list[str] = "none",
    logging_steps: int = 5,
    per_device_train_batch_size: int = 8,
    num_generations: int = 4,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    max_completion_length: int | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    save_steps: int | None = None,
    run_name: str | None = None,
    use_cpu: bool | None = None,
    peft_config: Any = None,
    quiet: bool = False,
    **config_overrides: Any,
) -> Any:
    """A ``trl.GRPOTrainer`` on ``task`` prompts rewarded by :func:`reward_exact_match`, not yet trained.

    ``per_device_train_batch_size`` counts completions: 8 with ``num_generations=4`` is 2 prompts per step.
    ``beta > 0`` loads a reference model from ``base_path``. ``config_overrides`` go to ``GRPOConfig``.
    """
    from trl import GRPOConfig, GRPOTrainer

    get_task(task)  # validate early
    max_steps_data = max_steps * per_device_train_batch_size * gradient_accumulation_steps // num_generations
    common = _common_args(
        output_dir,
        learning_rate=learning_rate,
        max_steps=max_steps,
        seed=seed,
        report_to=report_to,
        logging_steps=logging_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        save_steps=save_steps,
        run_name=run_name,
        use_cpu=use_cpu,
    )
    specific = {
        "num_generations": num_generations,
        "max_completion_length": max_completion_length or max_completion_tokens(task),
        "temperature": temperature,
        "beta": beta,
        "use_vllm": False,
        "log_completions": False,
    }
    args = GRPOConfig(**{**common, **specific, **config_overrides})
    trainer = GRPOTrainer(
        model=load_base(base_path, dtype),
        reward_funcs=reward_exact_match,
        args=args,
        train_dataset=prompt_dataset(task, n=max(max_steps_data, 64), seed=seed),
        processing_class=load_tokenizer(base_path),
        callbacks=callbacks,
        peft_config=peft_config,
    )
    return _quiet(trainer, quiet)


def run_grpo(base_path: str | Path, output_dir: str | Path, **kwargs: Any) -> RunResult:
    """Build (see :func:`build_grpo` for the arguments) and train a GRPO run."""
    return _finish(build_grpo(base_path, output_dir, **kwargs), output_dir)


# -------------------------------------------------------------------------------------------------------- SFT
def build_sft(
    base_path: str | Path,
    output_dir: str | Path,
    *,
    callbacks: list[TrainerCallback] | None = None,
    task: str = IN_TASK,
    learning_rate: float = 1e-4,
    max_steps: int = 30,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    report_to: str | list[str] = "none",
    logging_steps: int = 5,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    save_steps: int | None = None,
    run_name: str | None = None,
    use_cpu: bool | None = None,
    peft_config: Any = None,
    quiet: bool = False,
    **config_overrides: Any,
) -> Any:
    """A ``trl.SFTTrainer`` on ``task`` (``"in"``/``"add"`` or ``"out"``/``"reverse"``), not yet trained.

    Loss is on the completion only (TRL's default for prompt-completion data). ``peft_config`` (e.g.
    :func:`default_lora_config`) trains a LoRA adapter instead of the full model.
    """
    from trl import SFTConfig, SFTTrainer

    n = max(max_steps * per_device_train_batch_size * gradient_accumulation_steps, 64)
    common = _common_args(
        output_dir,
        learning_rate=learning_rate,
        max_steps=max_steps,
        seed=seed,
        report_to=report_to,
        logging_steps=logging_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        save_steps=save_steps,
        run_name=run_name,
        use_cpu=use_cpu,
    )
    specific = {
        "max_length": 32,
    }
    args = SFTConfig(**{**common, **specific, **config_overrides})
    trainer = SFTTrainer(
        model=load_base(base_path, dtype),
        args=args,
        train_dataset=sft_dataset(task, n=n, seed=seed),
        processing_class=load_tokenizer(base_path),
        callbacks=callbacks,
        peft_config=peft_config,
    )
    return _quiet(trainer, quiet)


def run_sft(base_path: str | Path, output_dir: str | Path, **kwargs: Any) -> RunResult:
    """Build (see :func:`build_sft` for the arguments) and train an SFT run."""
    return _finish(build_sft(base_path, output_dir, **kwargs), output_dir)


# -------------------------------------------------------------------------------------------------------- DPO
def build_dpo(
    base_path: str | Path,
    output_dir: str | Path,
    *,
    callbacks: list[TrainerCallback] | None = None,
    task: str = IN_TASK,
    learning_rate: float = 1e-4,
    max_steps: int = 30,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    report_to: str | list[str] = "none",
    logging_steps: int = 5,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    beta: float = 0.1,
    save_steps: int | None = None,
    run_name: str | None = None,
    use_cpu: bool | None = None,
    peft_config: Any = None,
    quiet: bool = False,
    **config_overrides: Any,
) -> Any:
    """A ``trl.DPOTrainer`` on ``task`` preference pairs, not yet trained.

    The reference model is loaded by TRL from ``base_path`` (the policy's ``config._name_or_path``).
    """
    from trl import DPOConfig, DPOTrainer

    n = max(max_steps * per_device_train_batch_size * gradient_accumulation_steps, 64)
    common = _common_args(
        output_dir,
        learning_rate=learning_rate,
        max_steps=max_steps,
        seed=seed,
        report_to=report_to,
        logging_steps=logging_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        save_steps=save_steps,
        run_name=run_name,
        use_cpu=use_cpu,
    )
    specific = {
        "beta": beta,
        "max_length": 32,
    }
    args = DPOConfig(**{**common, **specific, **config_overrides})
    trainer = DPOTrainer(
        model=load_base(base_path, dtype),
        args=args,
        train_dataset=preference_dataset(task, n=n, seed=seed),
        processing_class=load_tokenizer(base_path),
        callbacks=callbacks,
        peft_config=peft_config,
    )
    return _quiet(trainer, quiet)


def run_dpo(base_path: str | Path, output_dir: str | Path, **kwargs: Any) -> RunResult:
    """Build (see :func:`build_dpo` for the arguments) and train a DPO run."""
    return _finish(build_dpo(base_path, output_dir, **kwargs), output_dir)


# ------------------------------------------------------------------------------------------ plain Trainer
class CausalLMCollator:
    """Right-pad ``input_ids`` and set ``labels = input_ids`` with padding masked to -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, : len(f["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_trainer(
    base_path: str | Path,
    output_dir: str | Path,
    *,
    callbacks: list[TrainerCallback] | None = None,
    task: str = IN_TASK,
    learning_rate: float = 1e-4,
    max_steps: int = 30,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    report_to: str | list[str] = "none",
    logging_steps: int = 5,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    save_steps: int | None = None,
    run_name: str | None = None,
    use_cpu: bool | None = None,
    peft_config: Any = None,
    quiet: bool = False,
    **args_overrides: Any,
) -> Trainer:
    """A plain ``transformers.Trainer`` doing causal-LM training (loss on every token), not yet trained.

    With ``peft_config`` the model is wrapped with ``peft.get_peft_model`` first.
    """
    tokenizer = load_tokenizer(base_path)
    model = load_base(base_path, dtype)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    n = max(max_steps * per_device_train_batch_size * gradient_accumulation_steps, 64)
    data = text_dataset(task, n=n, seed=seed, eos_token=tokenizer.eos_token)
    data = data.map(lambda ex: {"input_ids": tokenizer(ex["text"])["input_ids"]}, remove_columns=["text"])
    common = _common_args(
        output_dir,
        learning_rate=learning_rate,
        max_steps=max_steps,
        seed=seed,
        report_to=report_to,
        logging_steps=logging_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        save_steps=save_steps,
        run_name=run_name,
        use_cpu=use_cpu,
    )
    args = TrainingArguments(**{**common, **args_overrides})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return _quiet(trainer, quiet)


def run_trainer(base_path: str | Path, output_dir: str | Path, **kwargs: Any) -> RunResult:
    """Build (see :func:`build_trainer` for the arguments) and train a plain ``Trainer`` run."""
    return _finish(build_trainer(base_path, output_dir, **kwargs), output_dir)
