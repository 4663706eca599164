"""The real ``gradtrace`` CLI in a worker process whose environment (``HF_ENDPOINT``...) is set before anything
imports ``huggingface_hub``: one argv per line on stdin, one JSON result per line on stdout, so the tests pay
the interpreter's start-up once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Worker:
    """A process with HF_ENDPOINT (and a fresh HF_HOME, TMPDIR, cwd) set before anything imports
    huggingface_hub, running ``gradtrace.cli.main(argv)`` for each argv line it reads."""

    CODE = textwrap.dedent("""
        import contextlib, io, json, sys
        from gradtrace.cli import main
        for line in sys.stdin:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(json.loads(line))
                except SystemExit as exit:
                    rc = exit.code
            print(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
    """)

    def __init__(self, endpoint: str, home: Path, hf_home: Path | None = None, offline: bool = False):
        self.home = home
        self.cwd, self.tmp, self.hf_home = home / "cwd", home / "tmp", hf_home or home / "hf"
        for folder in (self.cwd, self.tmp, self.hf_home):
            folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0",
               "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(self.hf_home), "TMPDIR": str(self.tmp),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "COLUMNS": "200"}
        env.pop("HF_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=self.cwd)

    def run(self, *argv: str) -> dict:
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the CLI worker died"
        done = json.loads(line)
        done["stderr"] = " ".join(done["stderr"].split())  # rich wraps long messages: match them as one line
        return done

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def files_written(self) -> list[tuple[str, int]]:
        """Every file under the worker's HF_HOME and TMPDIR, with its size."""
        return [(str(p), p.stat().st_size) for folder in (self.hf_home, self.tmp)
                for p in folder.rglob("*") if p.is_file()]
