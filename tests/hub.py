"""A small Hugging Face Hub for tests: the HTTP API huggingface-hub uses to download.

Serves repositories from local folders, as the real hub does for `model_info`
(`GET /api/models/{repo}[/revision/{rev}]`, with `?blobs=true` sizes, blob ids and LFS
sha256) and for `hf_hub_download` (`HEAD` and `GET /{repo}/resolve/{rev}/{path}` with
X-Repo-Commit, ETag, X-Linked-Etag / X-Linked-Size for LFS files, Content-Length and HTTP
Range). Errors carry the X-Error-Code header huggingface-hub maps to its exceptions.

Every request is logged (method, path, Range header). `stall(path, after)` makes GETs of a
file send up to byte `after`, then hang until `release()` (then send the rest), so a test
can kill a client mid-file and watch the next pull resume with a Range request.

    hub = LocalHub(); hub.add_repo("org/name", folder); hub.start()
    env HF_ENDPOINT=hub.url
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Stored with git LFS on the real hub: weights and graphs (their etag is the sha256).
_LFS_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors", ".bin", ".model")
_CHUNK = 64 * 1024


@dataclass
class HubFile:
    path: str
    local: Path
    size: int
    sha256: str
    blob_id: str  # git object id; of the LFS pointer for LFS files, as on the hub
    lfs: bool


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None


@dataclass
class _Stall:
    path: str
    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


class LocalHub:
    """A threaded HTTP server that answers like huggingface.co for the repos added to it."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.log: list[LoggedRequest] = []
        self._stall: _Stall | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- set-up --------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path) -> HubRepo:
        """Serve every file below `folder` as one commit of `repo_id`."""
        files = {}
        for local in sorted(p for p in folder.rglob("*") if p.is_file()):
            path = local.relative_to(folder).as_posix()
            files[path] = _describe(path, local)
        tree = "".join(f"{p}\0{f.blob_id}\n" for p, f in sorted(files.items()))
        commit = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        self.repos[repo_id.lower()] = HubRepo(repo_id, commit, files)
        return self.repos[repo_id.lower()]

    def start(self) -> LocalHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- test controls -------------------------------------------------------------------

    def stall(self, path_suffix: str, after: int) -> threading.Event:
        """The next GET of a file ending with `path_suffix` hangs after `after` bytes;
        the returned event is set when it does."""
        self._stall = _Stall(path_suffix, after)
        return self._stall.reached

    def release(self) -> None:
        """Let a stalled download go on."""
        stall, self._stall = self._stall, None
        if stall is not None:
            stall.released.set()

    def requests(self, method: str | None = None, contains: str = "") -> list[LoggedRequest]:
        with self._lock:
            return [
                r for r in self.log if (method is None or r.method == method) and contains in r.path
            ]

    def downloads(self, path_suffix: str) -> list[LoggedRequest]:
        """The GETs of files whose path ends with `path_suffix`."""
        return [
            r
            for r in self.requests("GET", "/resolve/")
            if unquote(r.path.split("?")[0]).endswith(path_suffix)
        ]

    # ---- answers -------------------------------------------------------------------------

    def _record(self, method: str, path: str, range_: str | None) -> None:
        with self._lock:
            self.log.append(LoggedRequest(method, path, range_))

    def _find(self, repo_id: str) -> HubRepo | None:
        return self.repos.get(repo_id.lower())

    def _take_stall(self, path: str) -> _Stall | None:
        stall = self._stall
        if stall is not None and path.endswith(stall.path):
            return stall
        return None


def _describe(path: str, local: Path) -> HubFile:
    data = local.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    lfs = path.endswith(_LFS_SUFFIXES)
    if lfs:
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        )
        blob_id = _git_blob_id(pointer.encode())
    else:
        blob_id = _git_blob_id(data)
    return HubFile(path, local, len(data), sha256, blob_id, lfs)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002  (the stdlib's name)
            pass  # quiet: tests read hub.log instead

        def do_HEAD(self):  # noqa: N802  (http.server's naming)
            self._answer(head=True)

        def do_GET(self):  # noqa: N802
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            hub._record(self.command, self.path, self.headers.get("Range"))
            path = unquote(urlsplit(self.path).path)
            if match := _INFO.match(path):
                return self._model_info(
                    match["repo"], match["rev"], "blobs=true" in self.path.lower()
                )
            if match := _RESOLVE.match(path):
                return self._resolve(match["repo"], match["rev"], match["path"], head)
            self._error(404, None, "not found")

        # -- /api/models --

        def _model_info(self, repo_id: str, rev: str | None, blobs: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            siblings = [_sibling(f, blobs) for f in repo.files.values()]
            body = {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": repo.commit,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": ["onnx"],
                "siblings": siblings,
            }
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        # -- /resolve --

        def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            file = repo.files.get(path)
            if file is None:
                self._error(404, "EntryNotFound", f"{path} not found", repo.commit)
                return
            headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}  # fmt: skip
            if file.lfs:
                headers["ETag"] = f'"{file.sha256}"'
                headers["X-Linked-Etag"] = f'"{file.sha256}"'
                headers["X-Linked-Size"] = str(file.size)
            else:
                headers["ETag"] = f'"{file.blob_id}"'
            start, end = self._range(file.size)
            if start is None:
                self._error(416, None, "range not satisfiable")
                return
            status = 206 if self.headers.get("Range") else 200
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
            headers["Content-Length"] = str(end - start + 1 if file.size else 0)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self._stream(file, start, end)

        def _range(self, size: int) -> tuple[int | None, int]:
            header = self.headers.get("Range")
            if not header:
                return 0, size - 1
            match = _RANGE.match(header.strip())
            if not match or int(match[1]) >= max(size, 1):
                return None, 0
            end = int(match[2]) if match[2] else size - 1
            return int(match[1]), min(end, size - 1)

        def _stream(self, file: HubFile, start: int, end: int) -> None:
            try:
                self._send_bytes(file, start, end, hub._take_stall(file.path))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client was killed mid-file

        def _send_bytes(self, file: HubFile, start: int, end: int, stall: _Stall | None) -> None:
            with open(file.local, "rb") as f:
                f.seek(start)
                position = start
                while position <= end:
                    if stall is not None and position >= stall.after:
                        self.wfile.flush()
                        stall.reached.set()
                        stall.released.wait(120)
                        stall = None  # released: a slow hub, not a dead one; send the rest
                    limit = end + 1 - position
                    if stall is not None:
                        limit = min(limit, stall.after - position)
                    chunk = f.read(min(_CHUNK, limit))
                    if not chunk:
                        return
                    self.wfile.write(chunk)
                    position += len(chunk)

        # -- helpers --

        def _repo(self, repo_id: str, rev: str | None) -> HubRepo | None:
            repo = hub._find(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if rev not in (None, "main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo

        def _error(self, status: int, code: str | None, message: str, commit=None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            body = b"" if self.command == "HEAD" else json.dumps({"error": message}).encode()
            self._send(status, body, headers)

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _sibling(file: HubFile, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": file.path}
    entry: dict = {"rfilename": file.path, "size": file.size, "blobId": file.blob_id}
    if file.lfs:
        entry["size"] = file.size
        entry["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
    return entry
