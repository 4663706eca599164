"""Fast checks of the demo's tiny model, synthetic data and trainer plumbing (CPU only, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch
from transformers import TrainerCallback

from gradtrace.demo import runs, tiny


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> str:
    """A briefly SFT'd base (about 3 s): enough that GRPO groups get differing rewards."""
    out = tmp_path_factory.mktemp("demo")
    return runs.make_base_policy(out, steps=60, dtype=torch.float32)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


class StepCounter(TrainerCallback):
    """Stands in for GradTraceCallback: proves callbacks are wired into every trainer."""

    def __init__(self) -> None:
        self.steps = 0
        self.began = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = True

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_one_token_per_character(tokenizer):
    for ch in tiny.CHARS:
        ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, ch
    text = "12+7=19"
    assert tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) == list(
        text
    )


def test_tokenizer_specials_and_round_trip(tokenizer, tmp_path):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (
        len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id})
        == 4
    )
    assert tokenizer.padding_side == "left"
    ids = tokenizer("abc>cba<eos>")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # eos text -> eos token
    assert tokenizer.decode(ids, skip_special_tokens=True) == "abc>cba"
    assert tokenizer.decode(tokenizer("ab c+9")["input_ids"], skip_special_tokens=True) == "ab c+9"
    batch = tokenizer(["1+2=", "12+34="], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2  # left padding
    tokenizer.save_pretrained(tmp_path)
    again = tiny.load_tokenizer(tmp_path)
    assert again("12+7=19<eos>")["input_ids"] == tokenizer("12+7=19<eos>")["input_ids"]
    assert again.padding_side == "left" and again.pad_token_id == tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------- model
def test_model_size_determinism_and_dtype(tokenizer):
    a = tiny.build_model(tokenizer, seed=0)
    b = tiny.build_model(tokenizer, seed=0)
    c = tiny.build_model(tokenizer, seed=1)
    n = sum(p.numel() for p in a.parameters())
    assert 500_000 <= n <= 1_000_000
    assert a.config.vocab_size == len(tokenizer) and not a.config.tie_word_embeddings
    assert a.get_input_embeddings().weight.data_ptr() != a.get_output_embeddings().weight.data_ptr()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    bf = tiny.build_model(tokenizer, seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert torch.equal(bf.lm_head.weight, a.lm_head.weight.to(torch.bfloat16))
    llama = tiny.build_model(tokenizer, arch="llama")
    assert llama.config.model_type == "llama"
    with pytest.raises(ValueError):
        tiny.build_model(tokenizer, arch="gpt2")


def test_save_and_load_base_identical(tokenizer, tmp_path):
    model = tiny.build_model(tokenizer, seed=3, dtype=torch.bfloat16)
    path = tiny.save_base(model, tokenizer, tmp_path / "base")
    assert model.config._name_or_path == path
    loaded = tiny.load_base(path, dtype=torch.bfloat16)
    assert loaded.config._name_or_path == path  # what TRL builds reference models from
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("task", ["in", "out"])
def test_datasets_deterministic_and_correct(task):
    a, b, c = (
        tiny.sft_dataset(task, 50, seed=7),
        tiny.sft_dataset(task, 50, seed=7),
        tiny.sft_dataset(task, 50, seed=8),
    )
    assert a.column_names == ["prompt", "completion"]
    assert a[:] == b[:] and a[:] != c[:]
    prompts = tiny.prompt_dataset(task, 50, seed=7)
    assert prompts.column_names == ["prompt", "answer"]
    assert prompts["prompt"] == a["prompt"] and prompts["answer"] == a["completion"]
    for p, ans in zip(prompts["prompt"], prompts["answer"], strict=True):
        if tiny.get_task(task).name == "add":
            x, y = p.rstrip("=").split("+")
            assert p.endswith("=") and int(ans) == int(x) + int(y)
        else:
            assert p.endswith(">") and ans == p[:-1][::-1]
    prefs = tiny.preference_dataset(task, 50, seed=7)
    assert prefs.column_names == ["prompt", "chosen", "rejected"]
    assert prefs[:] == tiny.preference_dataset(task, 50, seed=7)[:]
    assert all(ch != rj for ch, rj in zip(prefs["chosen"], prefs["rejected"], strict=True))


def test_tasks_use_disjoint_content_tokens(tokenizer):
    """The OOD task should touch different embedding rows than the in-distribution one."""

    def token_set(task: str) -> set[int]:
        d = tiny.sft_dataset(task, 200, seed=0)
        return {
            i
            for p, c in zip(d["prompt"], d["completion"], strict=True)
            for i in tokenizer(p + c)["input_ids"]
        }

    shared = token_set("in") & token_set("out")
    assert shared == {tokenizer.bos_token_id}


def test_reward_function():
    r = tiny.reward_exact_match(["19", " 19", "18", "19x", "hello", "", "29"], answer=["19"] * 7)
    assert r[0] == r[1] == 1.0
    assert r[2] == pytest.approx(0.45) and r[3] == pytest.approx(0.5)
    assert r[4] == r[5] == r[6] == 0.0
    r = tiny.reward_exact_match(["cba", "abc", "xyz"], answer=["cba"] * 3, prompts=["abc>"] * 3)
    assert r[0] == 1.0 and 0.0 < r[1] < 0.5 and r[2] == 0.0
    convo = [[{"role": "assistant", "content": "7"}]]
    assert tiny.reward_exact_match(convo, answer=["7"]) == [1.0]


# ---------------------------------------------------------------------------------------------------- runs
def test_base_policy_earns_some_reward(base_path):
    model, tok = tiny.load_base(base_path), tiny.load_tokenizer(base_path)
    data = tiny.prompt_dataset("in", 32, seed=99)
    enc = tok(list(data["prompt"]), return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=3, do_sample=True, temperature=1.0)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = tiny.reward_exact_match(texts, data["answer"])
    assert sum(rewards) > 0 and len(set(rewards)) > 1


def test_grpo_bf16_two_steps_changes_weights(base_path, tmp_path):
    counter = StepCounter()
    trainer = runs.build_grpo(
        base_path,
        tmp_path,
        callbacks=[counter],
        max_steps=2,
        learning_rate=1e-3,
        dtype=torch.bfloat16,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        logging_steps=1,
    )
    before = _snapshot(trainer.model)
    assert trainer.ref_model is None  # beta=0 by default
    trainer.train()
    assert counter.began and counter.steps == 2 and trainer.state.global_step == 2
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    changed = _changed(before, trainer.model)
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2
    assert any("reward" in h for h in trainer.state.log_history)


def test_grpo_with_beta_builds_reference_from_path(base_path, tmp_path):
    result = runs.run_grpo(base_path, tmp_path, max_steps=1, beta=0.04, logging_steps=1)
    ref = result.trainer.ref_model
    assert ref is not None and ref.config._name_or_path == base_path and ref.dtype == torch.bfloat16
    assert any("kl" in h for h in result.log_history)


@pytest.mark.parametrize("task", ["in", "out"])
def test_sft_full_bf16_with_accumulation(base_path, tmp_path, task):
    counter = StepCounter()
    trainer = runs.build_sft(
        base_path,
        tmp_path,
        task=task,
        callbacks=[counter],
        max_steps=2,
        learning_rate=1e-3,
        gradient_accumulation_steps=2,
        save_steps=2,
    )
    before = _snapshot(trainer.model)
    trainer.train()
    assert counter.steps == 2
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert "model.embed_tokens.weight" in _changed(before, trainer.model)
    assert (tmp_path / "checkpoint-2").is_dir()


def test_sft_lora_trains_only_adapters(base_path, tmp_path):
    trainer = runs.build_sft(
        base_path, tmp_path, max_steps=2, learning_rate=1e-3, peft_config=runs.default_lora_config()
    )
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in n for n in changed)
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())


def test_dpo_reference_from_path(base_path, tmp_path):
    trainer = runs.build_dpo(
        base_path, tmp_path, max_steps=2, learning_rate=1e-3, gradient_accumulation_steps=2
    )
    assert trainer.ref_model is not None and trainer.ref_model.config._name_or_path == base_path
    before = _snapshot(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


def test_plain_trainer_fp32_and_lora(base_path, tmp_path):
    counter = StepCounter()
    result = runs.run_trainer(
        base_path,
        tmp_path / "full",
        callbacks=[counter],
        max_steps=2,
        dtype=torch.float32,
        gradient_accumulation_steps=3,
        max_grad_norm=0.1,
        logging_steps=1,
    )
    assert counter.steps == 2 and result.train_output.global_step == 2
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    assert all(h["grad_norm"] > 0 for h in result.log_history if "grad_norm" in h)
    lora = runs.run_trainer(base_path, tmp_path / "lora", max_steps=1, peft_config=runs.default_lora_config())
    assert type(lora.model).__name__ == "PeftModelForCausalLM"


def test_collator_masks_padding():
    batch = runs.CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[1, 5, 6], [1, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.slow
def test_runs_are_deterministic_for_a_seed(base_path, tmp_path):
    def weights(kind: str, seed: int) -> dict[str, torch.Tensor]:
        fn = runs.run_grpo if kind == "grpo" else runs.run_sft
        model = fn(
            base_path, tmp_path / f"{kind}{seed}", max_steps=2, learning_rate=1e-3, seed=seed, quiet=True
        ).model
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    for kind in ("grpo", "sft"):
        a, b, c = weights(kind, 0), weights(kind, 0), weights(kind, 1)
        assert all(torch.equal(a[n], b[n]) for n in a), kind
        assert any(not torch.equal(a[n], c[n]) for n in a), kind


def test_config_overrides_win_over_defaults(base_path, tmp_path):
    trainer = runs.build_sft(base_path, tmp_path, max_steps=1, lr_scheduler_type="linear", max_length=16)
    assert trainer.args.lr_scheduler_type == "linear" and trainer.args.max_length == 16
    assert trainer.args.bf16 is False and trainer.args.gradient_checkpointing is False
