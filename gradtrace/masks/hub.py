"""Checkpoints on the Hugging Face hub as tensor sources: ``org/name[@revision]``, read with HTTP ranges.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte offsets, then the tensors' bytes. So a shard never has to be downloaded: two
small range requests read its header, then one range request per tensor reads exactly that
tensor's bytes into memory, where the diff compares it and drops it. Nothing is written to disk.

Resolution goes through ``huggingface_hub`` (imported here only, and only when a hub id is given),
so ``HF_ENDPOINT``, ``HF_TOKEN`` and the user's cache are honoured; the revision (branch, tag or
commit) is pinned to its commit once, so a branch that moves during a long diff cannot mix two
versions. ``--cache`` (``cache=True``) downloads through the normal HF cache instead, and
``HF_HUB_OFFLINE=1`` reads that cache only. Transient HTTP errors (connection refused or reset, 408,
429, 5xx, a body cut short, no answer within ``timeout`` seconds) are retried with exponential
backoff; when the retries run out the error names the repo and says that rerunning resumes
(:mod:`gradtrace.masks.resume`). What no retry can mend fails at once, naming the file: a reply whose
``Content-Range`` is not the bytes asked for (a proxy that ignores the range start would otherwise
have the wrong bytes compared), and a header that the shared check
(:mod:`gradtrace.formats.safetensors_header`, the one local files get) refuses — including offsets
past the end of the file, whose size the first ranged reply's ``Content-Range`` gives.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from gradtrace.formats.dtypes import torch_dtype
from gradtrace.formats.safetensors_header import SafetensorsHeaderError, header_length, parse_header
from gradtrace.masks.sources import INDEX_NAME, CheckpointDiffError, LocalSource, TensorSource, TensorSpec

# A hub id: "org/name", optionally "@revision" (branch, tag, commit; may contain "/", as refs/pr/1 does).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>\S+))?")
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# "Content-Range: bytes 0-7/1234" ("*" for a total the server does not know)
_CONTENT_RANGE = re.compile(r"bytes\s+(?P<first>\d+)-(?P<last>\d+)/(?P<total>\d+|\*)")
DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the server before a request counts as failed (and is retried)


class HubUnavailableError(CheckpointDiffError):
    """The hub (or the network) kept failing after the retries: rerunning resumes."""


@dataclass(frozen=True)
class HubRef:
    """A repo on the hub and the revision asked for (``None``: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_ref(text: str) -> HubRef | None:
    """``"org/name@rev"`` → ``HubRef("org/name", "rev")``; ``None`` when ``text`` is not a hub id."""
    match = _HUB_ID.fullmatch(text.strip())
    return HubRef(match["repo"], match["revision"]) if match else None


def _hub_error(ref: HubRef, err: Exception) -> CheckpointDiffError:
    """One clear error for what resolving ``ref`` can raise, naming the repo and revision."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return CheckpointDiffError(f"{ref.repo_id}: gated repo; accept its conditions on the hub and set HF_TOKEN "
                                   "(or `hf auth login`) to a token that has access")
    if isinstance(err, RevisionNotFoundError):
        return CheckpointDiffError(f"{ref.repo_id}: no revision {ref.revision!r} (not a branch, tag or commit of it)")
    if isinstance(err, RepositoryNotFoundError):
        return CheckpointDiffError(f"{ref.repo_id}: no such model repo on the hub (nor a local path); if it is "
                                   "private, set HF_TOKEN to a token that can read it")
    return CheckpointDiffError(f"{ref}: {type(err).__name__}: {err}")


def _transient(err: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, (httpx2.TransportError, _ShortRead)):
        return True
    response = getattr(err, "response", None)
    return isinstance(err, HfHubHTTPError) and response is not None and response.status_code in _RETRY_STATUS


class _ShortRead(Exception):
    """The body ended before the bytes asked for: the connection dropped mid-transfer."""


def _with_retries(what: str, call: Any, retries: int, backoff: float) -> Any:
    """``call()``, retried on transient errors with exponential backoff (``backoff``, 2×, 4×… s, at most 60 s)."""
    if retries < 0 or not backoff >= 0:
        raise ValueError(f"retries must be >= 0 and backoff >= 0 seconds, not {retries} and {backoff}")
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as err:
            if not _transient(err):
                raise
            if attempt == retries:
                raise HubUnavailableError(
                    f"{what}: still failing after {retries} retries ({type(err).__name__}: {err}); run the "
                    "same command again to resume from the last finished tensor") from err
            time.sleep(min(60.0, backoff * 2**attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")


def open_hub_source(ref: HubRef, *, device: str = "cpu", cache: bool = False, retries: int = 5,
                    backoff: float = 1.0, timeout: float = DEFAULT_TIMEOUT) -> TensorSource:
    """The checkpoint at ``ref``: streamed (:class:`HubSource`), or from the HF cache when ``cache`` is set
    or ``HF_HUB_OFFLINE=1``. ``timeout``: seconds each request may wait for the server (a request that
    times out is retried like any transient error)."""
    try:
        import huggingface_hub
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:
        raise CheckpointDiffError(f"{ref}: reading hub repos needs huggingface_hub>=2.4 "
                                  "(pip install 'gradtrace[hub]')") from err
    if tuple(int(x) for x in re.findall(r"\d+", huggingface_hub.__version__)[:2]) < (2, 4):
        raise CheckpointDiffError(f"{ref}: reading hub repos needs huggingface_hub>=2.4, found "
                                  f"{huggingface_hub.__version__} (pip install 'gradtrace[hub]')")
    if constants.HF_HUB_OFFLINE:
        try:
            folder = snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True)
        except LocalEntryNotFoundError as err:
            raise CheckpointDiffError(
                f"{ref}: not a local path, and HF_HUB_OFFLINE=1 while the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) has no copy of it; unset HF_HUB_OFFLINE (add --cache to keep "
                "a copy)") from err
        return LocalSource(folder, device=device, label=str(ref),
                           identity=f"{ref.repo_id}@{PurePosixPath(folder).name}")
    try:
        info = _with_retries(str(ref), lambda: HfApi().model_info(ref.repo_id, revision=ref.revision,
                                                                        timeout=timeout),
                             retries, backoff)
    except HubUnavailableError:
        raise
    except HfHubHTTPError as err:
        raise _hub_error(ref, err) from err
    files = [s.rfilename for s in (info.siblings or [])]
    weights = _weight_files(ref, files)
    if cache:
        wanted = [*weights, *(f for f in files if f == "config.json" or f.endswith(".safetensors.index.json"))]
        try:
            # By the name asked for (not the commit), so the cache maps that branch or tag to its
            # commit and HF_HUB_OFFLINE=1 finds it later under the same name.
            folder = _with_retries(str(ref), lambda: snapshot_download(ref.repo_id, revision=ref.revision,
                                                                       allow_patterns=wanted, etag_timeout=timeout),
                                    retries, backoff)
        except HfHubHTTPError as err:
            raise _hub_error(ref, err) from err
        return LocalSource(folder, device=device, label=str(ref),
                           identity=f"{ref.repo_id}@{PurePosixPath(folder).name}")
    return HubSource(ref, info.sha, files, device=device, retries=retries, backoff=backoff, timeout=timeout)


def _weight_files(ref: HubRef, files: list[str]) -> list[str]:
    """The root-level safetensors files holding the weights (``.bin``-only repos are refused by name)."""
    root = [f for f in files if "/" not in f]
    if not any(f.endswith(".safetensors") for f in root):
        raise CheckpointDiffError(f"{ref}: no *.safetensors file at the repo's root (found {sorted(root)[:8]}); "
                                  "gradtrace diff reads safetensors only")
    return sorted(f for f in root if f.endswith(".safetensors"))


class HubSource:
    """One revision of a hub repo, read tensor by tensor with HTTP range requests.

    ``specs`` come from the shards' headers (two small ranged reads per shard, made on construction);
    :meth:`read` fetches exactly one tensor's bytes into memory. Safe to call from two threads (the
    diff reads base and tuned, and the next pair ahead, concurrently).
    """

    streamed = True

    def __init__(self, ref: HubRef, sha: str, files: list[str], *, device: str = "cpu", retries: int = 5,
                 backoff: float = 1.0, timeout: float = DEFAULT_TIMEOUT):
        from huggingface_hub.utils import build_hf_headers

        self.ref, self.sha = ref, sha
        self.label, self.identity = str(ref), f"{ref.repo_id}@{sha}"
        self.device = device
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self._sizes: dict[str, int] = {}  # file -> its size in bytes, as the Content-Range of a ranged read said
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._headers = build_hf_headers()  # HF_TOKEN / the stored login, like every huggingface_hub call
        self._index: dict[str, str] | None = None  # tensor -> shard, from the shard index when there is one
        self._config = json.loads(self._get("config.json")) if "config.json" in files else None
        self._specs: dict[str, TensorSpec] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, first byte, end byte)
        for file in self._shards(files):
            self._read_header(file)
        if self._index is not None:  # the order a local diff of the same folder reports: the index's
            self._specs = {name: self._specs[name] for name in self._index if name in self._specs}

    def _shards(self, files: list[str]) -> list[str]:
        indexes = sorted(f for f in files if "/" not in f and f.endswith(".safetensors.index.json"))
        if not indexes:
            return _weight_files(self.ref, files)
        index = INDEX_NAME if INDEX_NAME in indexes else indexes[0]
        try:
            weight_map = json.loads(self._get(index))["weight_map"]
            self._index = {str(name): str(file) for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointDiffError(f"{self.label}: unreadable shard index {index} ({err})") from err
        missing = sorted(set(self._index.values()) - set(files))
        if missing:
            raise CheckpointDiffError(f"{self.label}: {index} lists shard {missing[0]}, which the repo does not have")
        return sorted(set(self._index.values()))

    def _url(self, file: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.ref.repo_id, file, revision=self.sha)

    def _get(self, file: str, start: int | None = None, stop: int | None = None) -> bytearray:
        """Bytes ``start … stop − 1`` of ``file`` (the whole file without a range), retried on transient errors."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return _with_retries(f"{self.label}: {file}", lambda: self._get_once(file, start, stop),
                                 self.retries, self.backoff)
        except HfHubHTTPError as err:  # e.g. a token that may list the repo but not read it
            raise _hub_error(self.ref, err) from err

    def _get_once(self, file: str, start: int | None, stop: int | None) -> bytearray:
        import httpx2
        from huggingface_hub.utils import get_session, hf_raise_for_status

        headers = dict(self._headers)
        if start is not None:
            headers["Range"] = f"bytes={start}-{stop - 1}"
        with get_session().stream("GET", self._url(file), headers=headers,
                                  timeout=httpx2.Timeout(self.timeout)) as response:
            if response.status_code >= 400:
                response.read()  # the error's message is in the body, which a stream has not read yet
            hf_raise_for_status(response)
            if start is not None and response.status_code != 206:
                raise CheckpointDiffError(f"{self.label}: {file}: the server answered a range request with "
                                          f"HTTP {response.status_code}, not 206; it cannot be streamed (try --cache)")
            if start is None:
                return bytearray(response.read())
            self._check_range(file, response.headers.get("Content-Range"), start, stop)
            buffer, filled = bytearray(stop - start), 0  # preallocated: no second copy of the tensor
            for chunk in response.iter_bytes(1 << 20):
                if filled + len(chunk) > len(buffer):
                    raise CheckpointDiffError(f"{self.label}: {file}: more bytes than the range asked for")
                buffer[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled != len(buffer):
                raise _ShortRead(f"{file}: got {filled} of {len(buffer)} bytes")
            return buffer

    def _check_range(self, file: str, content_range: str | None, start: int, stop: int) -> None:
        """Refuse a 206 reply that is not the bytes asked for (a proxy that drops the range start, a file
        shorter than the range), so wrong bytes are never compared; record the file's size it gives."""
        where = f"{self.label}: {file}"
        match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
        if match is None:
            raise CheckpointDiffError(f"{where}: the server answered a request for bytes {start}-{stop - 1} with "
                                      f"HTTP 206 but Content-Range {content_range!r}; it cannot be streamed "
                                      "(try --cache)")
        first, last = int(match["first"]), int(match["last"])
        total = None if match["total"] == "*" else int(match["total"])
        if total is not None:
            if self._sizes.setdefault(file, total) != total:
                raise CheckpointDiffError(f"{where}: the server gave its size as {self._sizes[file]} bytes, then "
                                          f"{total}, within one pinned commit; it cannot be streamed (try --cache)")
            if first == start and last == total - 1 < stop - 1:
                raise CheckpointDiffError(f"{where}: bytes {start}-{stop - 1} were asked for, but the file ends at "
                                          f"byte {total - 1} ({total} bytes)")
        if (first, last) != (start, stop - 1):
            raise CheckpointDiffError(f"{where}: bytes {start}-{stop - 1} were asked for, but the server sent bytes "
                                      f"{first}-{last} (Content-Range {content_range!r}): it, or a proxy between, "
                                      "does not honour ranges, so the file cannot be streamed (try --cache)")

    def _read_header(self, file: str) -> None:
        where = f"{self.label}: {file}"
        try:
            length = header_length(bytes(self._get(file, 0, 8)), where, self._sizes.get(file))
            size = self._sizes.get(file)
            entries = parse_header(self._get(file, 8, 8 + length), where, None if size is None else size - 8 - length)
        except SafetensorsHeaderError as err:
            raise CheckpointDiffError(str(err)) from err
        index = self._index
        for name, entry in entries.items():  # sorted, as safetensors' own keys() are
            if index is not None and index.get(name) != file:
                continue
            if name in self._specs:
                raise CheckpointDiffError(f"{self.label}: tensor {name!r} is in both {self._where[name][0]} and "
                                          f"{file} (add a {INDEX_NAME} to say which is meant)")
            self._specs[name] = TensorSpec(name, entry.shape, entry.dtype)
            self._where[name] = (file, 8 + length + entry.begin, 8 + length + entry.end)

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def config(self) -> dict[str, Any] | None:
        return self._config

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        file, start, stop = self._where[name]
        dtype = torch_dtype(spec.dtype)
        if dtype is None:
            raise CheckpointDiffError(f"{self.label}: tensor {name!r} has dtype {spec.dtype}, which torch cannot read")
        data = self._get(file, start, stop) if stop > start else bytearray()
        with self._lock:
            self.bytes_read += len(data)
        tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return tensor.reshape(spec.shape).to(self.device)
