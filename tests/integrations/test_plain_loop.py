"""``gradtrace.trace()`` in plain training loops and under accelerate, against the optimizer's own pre-step
hook: only what the optimizer steps is tracked, a wrapped optimizer with accumulation and clipping, parameter
sets that change mid-run, and steps at learning rate 0."""

from __future__ import annotations

import pytest
import torch

from gradtrace import GradTraceWarning, load_masks


def _llama(vocab: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class Reference:
    """Independent bookkeeping from the optimizer's own pre-step hook: the gradient each tensor held when
    the step applied it, ORed, and the values each tensor had when it first took part."""

    def __init__(self, optimizer):
        self.gradient: dict[int, torch.Tensor] = {}
        self.initial: dict[int, torch.Tensor] = {}
        self.optimizer = optimizer
        optimizer.register_step_pre_hook(lambda *_: self.before_step())

    def before_step(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.initial.setdefault(id(p), p.detach().clone())
                if p.grad is not None:
                    mask = (p.grad != 0) & torch.isfinite(p.grad)
                    self.gradient[id(p)] = self.gradient.get(id(p), torch.zeros_like(mask)) | mask

    def expect(self, param) -> tuple[torch.Tensor, torch.Tensor]:
        grad = self.gradient.get(id(param), torch.zeros(param.shape, dtype=torch.bool))
        return grad, param.detach().view(torch.int32) != self.initial[id(param)].view(torch.int32)


def _step(model, optimizer, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab // 2, (4, 8), generator=g)  # half the vocabulary never appears
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_only_what_the_optimizer_steps_is_tracked(tmp_path):
    import gradtrace

    model = _llama()
    layer1 = [p for n, p in model.named_parameters() if n.startswith("model.layers.1.")]
    optimizer = torch.optim.AdamW(layer1, lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 2))  # starts at lr 0
    reference = Reference(optimizer)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=2, wandb=False, strict=True)
    for step in range(4):
        _step(model, optimizer, 64, step)
        warmup.step()
    masks = load_masks(tracer.finish())
    stepped = {n: p for n, p in model.named_parameters() if n.startswith("model.layers.1.")}
    assert set(masks["gradient"]) == set(stepped)
    for name, param in stepped.items():
        gradient, updated = reference.expect(param)
        assert torch.equal(masks["gradient"][name], gradient) and torch.equal(masks["update"][name], updated)
    g = tracer.session.last_summary["global"]
    assert g["absorbed"] == pytest.approx(0.0, abs=1e-3)  # fp32, Adam: nothing it steps is lost to rounding
    assert g["zero_lr_steps"] == 1  # the warm-up's first step
    group = masks.info["optimizer"]["param_groups"][0]  # the configured lr, not the warm-up's first 0
    assert group["lr"] == 1e-3 and group["lr_at_start"] == 0.0
    selection = masks.info["parameter_selection"]
    assert selection["trainable_not_in_optimizer"] == sum(1 for _ in model.parameters()) - len(stepped)
    assert selection["rule"].startswith("trainable parameters in the optimizer")


def test_accelerate_wrapped_optimizer_with_accumulation_and_clipping(tmp_path):
    from accelerate import Accelerator

    import gradtrace

    model = _llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    reference = Reference(optimizer.optimizer)  # the real optimizer's step: once per accumulation cycle
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, strict=True)
    for micro in range(6):
        with accelerator.accumulate(model):
            g = torch.Generator().manual_seed(micro)
            tokens = torch.randint(0, 32, (4, 8), generator=g)
            accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad()
    masks = load_masks(tracer.finish())
    assert tracer.step == 3 and masks.step == 3  # 6 micro-batches, 3 optimizer steps
    for name, param in model.named_parameters():
        gradient, updated = reference.expect(param)
        assert torch.equal(masks["gradient"][name], gradient), name
        assert torch.equal(masks["update"][name], updated), name
    assert not masks["gradient"]["model.embed_tokens.weight"][40:].any()  # tokens that never appeared
    assert masks.info["optimizer"]["class"] == "torch.optim.adamw.AdamW"


def test_parameter_set_changing_mid_run(tmp_path):
    import gradtrace

    model = _llama()
    norm = model.model.norm.weight
    norm.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    reference = Reference(optimizer)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, strict=True)
    _step(model, optimizer, 64, 0)
    _step(model, optimizer, 64, 1)
    # 1. replaced by a new tensor of the same shape, handed to the optimizer: its masks continue
    old_q = model.model.layers[0].self_attn.q_proj.weight
    new_q = torch.nn.Parameter(old_q.detach().clone())
    model.model.layers[0].self_attn.q_proj.weight = new_q
    optimizer.param_groups[0]["params"] = [new_q if p is old_q else p for p in optimizer.param_groups[0]["params"]]
    reference.initial[id(new_q)], reference.gradient[id(new_q)] = reference.initial[id(old_q)], reference.gradient[id(old_q)]
    # 2. unfrozen and added: tracked from now on
    norm.requires_grad_(True)
    optimizer.add_param_group({"params": [norm]})
    with pytest.warns(GradTraceWarning) as said:
        _step(model, optimizer, 64, 2)
    text = " ".join(str(w.message) for w in said)
    assert "model.layers.0.self_attn.q_proj.weight" in text and "model.norm.weight" in text
    gradient_before_resize = {n: m.clone() for n, m in
                              load_masks(tracer.session.export(tmp_path / "mid", step=tracer.step))["gradient"].items()}
    # 3. resized (in place for the embedding, a new tensor for lm_head): restart, the masks so far are kept
    model.resize_token_embeddings(72, mean_resizing=False)
    optimizer.add_param_group({"params": [model.lm_head.weight]})
    embed = model.model.embed_tokens.weight  # the same tensor, resized in place: the reference restarts too
    del reference.initial[id(embed)], reference.gradient[id(embed)]
    with pytest.warns(GradTraceWarning, match="changed shape or dtype"):
        _step(model, optimizer, 64, 3)
    masks = load_masks(tracer.finish())
    for name, param in model.named_parameters():  # lm_head: the new, resized tensor since it was added
        gradient, updated = reference.expect(param)
        assert torch.equal(masks["gradient"][name], gradient), name
        assert torch.equal(masks["update"][name], updated), name
    # the resized embedding: tracked since its restart, in its new shape; rows 32+ never appear
    assert masks["gradient"]["model.embed_tokens.weight"].shape == (72, 16)
    assert masks["gradient"]["model.embed_tokens.weight"][:32].any()
    assert not masks["gradient"]["model.embed_tokens.weight"][32:].any()
    before = load_masks(tmp_path / "before-step-4")
    assert set(before["gradient"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    for name, mask in before["gradient"].items():
        assert mask.shape[0] == 64 and torch.equal(mask, gradient_before_resize[name]), name
    changes = masks.info["parameter_changes"]
    assert [c["step"] for c in changes] == [2, 3]
    assert changes[0]["rebound"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert changes[0]["added"] == ["model.norm.weight"]
    assert sorted(changes[1]["restarted"]) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_steps_at_lr_zero_are_not_called_absorbed(tmp_path):
    import gradtrace

    model = _llama().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    tracer = gradtrace.trace(model, optimizer, tmp_path, log_every=1, wandb=False, strict=True)
    _step(model, optimizer, 64, 0)
    summary = tracer.log()
    g = summary["global"]
    assert g["zero_lr_steps"] == 1 and g["update_sparsity"] == 1.0 and g["gradient_sparsity"] < 0.9
    assert g["absorbed"] == 0.0 and g["cancelled"] == 0.0  # not "lost to rounding": the lr was 0
    assert all(v["absorbed"] == 0.0 and v["zero_lr"] == v["gradient_unchanged"] for v in summary["per_kind"].values())
    assert g["gradient_unchanged"] == pytest.approx(1 - g["gradient_sparsity"]) == pytest.approx(g["zero_lr"])
