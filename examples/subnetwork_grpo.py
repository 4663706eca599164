"""The paper's subnetwork experiment with GRPO on the demo model (Mukherjee et al., arXiv 2505.11711, §4).

1. full GRPO run from the demo's base policy, traced by GradTraceCallback → its live ``update`` mask;
2. subnetwork-only GRPO from the same start, same data, same hyper-parameters, with
   ``SubnetworkCallback(mask)``: gradients outside the mask zeroed and those weights restored after
   every step, so they stay bit-identical even under AdamW's decay and momentum;
3. compare θ_sub with θ_full (fraction of identical elements, bitwise and at the paper's 1e-5 / 1e-4,
   relative distance ‖θ_sub − θ_full‖ / ‖θ_full − θ_init‖) and the final rewards.

    python examples/subnetwork_grpo.py [--steps 30] [--lr 1e-5] [--out DIR]

GRPO samples completions, so the two runs diverge as soon as their weights differ anywhere; the
paper's "same data" is the same prompts and seed here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from gradtrace import GradTraceCallback, load_masks  # noqa: E402
from gradtrace.demo import runs  # noqa: E402
from gradtrace.demo.tiny import load_base  # noqa: E402
from gradtrace.masks.subnetwork import SubnetworkCallback  # noqa: E402


def compare(initial: dict, full: dict, sub: dict) -> dict[str, float]:
    """Fractions of elements of θ_sub equal to θ_full, and the relative distance between them."""
    n = sum(t.numel() for t in full.values())
    same = {tol: 0 for tol in ("bitwise", "1e-5", "1e-4")}
    gap = moved = 0.0
    for name, f in full.items():
        s, i = sub[name], initial[name]
        same["bitwise"] += int((s.view(torch.int16) == f.view(torch.int16)).sum())
        delta = (s.float() - f.float()).abs()
        same["1e-5"] += int((delta <= 1e-5).sum())
        same["1e-4"] += int((delta <= 1e-4).sum())
        gap += float(((s.float() - f.float()) ** 2).sum())
        moved += float(((f.float() - i.float()) ** 2).sum())
    return {**{f"identical_{k}": v / n for k, v in same.items()}, "relative_distance": (gap / moved) ** 0.5}


def last_reward(result) -> float:
    rewards = [h["reward"] for h in result.log_history if "reward" in h]
    return rewards[-1] if rewards else float("nan")


def main(out: str | None = None, steps: int = 30, lr: float = 1e-5, base_steps: int = 150) -> dict:
    torch.set_num_threads(1)
    out_dir = Path(out or tempfile.mkdtemp(prefix="gradtrace-subnetwork-"))
    base = runs.make_base_policy(out_dir, steps=base_steps, quiet=True)
    initial = {n: p.detach().clone() for n, p in load_base(base, torch.bfloat16).named_parameters()}
    common = dict(learning_rate=lr, max_steps=steps, dtype=torch.bfloat16, quiet=True, weight_decay=0.01)

    full = runs.run_grpo(base, out_dir / "full", callbacks=[GradTraceCallback(wandb=False)], **common)
    mask_path = out_dir / "full" / "gradtrace" / "masks.safetensors"
    mask = load_masks(mask_path)["update"]
    sub = runs.run_grpo(base, out_dir / "subnetwork", callbacks=[SubnetworkCallback(mask_path)], **common)

    theta_full = {n: p.detach() for n, p in full.model.named_parameters()}
    theta_sub = {n: p.detach() for n, p in sub.model.named_parameters()}
    outside_moved = sum(int(((theta_sub[n].view(torch.int16) != initial[n].view(torch.int16)) & ~m).sum())
                        for n, m in mask.items())
    density = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    result = {"subnetwork_density": density, "moved_outside_mask": outside_moved,
              **compare(initial, theta_full, theta_sub),
              "reward_full": last_reward(full), "reward_subnetwork": last_reward(sub)}
    for key, value in result.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    main(args.out, args.steps, args.lr)
