"""The examples run as documented and say what they claim."""

from __future__ import annotations

import gradtrace
from tests.helpers.examples import load


def test_plain_loop_example(tmp_path, capsys):
    summary = load("plain_loop").main(str(tmp_path))
    masks = gradtrace.load_masks(tmp_path / "masks.safetensors")
    # only token ids 0..63 occur in the data: the other 64 embedding rows never get a gradient
    rows = masks["gradient"]["model.embed_tokens.weight"].any(dim=1)
    assert rows[:64].all() and not rows[64:].any()
    assert "never received a gradient: 64 of 128" in capsys.readouterr().out
    assert summary["optimizer_steps"] == 40
    assert [r["step"] for r in gradtrace.read_run_log(tmp_path)["logs"]] == [10, 20, 30, 40]


def test_subnetwork_grpo_example(tmp_path, capsys):
    result = load("subnetwork_grpo").main(str(tmp_path), steps=4, base_steps=10)
    assert result["moved_outside_mask"] == 0  # the restriction held under AdamW with weight decay
    assert 0 < result["subnetwork_density"] < 1
    assert result["identical_bitwise"] >= 1 - result["subnetwork_density"]  # at least everything outside
    assert "identical_1e-4" in capsys.readouterr().out


def test_deep_model_example_keeps_its_charts_bounded_and_draws_the_run_log(tmp_path, capsys):
    import io

    import numpy as np
    from PIL import Image

    from tests.helpers.tracker_checks import assert_layer_step_image

    result = load("deep_model").main(str(tmp_path), layers=12, steps=4, png=str(tmp_path / "view.png"))
    records = result["records"]
    assert [r["step"] for r in records] == [2, 4]
    default, per_layer = set(result["default_keys"]), set(result["per_layer_keys"])
    assert not any(k.startswith("gradtrace_layer/") for k in default)
    assert {f"gradtrace_layer/layer_{i:02d}.{m}" for i in range(12) for m in ("update", "absorbed")} <= per_layer
    assert {"gradtrace_heatmap/update.layer_x_step", "gradtrace_heatmap/update.layer_x_kind"} <= default
    assert f"{len(default)} chart keys by default" in capsys.readouterr().out
    png = (tmp_path / "view.png").read_bytes()
    assert png == result["image"].png
    assert_layer_step_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int), records,
                            "update_sparsity")
