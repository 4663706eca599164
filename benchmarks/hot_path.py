"""The tracker's own calls, timed directly, on the ~52M-parameter model's shapes with bf16 weights.

    python benchmarks/hot_path.py
    # the same for another commit, side by side (the line printed names the imported package):
    git archive <commit> gradtrace | tar -x -C /tmp/gt_old && PYTHONPATH=/tmp/gt_old python benchmarks/hot_path.py

Gradients are synthetic (normal; the embedding's are zero outside 256 rows, as for the tokens absent from a
batch), so the numbers isolate gradtrace: median milliseconds of ``observe_gradients`` (per mode, on a
non-logging step), of ``observe_update`` in ``ever_changed`` mode, and of ``measure()`` (default mode). One
torch thread. ``benchmarks/overhead.py`` measures the same inside real training.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gradtrace
from gradtrace import GradTracker, TrackerConfig

MID_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MID_MODEL)).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        if "embed_tokens" in name:
            p.grad[256:] = 0
    results = {}
    for mode in ("off", "sampled", "full"):
        tracker = GradTracker(model, TrackerConfig(cancellation=mode, ever_changed=mode == "sampled"))
        tracker.observe_gradients(detail=False)  # the first step fills most bitmaps
        results[f"observe_gradients {mode}"] = median_ms(lambda t=tracker: t.observe_gradients(detail=False), 7)
        if mode == "sampled":
            def step_then_observe(t=tracker):
                with torch.no_grad():
                    model.lm_head.weight.view(torch.int16)[:100] += 1  # some weights move
                t.observe_update()

            results["observe_update (ever_changed)"] = median_ms(step_then_observe, 5)
            results["measure() sampled"] = median_ms(tracker.measure, 3)
    print(f"gradtrace from {gradtrace.__file__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M bf16 params")
    for key, ms in results.items():
        print(f"  {key:32s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
