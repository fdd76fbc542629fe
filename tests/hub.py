"""A small Hugging Face Hub for tests: the HTTP API huggingface-hub uses to download.

Serves repositories from local folders, as the real hub does for `model_info`
(`GET /api/models/{repo}[/revision/{rev}]`, with `?blobs=true` sizes, blob ids and LFS
sha256) and for `hf_hub_download` (`HEAD` and `GET /{repo}/resolve/{rev}/{path}` with
X-Repo-Commit, ETag, X-Linked-Etag / X-Linked-Size for LFS files, Content-Length and HTTP
Range). Errors carry the X-Error-Code header huggingface-hub maps to its exceptions.

It also takes writes as huggingface-hub makes them (`create_repo`, `create_commit`,
`upload_folder`): `POST /api/repos/create` (a new repo gets a `.gitattributes` commit, as on
the hub; an existing one is 409 with its url), `POST /api/models/{repo}/preupload/main`
(which files go as LFS objects: the hub's suffixes, or over 10 MB; `oid` of the file already
at that path), the LFS batch API `POST /{repo}.git/info/lfs/objects/batch` (no upload action
for an object the hub already holds: that is how an interrupted push resumes), the upload
`PUT /lfs/{oid}` (the sha256 is checked), and `POST /api/models/{repo}/commit/main`, whose
NDJSON operations (file, lfsFile, deletedFile, deletedFolder) apply all at once or not at
all; a `parentCommit` that is no longer the head is 412. Uploaded objects are not part of any
revision until a commit names them. With `write_token` set, writes need it as a Bearer token.

Every request is logged (method, path, Range and Authorization headers). `stall(path, after)`
makes GETs of a file send up to byte `after`, then hang until `release()` (then send the
rest), so a test can kill a client mid-file and watch the next pull resume with a Range
request; an upload whose path (`/lfs/{sha256}`) ends so is read up to byte `after`, then
hangs until `release()` and is dropped unstored, so a test can kill a push mid-file and
watch the next one send only what the hub lacks.

    hub = LocalHub(); hub.add_repo("org/name", folder); hub.start()
    env HF_ENDPOINT=hub.url
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Stored with git LFS on the real hub: weights and graphs (their etag is the sha256).
_LFS_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors", ".bin", ".model")
_CHUNK = 64 * 1024
# The hub stores larger files with LFS whatever their name (and refuses them as plain blobs).
_LFS_THRESHOLD = 10 * 1024 * 1024
_GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in _LFS_SUFFIXES
)


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
    authorization: str | None = None


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
        self.write_token: str | None = None  # set: writes need `Authorization: Bearer <it>`
        self.objects: dict[str, Path] = {}  # LFS objects uploaded, by sha256
        self.commits: list[tuple[str, str]] = []  # (repo, commit) of every commit made
        self._storage = Path(tempfile.mkdtemp(prefix="ortserve-test-hub-"))
        self._connections: set[socket.socket] = set()
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

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The content of every file of a repository's head."""
        repo = self.repos[repo_id.lower()]
        return {path: f.local.read_bytes() for path, f in sorted(repo.files.items())}

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
        with self._lock:  # a client's kept-alive connection must not reach a stopped hub
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._storage, ignore_errors=True)

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

    def uploads(self, sha256: str | None = None) -> list[LoggedRequest]:
        """The PUTs of LFS objects (of the one with this sha256)."""
        return [
            r for r in self.requests("PUT", "/lfs/") if sha256 is None or r.path.endswith(sha256)
        ]

    def downloads(self, path_suffix: str) -> list[LoggedRequest]:
        """The GETs of files whose path ends with `path_suffix`."""
        return [
            r
            for r in self.requests("GET", "/resolve/")
            if unquote(r.path.split("?")[0]).endswith(path_suffix)
        ]

    # ---- answers -------------------------------------------------------------------------

    def _record(self, method: str, path: str, range_: str | None, auth: str | None = None) -> None:
        with self._lock:
            self.log.append(LoggedRequest(method, path, range_, auth))

    def _find(self, repo_id: str) -> HubRepo | None:
        return self.repos.get(repo_id.lower())

    def _take_stall(self, path: str) -> _Stall | None:
        stall = self._stall
        if stall is not None and path.endswith(stall.path):
            return stall
        return None

    # ---- writes ---------------------------------------------------------------------------

    def _store(self, data: bytes) -> Path:
        """Keep written content in the hub's own folder, named by its sha256."""
        target = self._storage / hashlib.sha256(data).hexdigest()
        if not target.exists():
            staged = target.with_suffix(".partial")
            staged.write_bytes(data)
            staged.replace(target)
        return target

    def _create(self, repo_id: str) -> bool:
        """A new repository with the hub's first commit (.gitattributes); False if it exists."""
        with self._lock:
            if repo_id.lower() in self.repos:
                return False
            local = self._store(_GITATTRIBUTES.encode())
            files = {".gitattributes": _describe(".gitattributes", local, lfs=False)}
            self.repos[repo_id.lower()] = HubRepo(repo_id, _commit_id(repo_id, "", files), files)
            return True

    def _commit(self, repo: HubRepo, parent: str | None, operations: list[dict]) -> str:
        """Apply every operation or none (ValueError, KeyError); the new head's id."""
        with self._lock:
            current = self.repos[repo.repo_id.lower()]
            if parent is not None and parent != current.commit:
                raise _Conflict("A commit has happened since. Please refresh and try again.")
            files = dict(current.files)
            for operation in operations:
                self._apply(files, operation["key"], operation["value"])
            commit = _commit_id(current.repo_id, current.commit, files)
            self.repos[current.repo_id.lower()] = HubRepo(current.repo_id, commit, files)
            self.commits.append((current.repo_id, commit))
            return commit

    def _apply(self, files: dict[str, HubFile], key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            local = self._store(base64.b64decode(value["content"]))
            files[path] = _describe(path, local, lfs=False)
        elif key == "lfsFile":
            local = self.objects.get(value["oid"])
            if local is None or local.stat().st_size != value["size"]:
                raise ValueError(f"LFS object {value['oid']} of {path} was never uploaded")
            files[path] = _describe(path, local, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise KeyError(f"A file with this name doesn't exist: {path}")
        elif key == "deletedFolder":
            for name in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                del files[name]
        else:
            raise ValueError(f"unsupported commit operation {key!r}")


class _Conflict(Exception):
    """A commit whose parent is no longer the head."""


def _commit_id(repo_id: str, parent: str, files: dict[str, HubFile]) -> str:
    tree = "".join(f"{p}\0{f.blob_id}\n" for p, f in sorted(files.items()))
    return hashlib.sha1(f"{repo_id}\n{parent}\n{tree}".encode()).hexdigest()


def _describe(path: str, local: Path, lfs: bool | None = None) -> HubFile:
    data = local.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    lfs = path.endswith(_LFS_SUFFIXES) if lfs is None else lfs
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
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")
_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_UPLOAD = re.compile(r"^/lfs/(?P<oid>[0-9a-f]{64})$")


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            with hub._lock:
                hub._connections.add(self.connection)

        def finish(self):
            with hub._lock:
                hub._connections.discard(self.connection)
            super().finish()

        def log_message(self, format, *args):  # noqa: A002  (the stdlib's name)
            pass  # quiet: tests read hub.log instead

        def do_HEAD(self):  # noqa: N802  (http.server's naming)
            self._answer(head=True)

        def do_GET(self):  # noqa: N802
            self._answer(head=False)

        def do_POST(self):  # noqa: N802
            self._record()
            path = unquote(urlsplit(self.path).path)
            if not self._authorized():
                return
            if path == "/api/repos/create":
                return self._create_repo()
            if match := _PREUPLOAD.match(path):
                return self._preupload(match["repo"], match["rev"])
            if match := _BATCH.match(path):
                return self._batch(match["repo"])
            if match := _COMMIT.match(path):
                return self._commit(match["repo"], match["rev"])
            self._error(404, None, "not found")

        def do_PUT(self):  # noqa: N802
            self._record()
            match = _UPLOAD.match(unquote(urlsplit(self.path).path))
            if match is None:
                return self._error(404, None, "not found")
            self._upload(match["oid"])

        def _record(self) -> None:
            hub._record(self.command, self.path, self.headers.get("Range"),
                        self.headers.get("Authorization"))  # fmt: skip

        def _answer(self, head: bool) -> None:
            self._record()
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

        # -- writes --

        def _authorized(self) -> bool:
            if hub.write_token is None:
                return True
            if self.headers.get("Authorization") == f"Bearer {hub.write_token}":
                return True
            self.close_connection = True  # its body is left unread
            self._error(401, None, "Invalid credentials in Authorization header")
            return False

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, status: int, body: dict, content_type="application/json") -> None:
            self._send(status, json.dumps(body).encode(), {"Content-Type": content_type})

        def _create_repo(self) -> None:
            body = json.loads(self._body())
            name, org = body.get("name"), body.get("organization")
            repo_id = f"{org}/{name}" if org else name
            url = f"{hub.url}/{repo_id}"
            if not hub._create(repo_id):
                self._json(409, {"error": "You already created this model repo", "url": url})
                return
            self._json(200, {"url": url, "name": repo_id})

        def _preupload(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            files = []
            for entry in json.loads(self._body())["files"]:
                path, size = entry["path"], entry["size"]
                lfs = path.endswith(_LFS_SUFFIXES) or size > _LFS_THRESHOLD
                present = repo.files.get(path)
                oid = (
                    None if present is None else present.sha256 if present.lfs else present.blob_id
                )
                files.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})  # fmt: skip
            self._json(200, {"files": files})

        def _batch(self, repo_id: str) -> None:
            if self._repo(repo_id, None) is None:
                return
            objects = []
            for entry in json.loads(self._body())["objects"]:
                answer = {"oid": entry["oid"], "size": entry["size"], "authenticated": True}
                if entry["oid"] not in hub.objects:  # what it already holds is not sent again
                    answer["actions"] = {"upload": {"href": f"{hub.url}/lfs/{entry['oid']}"}}
                objects.append(answer)
            self._json(200, {"transfer": "basic", "objects": objects},
                       "application/vnd.git-lfs+json")  # fmt: skip

        def _upload(self, oid: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            stall = hub._take_stall(self.path)
            data = self.rfile.read(min(length, stall.after) if stall else length)
            if stall is not None:  # an upload cut off: the client is killed meanwhile
                stall.reached.set()
                stall.released.wait(120)
                self.close_connection = True
                return
            if len(data) != length:
                self.close_connection = True  # the client went away mid-upload
                return
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, f"the content does not hash to {oid}")
            local = hub._store(data)
            with hub._lock:
                hub.objects[oid] = local
            self._send(200, b"", {})

        def _commit(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next((line["value"] for line in lines if line["key"] == "header"), {})
            operations = [line for line in lines if line["key"] != "header"]
            try:
                commit = hub._commit(repo, header.get("parentCommit"), operations)
            except _Conflict as exc:
                return self._error(412, None, str(exc))
            except KeyError as exc:
                return self._error(404, "EntryNotFound", str(exc.args[0]))
            except ValueError as exc:
                return self._error(400, None, str(exc))
            self._json(200, {"success": True, "commitOid": commit,
                             "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{commit}"})  # fmt: skip

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
