"""The package's rooms import only downwards, and the public API stays where users find it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gradtrace

PACKAGE = Path(gradtrace.__file__).parent

# Which rooms each room may import (besides itself). Mirrors the docstrings of the packages.
ALLOWED = {
    "formats": set(),
    "anatomy": {"formats"},
    "tracking": {"formats", "anatomy"},
    "sync": {"formats", "anatomy"},
    "views": {"formats", "anatomy"},
    "masks": {"formats", "anatomy"},
    "sinks": {"formats", "anatomy", "views"},
    "integrations": {"formats", "anatomy", "tracking", "sync", "sinks"},
    "demo": {"formats", "anatomy", "tracking", "sync", "views", "masks", "sinks", "integrations"},
    "cli": {"formats", "anatomy", "tracking", "sync", "views", "masks", "sinks", "integrations", "demo"},
}


def _gradtrace_imports(path: Path) -> set[str]:
    """The gradtrace rooms a module imports, lazily or not (``from gradtrace.X...``, ``import gradtrace.X``)."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "gradtrace" else [f"gradtrace.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gradtrace" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_every_module_lives_in_a_room():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == []
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(ALLOWED)
    for room in rooms:
        assert ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())), f"{room} has no docstring"


def test_imports_only_go_down():
    wrong = []
    for room, allowed in ALLOWED.items():
        for module in (PACKAGE / room).rglob("*.py"):
            for imported in _gradtrace_imports(module) - allowed - {room}:
                wrong.append(f"{module.relative_to(PACKAGE)} imports gradtrace.{imported}")
    assert wrong == []


def test_public_api_and_lazy_transformers():
    code = ("import sys, gradtrace\n"
            "names = ['GradTracker', 'TrackerConfig', 'trace', 'Tracer', 'load_masks', 'save_masks', 'Masks',\n"
            "         'MaskFileError', 'read_run_log', 'summarize', 'TraceSession', 'GradTraceWarning',\n"
            "         'restrict_to_subnetwork', 'Measurement']\n"
            "missing = [n for n in names if not hasattr(gradtrace, n)]\n"
            "assert not missing, missing\n"
            "assert 'transformers' not in sys.modules, 'import gradtrace imported transformers'\n"
            "assert gradtrace.GradTraceCallback.__name__ == 'GradTraceCallback'\n"
            "assert gradtrace.SubnetworkCallback.__name__ == 'SubnetworkCallback'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "gradtrace.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "report", "watch", "diff", "overlap", "rank"):
        assert command in proc.stdout
