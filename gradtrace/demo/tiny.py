"""A tiny, fully local causal LM plus synthetic tasks for the demo and the tests.

Nothing here touches the Hugging Face Hub: the tokenizer is built with the ``tokenizers`` library, the model
from a config, and the data sets from a seeded ``random.Random``. Everything is deterministic for a seed, so
runs and tests are reproducible on a CPU-only box.

Two tasks share one character-level vocabulary:

* ``"add"`` (alias ``"in"``, the in-distribution task): ``"12+7="`` -> ``"19"``.
* ``"reverse"`` (alias ``"out"``, the out-of-distribution task): ``"abc>"`` -> ``"cba"``. It uses letters
  instead of digits, so a run on it moves different embedding rows than a run on addition.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
#: Every non-special token; each is exactly one character and one token.
CHARS: tuple[str, ...] = tuple(string.digits) + tuple("+-*=>") + tuple(string.ascii_lowercase) + (" ",)
MAX_LENGTH = 64  # longest sequence the tiny model is built for (prompt + completion + specials)

IN_TASK = "add"
OUT_TASK = "reverse"
_TASK_ALIASES = {"in": IN_TASK, "out": OUT_TASK}


# --------------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (one token per character) without any download.

    Encoding prepends ``<bos>`` (TRL tokenizes plain-text prompts with ``add_special_tokens=True`` in SFT, DPO
    and GRPO alike, so every trainer sees the same ``<bos>`` prefix); ``<eos>`` is not appended, because TRL
    appends the eos *text* to completions itself. Padding defaults to the left, which is what generation
    needs; TRL's collators pad on the side they need regardless of this setting.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character on its own
    tok.decoder = decoders.Fuse()  # join characters back without spaces in between
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
        truncation_side="left",
        model_max_length=MAX_LENGTH,
    )


# ------------------------------------------------------------------------------------------------------- model
def build_model(
    tokenizer: PreTrainedTokenizerFast,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    intermediate_size: int = 256,
) -> PreTrainedModel:
    """Build a fresh tiny causal LM (about 0.6M parameters with the defaults) with weights in ``dtype``.

    ``arch`` is ``"qwen2"`` (q/k/v biases, like Qwen2.5) or ``"llama"`` (no biases). Weights are initialised in
    float32 under ``torch.manual_seed(seed)`` and cast afterwards, so the same seed gives the same weights (up to
    rounding) in every dtype. ``tie_word_embeddings`` is off so ``embed_tokens`` and ``lm_head`` are distinct
    parameters. ``config._name_or_path`` is a descriptive name, not a loadable path: TRL builds reference models
    from it, so save the model with :func:`save_base` (which points it at the folder) before handing it to TRL.
    """
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(dtype)
    model.config._name_or_path = f"gradtrace-tiny-{arch}"
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> str:
    """Save model and tokenizer to ``path`` and return the absolute path as a string.

    Afterwards ``model.config._name_or_path`` is that path, so TRL can build a reference model from the
    in-memory model too (GRPO with ``beta > 0`` and DPO call ``from_pretrained(config._name_or_path)``).
    """
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model.config._name_or_path = str(path)
    return str(path)


def load_base(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a saved base with ``AutoModelForCausalLM.from_pretrained`` (the path real users take)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved by :func:`save_base`."""
    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A synthetic task: ``sample(rng) -> (prompt, answer)`` and ``corrupt(rng, prompt, answer) -> wrong``."""

    name: str
    sample: Callable[[random.Random], tuple[str, str]]
    corrupt: Callable[[random.Random, str, str], str]
    max_answer_len: int  # characters, without eos


ADD_MAX_OPERAND = 19  # operands in [0, 19]: 400 distinct prompts, answers of 1-2 digits
REVERSE_LETTERS = "abcdefgh"
REVERSE_MIN_LEN, REVERSE_MAX_LEN = 2, 4


def _add_sample(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, ADD_MAX_OPERAND), rng.randint(0, ADD_MAX_OPERAND)
    return f"{a}+{b}=", str(a + b)


def _add_corrupt(rng: random.Random, prompt: str, answer: str) -> str:
    wrong = int(answer) + rng.choice([-3, -2, -1, 1, 2, 3])
    return str(wrong if wrong >= 0 else int(answer) + 1)


def _reverse_sample(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(REVERSE_LETTERS) for _ in range(rng.randint(REVERSE_MIN_LEN, REVERSE_MAX_LEN)))
    return f"{word}>", word[::-1]


def _reverse_corrupt(rng: random.Random, prompt: str, answer: str) -> str:
    word = prompt[:-1]
    if word != answer:  # copying instead of reversing is the natural mistake
        return word
    # palindrome: change one letter
    i = rng.randrange(len(answer))
    letter = rng.choice([c for c in REVERSE_LETTERS if c != answer[i]])
    return answer[:i] + letter + answer[i + 1 :]


TASKS: dict[str, Task] = {
    IN_TASK: Task(IN_TASK, _add_sample, _add_corrupt, max_answer_len=2),
    OUT_TASK: Task(OUT_TASK, _reverse_sample, _reverse_corrupt, max_answer_len=REVERSE_MAX_LEN),
}


def get_task(task: str) -> Task:
    """Resolve a task name (``"add"``/``"reverse"``) or alias (``"in"``/``"out"``)."""
    name = _TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS) + sorted(_TASK_ALIASES)}")
    return TASKS[name]


def max_completion_tokens(task: str) -> int:
    """Completion tokens needed for a full answer plus ``<eos>``."""
    return get_task(task).max_answer_len + 1


def _examples(task: str, n: int, seed: int) -> tuple[Task, random.Random, list[tuple[str, str]]]:
    t = get_task(task)
    rng = random.Random(f"{t.name}:{seed}")  # str seeds hash deterministically (not via PYTHONHASHSEED)
    return t, rng, [t.sample(rng) for _ in range(n)]


def sft_dataset(task: str = IN_TASK, n: int = 512, seed: int = 0) -> Dataset:
    """Prompt-completion data for ``SFTTrainer``: columns ``prompt``, ``completion``.

    The completion carries no ``<eos>``; ``SFTTrainer`` appends ``tokenizer.eos_token`` itself.
    """
    _, _, ex = _examples(task, n, seed)
    return Dataset.from_dict({"prompt": [p for p, _ in ex], "completion": [a for _, a in ex]})


def text_dataset(task: str = IN_TASK, n: int = 512, seed: int = 0, eos_token: str = EOS) -> Dataset:
    """Plain language-modelling data (column ``text`` = prompt + answer + eos) for a vanilla ``Trainer``."""
    _, _, ex = _examples(task, n, seed)
    return Dataset.from_dict({"text": [p + a + eos_token for p, a in ex]})


def prompt_dataset(task: str = IN_TASK, n: int = 512, seed: int = 0) -> Dataset:
    """Prompts for ``GRPOTrainer``: columns ``prompt`` and ``answer`` (passed to reward functions by name)."""
    _, _, ex = _examples(task, n, seed)
    return Dataset.from_dict({"prompt": [p for p, _ in ex], "answer": [a for _, a in ex]})


def preference_dataset(task: str = IN_TASK, n: int = 512, seed: int = 0) -> Dataset:
    """Preference pairs for ``DPOTrainer``: ``prompt``, ``chosen`` (correct), ``rejected`` (a near miss)."""
    t, rng, ex = _examples(task, n, seed)
    return Dataset.from_dict(
        {
            "prompt": [p for p, _ in ex],
            "chosen": [a for _, a in ex],
            "rejected": [t.corrupt(rng, p, a) for p, a in ex],
        }
    )


# ------------------------------------------------------------------------------------------------------ reward
_LEADING_INT = re.compile(r"\s*(\d+)")


def score_completion(completion: str, answer: str) -> float:
    """Score one completion against the ground truth; see :func:`reward_exact_match` for the scale."""
    text = completion.strip()
    if text == answer:
        return 1.0
    if answer.isdigit():
        m = _LEADING_INT.match(text)
        if m is None:
            return 0.0
        return 0.5 * max(0.0, 1.0 - abs(int(m.group(1)) - int(answer)) / 10.0)
    if not text:
        return 0.0
    hits = sum(a == b for a, b in zip(text, answer, strict=False))
    return 0.5 * hits / max(len(text), len(answer))


def reward_exact_match(completions: list, answer: list[str], **kwargs: object) -> list[float]:
    """GRPO reward: 1.0 for an exactly right answer, partial credit (< 0.5) for near misses, else 0.0.

    Partial credit keeps the rewards inside a GRPO group from being all equal (which would give zero advantage
    and no gradient) while the tiny policy is still weak:

    * numeric answers: ``0.5 * max(0, 1 - |pred - answer| / 10)`` where ``pred`` is the completion's leading
      integer (``"18"`` for ``"19"`` scores 0.45, ``"19x"`` scores 0.5, ``"x"`` scores 0);
    * other answers: ``0.5 * (matching characters at the same position) / max(len(pred), len(answer))``.

    Completions arrive decoded with special tokens skipped; conversational completions (lists of messages)
    are scored on their last message's content.
    """
    scores = []
    for completion, target in zip(completions, answer, strict=True):
        if isinstance(completion, list):  # conversational format: [{"role": "assistant", "content": ...}]
            completion = completion[-1]["content"] if completion else ""
        scores.append(score_completion(completion, str(target)))
    return scores


@torch.no_grad()
def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    task: str = IN_TASK,
    n: int = 64,
    seed: int = 12345,
) -> float:
    """Greedy exact-match accuracy on ``n`` prompts drawn with ``seed`` (for demo summaries and sanity checks).

    The addition task has only 400 distinct prompts, so these overlap with training prompts: this measures how
    well the task is done, not generalisation.
    """
    data = prompt_dataset(task, n, seed)
    was_training = model.training
    model.eval()
    enc = tokenizer(list(data["prompt"]), return_tensors="pt", padding=True, padding_side="left")
    enc = enc.to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=max_completion_tokens(task),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return sum(t.strip() == a for t, a in zip(texts, data["answer"], strict=True)) / len(texts)
