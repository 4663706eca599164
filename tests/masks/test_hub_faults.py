"""``gradtrace diff`` against a hub that misbehaves: the real ``huggingface_hub`` client, a real local server.

The server (:mod:`tests.helpers.hub_server`) can drop the range start as a broken proxy does, cut a reply
short, or never answer; broken safetensors files are crafted byte by byte into a repo and onto disk,
and both must be refused with the same words. The CLI runs in a worker process (see
:mod:`tests.masks.test_hub_diff`), each call bounded in time so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import select
import struct
import time
from pathlib import Path

import pytest

from tests.helpers.cli_worker import Worker
from tests.helpers.hub_repos import (
    HUB_FLAGS,
    TOLERANCES,
    base_tensors,
    counts_of,
    expected_counts,
    perturbed,
    write_revision,
)
from tests.helpers.hub_server import HubServer, SilentServer

CALL_LIMIT = 60.0  # seconds one CLI call may take before the test calls it a hang


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = base_tensors()
    tuned = perturbed(base, seed=1, fraction=0.3)
    write_revision(root / "org/base/main", base)
    write_revision(root / "org/tuned/main", tuned)
    server = HubServer(root)
    yield {"root": root, "server": server, "base": base, "tuned": tuned}
    server.stop()


@pytest.fixture(scope="module")
def cli(hub, tmp_path_factory):
    worker = Worker(hub["server"].endpoint, tmp_path_factory.mktemp("client"))
    yield worker
    worker.close()


def run(worker: Worker, *argv: str, limit: float = CALL_LIMIT) -> dict:
    """``worker.run(*argv)``, failing (and killing the worker) when no answer comes within ``limit`` s."""
    worker.proc.stdin.write(json.dumps(list(argv)) + "\n")
    worker.proc.stdin.flush()
    ready, _, _ = select.select([worker.proc.stdout], [], [], limit)
    if not ready:
        worker.proc.kill()
        pytest.fail(f"gradtrace {' '.join(argv)} gave no answer in {limit} s")
    line = worker.proc.stdout.readline()
    assert line, "the CLI worker died"
    done = json.loads(line)
    done["stderr"] = " ".join(done["stderr"].split())  # rich wraps long messages: match them as one line
    return done


def diff(worker: Worker, base: str, tuned: str, *extra: str) -> dict:
    return run(worker, "diff", base, tuned, *(a for t in TOLERANCES for a in ("--tolerance", t)), *HUB_FLAGS, *extra)


def tensor_reads(server: HubServer) -> list[tuple]:
    """Ranged reads of tensor data (not of the 8-byte length nor of the JSON header that follows it)."""
    return [e for e in server.served if e[2].endswith(".safetensors") and e[3] not in (0, 8)]


# ------------------------------------------------------------------------------------------ ranges
def test_a_proxy_that_drops_the_range_start_is_refused_not_compared(hub, cli, tmp_path):
    server = hub["server"]
    out = tmp_path / "out.json"
    server.ignore_range_start = True
    try:
        done = diff(cli, "org/base", "org/tuned", "--json", "-o", str(out))
    finally:
        server.ignore_range_start = False
    assert done["rc"] == 1 and not out.exists(), done
    assert "model-00001-of-00002.safetensors: bytes 8-" in done["stderr"]
    assert "but the server sent bytes 0-" in done["stderr"] and "does not honour ranges" in done["stderr"]
    assert tensor_reads(server) == []  # refused at the first header, before any tensor was read
    # What the error suggests works through the same proxy: --cache downloads whole files.
    server.ignore_range_start = True
    try:
        done = diff(cli, "org/base", "org/tuned", "--json", "--cache")
    finally:
        server.ignore_range_start = False
    assert done["rc"] == 0, done["stderr"]
    assert counts_of(json.loads(done["stdout"])) == expected_counts(hub["base"], hub["tuned"])


# ------------------------------------------------------------------------------------------ headers
def crafted(header: object, data: bytes) -> bytes:
    """A safetensors file's bytes from a header written by hand (padded to 8 bytes, as safetensors does)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


F32x4 = {"dtype": "F32", "shape": [4]}
BROKEN = {  # name -> (header, data bytes, what the refusal must say after "<file>: ")
    "overlap": ({"a": {**F32x4, "data_offsets": [0, 16]}, "b": {**F32x4, "data_offsets": [8, 24]}}, 24,
                "tensor 'b' (data_offsets [8, 24]) overlaps 'a' (bytes 0-16)"),
    "huge": ({"a": {"dtype": "F32", "shape": [2**60], "data_offsets": [0, 2**62]}}, 16,
             f"the header lays out {2**62} bytes of tensor data (tensor 'a' ends at {2**62}) but the file holds 16"),
    "short": ({"a": {**F32x4, "data_offsets": [0, 8]}}, 8,
              "tensor 'a': data_offsets [0, 8] hold 8 bytes, but F32[4] is 16 bytes"),
    "keyless": ({"a": F32x4}, 16, "tensor 'a': its header entry has no data_offsets"),
    "list": ([1, 2], 16, "the safetensors header is a JSON list, not an object of tensors"),
    "truncated": ({"a": {**F32x4, "data_offsets": [0, 16]}}, 8,
                  "the header lays out 16 bytes of tensor data (tensor 'a' ends at 16) but the file holds 8"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_headers_are_refused_alike_from_the_hub_and_from_disk(hub, cli, case):
    header, size, says = BROKEN[case]
    folder = hub["root"] / f"org/broken-{case}/main"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(crafted(header, bytes(range(size))))
    (folder / "config.json").write_text("{}")
    server = hub["server"]
    server.served.clear()
    repo = f"org/broken-{case}"
    from_hub = diff(cli, repo, repo, "--json")
    from_disk = diff(cli, str(folder), str(folder), "--json")
    assert from_hub["rc"] == from_disk["rc"] == 1, (from_hub, from_disk)
    hub_where, disk_where = f"{repo}: model.safetensors: ", f"{folder / 'model.safetensors'}: "
    assert f"{hub_where}{says}" in from_hub["stderr"], from_hub["stderr"]
    assert f"{disk_where}{says}" in from_disk["stderr"], from_disk["stderr"]
    # The same words after the file's name, whichever way the file was read.
    assert from_hub["stderr"].split(hub_where, 1)[1] == from_disk["stderr"].split(disk_where, 1)[1]
    # A permanent fault: refused from the header, no tensor read, nothing retried, no "run again".
    assert tensor_reads(server) == []
    assert [e[3] for e in server.served if e[2] == "model.safetensors"] == [0, 8]
    assert "run the same command again" not in from_hub["stderr"]


# ------------------------------------------------------------------------------------------ dropped, hung
def test_a_connection_dropped_while_reading_a_header_is_retried_then_resumable(hub, cli):
    server = hub["server"]
    server.served.clear()
    server.cut_start, server.cut_next = 8, 3  # the JSON header's reply is cut 3 times: more than --retries 2
    try:
        broken = diff(cli, "org/base", "org/tuned", "--json")
    finally:
        server.cut_start, server.cut_next = None, 0
    assert broken["rc"] == 1
    assert "still failing after 2 retries" in broken["stderr"], broken["stderr"]
    assert "run the same command again to resume" in broken["stderr"]
    assert "unreadable safetensors header" not in broken["stderr"]
    cut = [e for e in server.served if e[3] == 8]
    assert len(cut) == 3 and len({e[:3] for e in cut}) == 1  # one header, tried 1 + 2 times
    # Cut fewer times than the retries: the diff goes through, with the right numbers.
    server.cut_start, server.cut_next = 8, 2
    try:
        done = diff(cli, "org/base", "org/tuned", "--json")
    finally:
        server.cut_start, server.cut_next = None, 0
    assert done["rc"] == 0, done["stderr"]
    assert counts_of(json.loads(done["stdout"])) == expected_counts(hub["base"], hub["tuned"])


def test_a_hub_that_never_answers_times_out(tmp_path):
    silent = SilentServer()
    worker = Worker(silent.endpoint, tmp_path)
    try:
        started = time.monotonic()
        done = run(worker, "diff", "org/base", "org/tuned", "--timeout", "0.5", "--retries", "1", "--backoff", "0.05",
                   limit=30)
        took = time.monotonic() - started
    finally:
        silent.stop()
        if worker.proc.poll() is None:
            worker.close()
    assert done["rc"] == 1, done
    assert "org/base: still failing after 1 retries (ReadTimeout" in done["stderr"], done["stderr"]
    assert "run the same command again to resume" in done["stderr"]
    assert len(silent.accepted) >= 2  # asked, and asked again
    assert took < 30  # two 0.5 s timeouts, plus the worker's import of the CLI


def test_a_stalled_tensor_read_times_out_and_is_retried(hub, cli):
    server = hub["server"]
    server.served.clear()
    server.stall_next, server.stall_seconds = 1, 10.0  # the first ranged reply comes 10 s late
    started = time.monotonic()
    try:
        done = diff(cli, "org/base", "org/tuned", "--json", "--timeout", "0.5")
    finally:
        server.stall_next = 0
    took = time.monotonic() - started
    assert done["rc"] == 0, done["stderr"]
    assert counts_of(json.loads(done["stdout"])) == expected_counts(hub["base"], hub["tuned"])
    ranged = [e for e in server.served if e[2].endswith(".safetensors")]
    assert ranged[1] == ranged[0]  # given up on after 0.5 s and asked again
    assert took < 8  # not the 10 s the stalled reply would have taken


def test_timeout_retries_and_backoff_refuse_what_is_not_a_wait(cli):
    for flag, value, says in (("--retries", "-1", "argument --retries: '-1' must be >= 0"),
                              ("--retries", "two", "argument --retries: 'two' is not an integer"),
                              ("--backoff", "-1", "argument --backoff: '-1' must be a finite number of seconds >= 0"),
                              ("--timeout", "0", "argument --timeout: '0' must be a finite number of seconds > 0"),
                              ("--timeout", "nan", "argument --timeout: 'nan' must be a finite number of seconds > 0")):
        for command in ("diff", "rank"):
            done = run(cli, command, "org/base", "org/tuned", flag, value)
            assert done["rc"] == 2 and says in done["stderr"], (command, flag, value, done)


# ------------------------------------------------------------------------------------------ outputs
def test_an_unwritable_output_is_refused_before_reading(hub, cli, tmp_path):
    server = hub["server"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for option, path, says in (("-o", tmp_path, f"-o: {tmp_path} is a folder, not a file"),
                               ("--masks-out", a_file / "masks.safetensors",
                                f"--masks-out: {a_file} is not a folder, so {a_file / 'masks.safetensors'} cannot "
                                "be created in it")):
        server.served.clear()
        extra = (option, str(path), *(("--json",) if option == "-o" else ()))
        done = diff(cli, "org/base", "org/tuned", *extra)
        assert done["rc"] == 2, done
        assert says in done["stderr"] and "nothing was read" in done["stderr"], done["stderr"]
        assert server.served == []  # not one file read


def test_a_result_that_cannot_be_written_keeps_the_resume_state(hub, cli, tmp_path):
    """-o is writable when the diff starts but not when it ends: the error is clear (exit 2), the
    resume state stays, and the rerun reads no tensor again."""
    server = hub["server"]
    out = tmp_path / "out.json"
    state = Path(f"{out}.resume.jsonl")
    server.served.clear()
    server.on_range = lambda entry: out.mkdir(exist_ok=True)  # a folder takes the output's name mid-diff
    try:
        done = diff(cli, "org/base", "org/tuned", "--json", "-o", str(out))
    finally:
        server.on_range = None
    assert done["rc"] == 2, done
    assert f"cannot write the result to {out}: Is a directory" in done["stderr"], done["stderr"]
    finished = [json.loads(line)["name"] for line in state.read_text().splitlines()[1:]]
    assert sorted(finished) == sorted(counts_of_names(hub))
    out.rmdir()
    server.served.clear()
    done = diff(cli, "org/base", "org/tuned", "--json", "-o", str(out))
    assert done["rc"] == 0, done["stderr"]
    assert tensor_reads(server) == []  # everything came from the resume state
    assert counts_of(json.loads(out.read_text())) == expected_counts(hub["base"], hub["tuned"])
    assert not state.exists()  # written: the state is gone


def counts_of_names(hub: dict) -> list[str]:
    return [name for name, t in hub["base"].items() if t.is_floating_point()]
