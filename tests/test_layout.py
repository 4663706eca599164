"""The package's rooms import only downwards, the public API stays where users find it, and the tests are laid
out by subject, sharing code only through tests/helpers/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow  # a fresh interpreter importing gradtrace: ~10 s on 2 busy cores
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


# ------------------------------------------------------------------ module size, import cycles, engines
MAX_LINES = {"tracking": 400}  # rooms whose modules are held to a size: one concept a module


def test_modules_stay_small():
    big = [f"{path.relative_to(PACKAGE)}: {n} lines"
           for room, limit in MAX_LINES.items() for path in sorted((PACKAGE / room).rglob("*.py"))
           if (n := len(path.read_text(encoding="utf-8").splitlines())) > limit]
    assert big == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str], packages: set[str]) -> set[str]:
    """The gradtrace modules a module imports when it is imported (not inside functions: those are lazy).
    Packages' ``__init__`` files are left out: Python runs them before their submodules, whatever imports
    what, so they close no loop (``import gradtrace`` imports the tracker, which imports gradtrace.formats)."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name in modules and name not in packages}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``module -> imported modules``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {name for name, p in paths.items() if p.name == "__init__.py"}
    graph = {name: _top_level_imports(path, set(paths), packages) for name, path in paths.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_an_engine_is_one_module_on_the_base():
    """Each engine module under tracking/engines builds placements by subclassing the base, and knows no
    other part of the tracker than the engines, the sharding helpers, split cutting and the config."""
    from gradtrace.tracking.engines.base import Engine

    allowed = {"gradtrace.tracking.engines", "gradtrace.tracking.sharding", "gradtrace.tracking.split",
               "gradtrace.tracking.config", "gradtrace.tracking"}
    engines = PACKAGE / "tracking" / "engines"
    for path in sorted(engines.glob("*.py")):
        if path.name in ("__init__.py", "base.py", "choice.py"):  # choice.py: the order engines are chosen in
            continue
        module = __import__(_module_name(path), fromlist=["*"])
        defined = [v for v in vars(module).values()
                   if isinstance(v, type) and issubclass(v, Engine) and v.__module__ == module.__name__]
        assert defined, f"{path.name} defines no Engine"
        imported = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                    and n.module and n.module.startswith("gradtrace")}
        wrong = {m for m in imported if not any(m == a or m.startswith("gradtrace.tracking.engines") for a in allowed)}
        assert wrong == set(), f"{path.name} imports {sorted(wrong)}"


def test_only_the_cli_and_the_demo_reach_the_html_report():
    """Run data (grids, table rows, labels) lives in views/run_data.py; the HTML report's modules (its figures
    import matplotlib) are reached only by those that write a report, so sinks and live views never load them."""
    report = {"gradtrace.views.report", "gradtrace.views.figures", "gradtrace.views.report_html"}
    wrong = []
    for module in PACKAGE.rglob("*.py"):
        if module.parent.name in ("cli", "demo") or module.name == "report.py":
            continue
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in report:
                wrong.append(str(module.relative_to(PACKAGE)))
    assert wrong == []


# ------------------------------------------------------------------------------------------ the tests' own layout
TESTS = Path(__file__).resolve().parent


def _tests_module(path: Path) -> str:
    parts = path.relative_to(TESTS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_test_module(name: str) -> bool:
    """``tests.<subject>.test_x`` and the conftest files: what pytest collects, never a helper."""
    last = name.rsplit(".", 1)[-1]
    return name.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def test_no_test_module_imports_another():
    """Tests share code through ``tests/helpers/`` and fixtures through the conftest files, never by importing
    one test module from another (lazily or not, also ``from tests.x import test_y``)."""
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            wrong += [f"{path.relative_to(TESTS.parent)}:{node.lineno} imports {n}" for n in names if _is_test_module(n)]
    assert wrong == []


def test_test_modules_live_in_subject_packages():
    """Each test module sits in a package under tests/ named for its subject (the layout tests excepted), so
    ``python -m pytest tests/<subject>`` runs alone and two subjects may hold modules of the same name."""
    loose = [p.name for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name]
    assert loose == []
    for path in TESTS.rglob("test_*.py"):
        for folder in path.relative_to(TESTS).parents:
            assert (TESTS / folder / "__init__.py").is_file(), f"{TESTS.name}/{folder} is not a package"


# ------------------------------------------------------------------ DeepSpeed in one room
def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, lazily or not, with ``from a import b`` counted as ``a.b`` too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _words(node: ast.AST) -> set[str]:
    """The names, attributes and strings in an expression, lower-cased."""
    words = set()
    for part in ast.walk(node):
        if isinstance(part, ast.Name):
            words.add(part.id.lower())
        elif isinstance(part, ast.Attribute):
            words.add(part.attr.lower())
        elif isinstance(part, ast.Constant) and isinstance(part.value, str):
            words.add(part.value.lower())
    return words


def test_deepspeed_is_known_in_one_place():
    """Only ``integrations/deepspeed.py`` imports the ``deepspeed`` package, and only the gradient-source
    chooser (``integrations/gradient_sources.py``) imports it: the Trainer callback and ``trace()`` ask the
    chooser, and no condition of theirs tests for DeepSpeed."""
    imports = {str(path.relative_to(PACKAGE)): _imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}
    package = sorted(p for p, names in imports.items() if any(n.split(".")[0] == "deepspeed" for n in names))
    assert package == ["integrations/deepspeed.py"]
    support = sorted(p for p, names in imports.items() if "gradtrace.integrations.deepspeed" in names)
    assert support == ["integrations/gradient_sources.py"]
    for adapter in ("trainer.py", "plain_loop.py"):
        tree = ast.parse((PACKAGE / "integrations" / adapter).read_text(encoding="utf-8"))
        branches = [node.lineno for node in ast.walk(tree) if isinstance(node, (ast.If, ast.IfExp, ast.While))
                    and any("deepspeed" in word for word in _words(node.test))]
        assert branches == [], f"integrations/{adapter} branches on DeepSpeed at lines {branches}"
