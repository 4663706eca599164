"""``-o`` that cannot be written, for ``overlap``, ``rank`` and ``report``: a clear error and exit status 2,
before any work, never a traceback; and a writable ``-o`` still gets the same result as stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gradtrace.cli import main as cli_main
from gradtrace.formats.masks_file import save_masks
from tests.helpers.traced_runs import traced_run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list[str]]:
    """What each command reads: two masks files, two checkpoints, one traced run."""
    root = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(0)
    masks = []
    for i in range(2):
        path = root / f"masks-{i}.safetensors"
        save_masks(path, {"update": {"model.layers.0.mlp.up_proj.weight": torch.rand(8, 16, generator=g) < 0.3}})
        masks.append(str(path))
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 16, generator=g)}
    tuned = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    run = traced_run(root / "run", dtype=torch.bfloat16, lr=1e-5, tokens=32, steps=2)
    return {"overlap": ["overlap", *masks, "--json"],
            "rank": ["rank", str(root / "base.safetensors"), str(root / "tuned.safetensors"), "--json"],
            "report": ["report", str(run)]}


@pytest.mark.parametrize("command", ["overlap", "rank", "report"])
def test_unwritable_output_is_a_clear_error_with_status_2(inputs, command, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    folder = tmp_path / "folder.html"  # a folder, though its name says file (report takes .html as a file)
    folder.mkdir()
    under_a_file = a_file / "out.json"
    cases = [(folder, f"-o: {folder} is a folder, not a file")]
    if command == "report":  # -o names a folder for the report: under a file it cannot be one
        cases.append((a_file, f"-o: {a_file} is not a folder, so {a_file / 'report.html'} cannot be created in it"))
    else:
        cases.append((under_a_file, f"-o: {a_file} is not a folder, so {under_a_file} cannot be created in it"))
    for output, says in cases:
        rc = cli_main([*inputs[command], "-o", str(output)])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2, err
        assert says in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.html"]  # nothing written
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["overlap", "rank"])
def test_writable_output_gets_what_stdout_gets(inputs, command, tmp_path, capsys):
    assert cli_main(inputs[command]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "new" / "out.json"
    assert cli_main([*inputs[command], "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(printed)
    assert [p.name for p in Path(out.parent).iterdir()] == ["out.json"]  # no temporary file left beside it


@pytest.mark.slow
def test_the_installed_command_is_the_one_entry_point(inputs, tmp_path):
    """What a user types: the console script ``gradtrace`` (the same ``gradtrace.cli.main`` the tests call)
    answers usage errors with exit status 2, as argparse does, for every sub-command."""
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("gradtrace")
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable} (package not installed in this environment)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for argv in (inputs["overlap"][:2], ["diff", "a", "b", "--retries", "-1"], ["nope"]):
        done = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
