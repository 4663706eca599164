"""The MoE views: report's layer x expert heatmap and table, watch's expert line, from a real Trainer run."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console
from transformers import Trainer

from gradtrace import GradTraceCallback, read_run_log
from gradtrace.views.report import write_report
from gradtrace.views.run_data import expert_grid
from gradtrace.views.watch import LogFollower, render
from tests.helpers import moe_models
from tests.helpers.moe_models import token_data, training_args


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-run")
    torch.manual_seed(0)
    Trainer(model=moe_models.qwen3_moe(), args=training_args(out), train_dataset=token_data(0),
            callbacks=[GradTraceCallback(strict=True, wandb=False)]).train()
    return out / "gradtrace"


def test_report_has_the_layer_by_expert_heatmap_and_table(moe_run, tmp_path):
    summary = json.loads((moe_run / "summary.json").read_text())
    per_expert = summary["per_expert"]
    grid = expert_grid(per_expert, "gradient_sparsity")
    assert grid.rows == ["0", "1"] and grid.columns == [str(e) for e in range(8)]
    for key, values in per_expert.items():
        layer, expert = key.split("/")
        assert grid.cell(layer, expert) == values["gradient_sparsity"]
    page = write_report([moe_run], tmp_path).read_text()
    assert (tmp_path / "experts-moe-run0.png").stat().st_size > 1000
    assert "Layer x routed expert" in page
    table = re.search(r'<table id="experts-[^"]+" class="per-expert[^"]*">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    assert len(rows) == len(per_expert)
    for row, (key, values) in zip(rows, per_expert.items(), strict=True):
        cells = re.findall(r'<td(?: data-value="([^"]*)")?(?: class="text")?>([^<]*)</td>', row)
        assert f"{cells[0][1]}/{cells[1][0]}" == key
        assert float(cells[3][0]) == values["gradient_sparsity"]


def test_watch_prints_one_expert_line_per_moe_layer(moe_run):
    summary = json.loads((moe_run / "summary.json").read_text())
    follower = LogFollower(moe_run)
    follower.poll()
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render(follower, width=120))
    out = console.file.getvalue()
    g = summary["global"]
    assert f"{g['experts']} routed · {g['experts_without_gradient']} never received a gradient" in out
    for side, label in (("least_touched", "least touched"), ("most_touched", "most touched")):
        named = re.search(rf"{label}: (.*)", out).group(1).split(", ")
        assert [n.split(" ")[0] for n in named] == [e["expert"] for e in summary["expert_extremes"][side]]
    for layer in ("0", "1"):
        line = re.search(rf"layer {layer}  (\S+)", out).group(1)
        without = [summary["per_expert"][f"{layer}/{e}"]["gradient_sparsity"] == 1 for e in range(8)]
        assert [c == "·" for c in line] == without


def test_moe_example_prints_the_summary_numbers_and_draws_the_heatmap(tmp_path, capsys):
    from tests.helpers.examples import load

    summary = load("moe_experts").main(str(tmp_path / "run"), steps=2, png=str(tmp_path / "experts.png"))
    g = summary["global"]
    per_expert = summary["per_expert"]
    assert len(per_expert) == g["experts"] == 64
    assert g["experts_without_gradient"] == sum(v["gradient_sparsity"] == 1 for v in per_expert.values())
    out = capsys.readouterr().out
    assert f"never received a gradient: {g['experts_without_gradient']}" in out
    assert (tmp_path / "experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_gets_the_expert_heatmaps_curves_and_table(tmp_path, wandb_env):
    """Read back from the offline run's own transaction log (tests/helpers/wandb_file.py), as test_wandb_sink does;
    the Trainer opens no run of its own (report_to="none"), so the sink logs to ours, against the Trainer's step."""
    import wandb

    from gradtrace.sinks.payload import chart_keys_bound, finite, is_counter
    from gradtrace.sinks.wandb import EXPERT_TABLE_KEY
    from gradtrace.views.live import expert_image
    from gradtrace.views.run_data import expert_grid
    from tests.helpers.tracker_checks import assert_grid_image, pixels
    from tests.helpers.wandb_file import read_run

    wandb.init(mode="offline", dir=wandb_env, project="gradtrace-tests")
    Trainer(model=moe_models.qwen3_moe(), args=training_args(tmp_path, max_steps=2), train_dataset=token_data(0),
            callbacks=[GradTraceCallback(strict=True, output_dir=tmp_path / "run")]).train()
    wandb.finish()
    wb = read_run(wandb_env)
    records = {r["step"]: r for r in read_run_log(tmp_path / "run")["logs"]}
    rows = {row["train/global_step"]: row for row in wb.history if "gradtrace_expert/experts_without_gradient" in row}
    assert sorted(rows) == sorted(records) == [1, 2]
    for step, record in records.items():
        row = rows[step]
        for name, key in (("experts_without_gradient", "experts_without_gradient"),
                          ("min_gradient_density", "expert_gradient_density_min"),
                          ("median_gradient_density", "expert_gradient_density_median"),
                          ("max_gradient_density", "expert_gradient_density_max")):
            assert row[f"gradtrace_expert/{name}"] == record["global"][key]
        # the 3 least and 3 most touched experts, one series each, named by layer and expert as in the run log
        named = {k: v for k, v in row.items() if k.startswith("gradtrace_expert/layer_")}
        assert named == {"gradtrace_expert/layer_{}.expert_{}".format(*e["expert"].split("/")): e["gradient_density"]
                         for entries in record["expert_extremes"].values() for e in entries}
        assert len(named) == 6
        entry = row["gradtrace_heatmap/grad.layer_x_expert"]
        logged, image = pixels(wb.files_dir / entry["path"]), expert_image(record, "gradient_sparsity")
        assert (logged == pixels(image.png)).all()
        assert_grid_image(logged, image, expert_grid(record["per_expert"], "gradient_sparsity").values)
    # each logging step's keys are the stated bound: the dense model's plus the expert images and six named series
    for step, record in records.items():
        keys = {k for k in rows[step] if k.startswith("gradtrace")} - {"gradtrace/step"}
        charted = [k for k, v in record["global"].items() if finite(v) and not is_counter(k)]
        assert len(keys) == chart_keys_bound(len(charted), len(record["per_kind"]), moe=True)
    [table_row] = [row for row in wb.history if EXPERT_TABLE_KEY in row]
    table = json.loads(wb.load_file(table_row[EXPERT_TABLE_KEY]["path"]))
    got = {f"{r[0]}/{r[1]}": dict(zip(table["columns"], r, strict=True)) for r in table["data"]}
    assert list(got) == list(records[2]["per_expert"])
    for key, values in records[2]["per_expert"].items():
        assert got[key]["gradient_sparsity"] == values["gradient_sparsity"] and got[key]["numel"] == values["numel"]
