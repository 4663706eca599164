"""A small Hugging Face hub for tests: repos served from folders, on 127.0.0.1, with HTTP ranges.

``root/<org>/<name>/<revision>/<files>``: each sub-folder of a repo is a revision (branch or tag
name); its commit sha is ``sha1("<org>/<name>@<revision>")``, and asking for that sha works too.
The endpoints are the ones ``huggingface_hub`` 2.4 calls for ``model_info``, ``hf_hub_download`` /
``snapshot_download`` and ranged reads (see /work/shared/REFERENCE.md): repo info, tree, paths-info,
``HEAD``/``GET .../resolve/<rev>/<path>`` with ``ETag``, ``X-Repo-Commit``, ``Content-Length`` and
``Range`` (206). What the real client is told on errors is what the hub tells it: ``X-Error-Code``
``RepoNotFound`` / ``RevisionNotFound`` (404), ``GatedRepo`` (401, on file downloads of a gated repo,
whose info stays public as on the hub).

The server counts what it serves: :attr:`HubServer.served` lists every ``GET .../resolve`` as
``(repo, revision, file, start, stop)`` (byte range actually sent). :attr:`stop_after_ranges` makes
it stop itself once it has served that many range requests, dropping open connections, as a server
that goes away mid-transfer does; :attr:`on_range` lets a test act while a diff is under way; :attr:`fail_next` answers the next resolve GETs with 503.

Misbehaviours a real network shows, for the client's checks: :attr:`ignore_range_start` answers
``Range: bytes=a-b`` with the file's first ``b − a + 1`` bytes, honestly labelled ``bytes 0-…`` (as a
proxy that drops the range start does); :attr:`cut_next` sends the next ranged replies' headers and
half their body (only for ranges starting at :attr:`cut_start`, when set), then closes the connection;
:attr:`stall_next` holds ranged replies back for :attr:`stall_seconds`. :class:`SilentServer` accepts connections and never
answers. Crafted (broken) safetensors files are simply files of a repo folder.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def commit_sha(repo_id: str, revision: str) -> str:
    """The commit sha the server gives ``revision`` of ``repo_id``."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubServer:
    """Serves the repos under ``root`` on ``127.0.0.1:port`` (``port=0``: a free one) in a thread."""

    def __init__(self, root: str | Path, port: int = 0):
        self.root = Path(root)
        self.gated: set[str] = set()
        self.served: list[tuple[str, str, str, int, int]] = []
        self.range_requests = 0
        self.stop_after_ranges: int | None = None
        self.fail_next = 0  # answer this many next resolve GETs with 503, as an overloaded hub does
        self.ignore_range_start = False  # serve bytes 0 … (b − a) for "bytes=a-b", labelled so
        self.cut_next = 0  # send this many next ranged replies half-way, then close the connection ...
        self.cut_start: int | None = None  # ... only those of ranges starting at this byte (None: any)
        self.stall_next = 0  # hold this many next ranged replies back for stall_seconds before answering
        self.stall_seconds = 0.0
        self.on_range: Callable[[tuple[str, str, str, int, int]], None] | None = None  # called before each ranged reply
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop listening and make open connections drop their next request."""
        self.stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def resolve(self, repo_id: str, revision: str | None) -> tuple[Path | None, str | None]:
        """(folder of the revision, its name); (None, None) for a missing repo, (None, rev) for a missing revision."""
        repo = self.root / repo_id
        if not repo.is_dir():
            return None, None
        revision = unquote(revision or "main")
        for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
            if revision in (folder.name, commit_sha(repo_id, folder.name)):
                return folder, folder.name
        return None, revision

    def record(self, entry: tuple[str, str, str, int, int], is_range: bool) -> bool:
        """Count a served GET; True when this was the range request after which the server stops."""
        with self._lock:
            self.served.append(entry)
            if is_range:
                self.range_requests += 1
            return self.stop_after_ranges is not None and is_range and self.range_requests >= self.stop_after_ranges


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the hub: connections are reused across range reads
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms to each
    server_hub: HubServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # ------------------------------------------------------------------------------------------ replies
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head_only: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _json(self, payload: object) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

    def _dropped(self) -> bool:
        """A stopped server answers nothing: the connection just closes."""
        if self.server_hub.stopped.is_set():
            self.close_connection = True
            return True
        return False

    # ------------------------------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        self._route(head_only=False)

    def do_HEAD(self) -> None:
        self._route(head_only=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._route(head_only=False)

    def _route(self, head_only: bool) -> None:
        if self._dropped():
            return
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2] + "/" + parts[3], parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head_only)
        else:
            self._error(404, "EntryNotFound", f"no route for {self.path}")

    def _files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def _api(self, repo_id: str, rest: list[str]) -> None:
        hub = self.server_hub
        revision = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree", "paths-info") else None
        folder, name = hub.resolve(repo_id, revision)
        if folder is None:
            if name is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {name}")
        sha = commit_sha(repo_id, name)
        files = self._files(folder)
        entries = [{"type": "file", "path": str(p.relative_to(folder)), "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
        if rest[:1] in (["tree"], ["paths-info"]):
            return self._json(entries)
        self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "gated": "auto" if repo_id in hub.gated else False,
                    "siblings": [{"rfilename": e["path"], "size": e["size"]} for e in entries]})

    def _resolve(self, repo_id: str, revision: str, file: str, head_only: bool) -> None:
        hub = self.server_hub
        folder, name = hub.resolve(repo_id, revision)
        if folder is None:
            if name is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {name}")
        if repo_id in hub.gated:
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                                 "to it and be authenticated to access it. Please log in.")
        if not head_only:
            with hub._lock:
                fail, hub.fail_next = hub.fail_next > 0, max(0, hub.fail_next - 1)
            if fail:
                return self._error(503, "ServiceUnavailable", "try again later")
        path = folder / file
        if not path.is_file():
            return self._error(404, "EntryNotFound", f"{file} does not exist at {name}")
        size = path.stat().st_size
        headers = {"ETag": f'"{hashlib.sha1(f"{repo_id}@{name}/{file}".encode()).hexdigest()}"',
                   "X-Repo-Commit": commit_sha(repo_id, name), "Accept-Ranges": "bytes"}
        spec = self.headers.get("Range")
        start, stop = 0, size
        if spec:
            first, _, last = spec.removeprefix("bytes=").partition("-")
            start, stop = int(first), min(size, int(last) + 1 if last else size)
            if hub.ignore_range_start:
                start, stop = 0, min(size, stop - start)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if head_only:
            headers["Content-Length"] = str(size)
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        with open(path, "rb") as handle:
            handle.seek(start)
            body = handle.read(stop - start)
        stop_now = hub.record((repo_id, name, file, start, stop), is_range=bool(spec))
        if spec and hub.on_range is not None:
            hub.on_range((repo_id, name, file, start, stop))
        with hub._lock:
            stall = bool(spec) and hub.stall_next > 0
            hub.stall_next -= int(stall)
        if stall:  # a reply that takes its time: the client has given up on it, or waits
            time.sleep(hub.stall_seconds)
        with hub._lock:
            cut = bool(spec) and hub.cut_next > 0 and hub.cut_start in (None, start)
            hub.cut_next -= int(cut)
        if cut:  # the connection drops mid-body: headers promise len(body) bytes, half of them come
            self.send_response(206)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(206 if spec else 200, body, headers)
        if stop_now:
            threading.Thread(target=hub.stop, daemon=True).start()


class SilentServer:
    """Accepts connections on ``127.0.0.1:port`` and never answers: a hub that hangs."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed by stop()
                return
            self.accepted.append(connection)  # held open, never read from nor written to

    def stop(self) -> None:
        self._socket.close()
        for connection in self.accepted:
            connection.close()
