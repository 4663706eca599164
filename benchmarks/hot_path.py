"""The tracker's own calls, timed directly, on the ~52M-parameter model's shapes with bf16 weights.

    python benchmarks/hot_path.py
    # the same for another commit, side by side (the line printed names the imported package):
    git archive <commit> gradtrace | tar -x -C /tmp/gt_old && PYTHONPATH=/tmp/gt_old python benchmarks/hot_path.py
    # on a GPU, a ~0.5B-parameter model (Qwen2-0.5B's shapes), the figures also as JSON:
    python benchmarks/hot_path.py --device cuda --model large --json hot_path.json

Gradients are synthetic (normal; the embedding's are zero outside 256 rows, as for the tokens absent from a
batch), so the numbers isolate gradtrace: median milliseconds of ``observe_gradients`` (per mode, on a
non-logging step), of ``observe_update`` in ``ever_changed`` mode, and of ``measure()`` (default mode). One
torch thread; on CUDA each timed call ends with ``torch.cuda.synchronize()``. ``benchmarks/overhead.py``
measures the same inside real training. ``--model tiny`` is a smoke test of the script, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import gradtrace
from gradtrace import GradTracker, TrackerConfig

MID_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
# Qwen2-0.5B's shapes (494M parameters, tied embeddings); built from the config, nothing downloaded
LARGE_MODEL = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)


def build(size: str) -> torch.nn.Module:
    if size == "large":
        return Qwen2ForCausalLM(Qwen2Config(**LARGE_MODEL))
    return LlamaForCausalLM(LlamaConfig(**(MID_MODEL if size == "mid" else TINY_MODEL)))


def median_ms(call, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="where the model, its gradients and the tracker live")
    parser.add_argument("--model", choices=("tiny", "mid", "large"), default="mid",
                        help="mid: ~52M Llama shapes (default); large: Qwen2-0.5B's shapes; tiny: a smoke test")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(args.model).to(device=device, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(1)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=generator, device=device).to(p.dtype)
        if "embed_tokens" in name:
            p.grad[256:] = 0
    results = {}
    for mode in ("off", "sampled", "full"):
        tracker = GradTracker(model, TrackerConfig(cancellation=mode, ever_changed=mode == "sampled"))
        tracker.observe_gradients(detail=False)  # the first step fills most bitmaps
        results[f"observe_gradients {mode}"] = median_ms(lambda t=tracker: t.observe_gradients(detail=False), 7,
                                                         device)
        if mode == "sampled":
            def step_then_observe(t=tracker):
                with torch.no_grad():
                    model.lm_head.weight.view(torch.int16)[:100] += 1  # some weights move
                t.observe_update()

            results["observe_update (ever_changed)"] = median_ms(step_then_observe, 5, device)
            results["measure() sampled"] = median_ms(tracker.measure, 3, device)
        del tracker
    numel = sum(p.numel() for p in model.parameters())
    print(f"gradtrace from {gradtrace.__file__}, {numel / 1e6:.1f}M bf16 params on {device}")
    for key, ms in results.items():
        print(f"  {key:32s} {ms:8.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": str(device), "model": args.model, "params": numel, "dtype": "bfloat16",
            "torch": torch.__version__, "gradtrace_file": gradtrace.__file__, "median_ms": results,
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }, indent=1))


if __name__ == "__main__":
    main()
