"""Manifests and content-addressed bundle directories, written atomically.

Layout under the root (ORTSERVE_MODELS, default ~/.ortserve/models):

    manifests/<namespace>/<model>/<tag>.json   one per name:tag (lower-cased path)
    bundles/sha256-<hex>/                      immutable bundle, named by its digest
    tmp/<random>/                              staging; renamed into bundles/ when complete
    cache/int8/sha256-<hex>/                   a bundle's int8 weights (engine/int8_compute.py),
                                               removed with the bundle
    cache/kv_int8/sha256-<hex>/                its int8 KV cache scales (engine/kv_int8.py),
                                               removed with the bundle
    blobs/sha256-<hex>                         uploaded files (/api/blobs), named by sha256
    verified.json                              size and mtime of bundle files that hashed right

A bundle's digest is the sha256 of its file index (every file's path, size and sha256), and
the index is kept in the bundle as `ortserve-files.json`. Every write lands in a temporary
place first and is renamed into place, so a process killed at any moment leaves either the
old state or the new one: `list` only ever reads complete manifests, and a manifest is only
written once its bundle is in place.

A bundle is checked against its digest each time it loads (`check`), cheaply: a file whose
size and modification time are those it had when it last hashed right (verified.json) is not
hashed again, so a changed file is caught without re-reading gigabytes on every load.
`verify` always re-hashes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ortserve.errors import InvalidName, InvalidRequest, LibraryCorrupt, ModelNotFound
from ortserve.library.names import ModelName

INDEX_FILE = "ortserve-files.json"
VERIFIED_FILE = "verified.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
_STALE_STAGING_S = 24 * 3600
# A blob no manifest uses is kept this long: it may be an upload waiting for its create.
_BLOB_GRACE_S = 3600
_BLOB_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_PARTIAL_BLOB = ".partial-"
# A temporary file of an atomic JSON write lives milliseconds; one this old was abandoned.
_TEMP_FILE_GRACE_S = 600
# What the engine derives from a bundle and keeps under cache/<kind>/<bundle>/, removed with it:
# int8 weights (engine/int8_compute.py), int8 KV cache scales (engine/kv_int8.py).
DERIVED_KINDS = ("int8", "kv_int8")


@dataclass
class ModelInfo:
    """One library entry: its name, its bundle directory and its manifest."""

    name: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def digest(self) -> str:
        return self.manifest["bundle"]

    @property
    def short_id(self) -> str:
        return self.digest.removeprefix("sha256-")[:12]

    @property
    def details(self) -> dict[str, Any]:
        return self.manifest.get("details", {})

    @property
    def capabilities(self) -> list[str]:
        return self.manifest.get("capabilities", [])

    @property
    def size(self) -> int:
        return self.manifest.get("size", 0)

    @property
    def modified(self) -> datetime:
        return datetime.fromisoformat(self.manifest["modified"])


@dataclass
class VerifyResult:
    digest: str
    names: list[str]
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


class Library:
    """The local model library rooted at one directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        if root is None:
            from ortserve.config import Settings

            root = Settings.from_env().models
        self.root = Path(root).expanduser()
        self.manifests_dir = self.root / "manifests"
        self.bundles_dir = self.root / "bundles"
        self.tmp_dir = self.root / "tmp"
        self.blobs_dir = self.root / "blobs"
        self._verified = _VerifiedFiles(self.root / VERIFIED_FILE)

    # ---- staging and bundles -------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, label: str = "stage") -> Iterator[Path]:
        """A scratch directory on the library's filesystem, removed on exit unless consumed."""
        self._remove_stale_staging()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{label}-{os.getpid()}-", dir=self.tmp_dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def add_bundle(self, staged: Path) -> str:
        """Index a staged directory and rename it into bundles/; return its digest."""
        index = index_files(staged)
        digest = index_digest(index)
        _write_json_atomic(staged / INDEX_FILE, index)
        target = self.bundle_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(staged, ignore_errors=True)  # same content is already there
            return digest
        try:
            os.rename(staged, target)
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(staged, ignore_errors=True)  # a concurrent writer won the rename
            return digest
        # Just hashed: its first load need not hash it again.
        self._verified.record(digest, _stamps(target, index))
        return digest

    def bundle_path(self, digest: str) -> Path:
        if not digest.startswith("sha256-") or not all(c in "0123456789abcdef" for c in digest[7:]):
            raise LibraryCorrupt(f"invalid bundle digest {digest!r}")
        return self.bundles_dir / digest

    # ---- blobs (uploads for /api/create) ---------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob `sha256:<hex>` is (or would be) kept."""
        return self.blobs_dir / f"sha256-{blob_hex(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def add_blob(self, stream: BinaryIO, digest: str) -> Path:
        """Store `stream` as blob `digest`, hashing while writing; a mismatch leaves nothing."""
        expected = blob_hex(digest)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_PARTIAL_BLOB, dir=self.blobs_dir)
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(_CHUNK):
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = hasher.hexdigest()
            if actual != expected:
                raise InvalidRequest(
                    f"digest mismatch: expected sha256:{expected}, got sha256:{actual}",
                    param="digest",
                )
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.blob_path(digest)

    # ---- manifests -----------------------------------------------------------------------

    def save(self, name: str | ModelName, manifest: dict[str, Any]) -> ModelInfo:
        """Write the manifest of `name` (replacing any), pointing at an existing bundle."""
        model_name = _parse(name)
        bundle = self.bundle_path(manifest["bundle"])
        if not bundle.is_dir():
            raise LibraryCorrupt(f"bundle {manifest['bundle']} is not in the library")
        previous = self._read_manifest(model_name)
        now = _now()
        record = {
            **manifest,
            "schema_version": MANIFEST_VERSION,
            "name": model_name.display,
            "size": bundle_size(bundle),
            "created": manifest.get("created") or now,
            "modified": now,
        }
        _write_json_atomic(self._manifest_path(model_name), record)
        if previous and previous["bundle"] != record["bundle"]:
            self._remove_bundle_if_unused(previous["bundle"])
        return ModelInfo(model_name.display, bundle, record)

    def add(self, name: str | ModelName, staged: Path, manifest: dict[str, Any]) -> ModelInfo:
        """Move a staged bundle into the library and name it."""
        model_name = _parse(name)  # validate before the bundle moves anywhere
        digest = self.add_bundle(staged)
        return self.save(model_name, {**manifest, "bundle": digest})

    def get(self, name: str | ModelName) -> ModelInfo:
        model_name = _parse(name)
        manifest = self._read_manifest(model_name)
        if manifest is None:
            raise ModelNotFound(model_name.display)
        return ModelInfo(manifest["name"], self.bundle_path(manifest["bundle"]), manifest)

    def exists(self, name: str | ModelName) -> bool:
        return self._read_manifest(_parse(name)) is not None

    def list(self) -> list[ModelInfo]:
        """Every model, newest first."""
        models = []
        for path in (
            sorted(self.manifests_dir.rglob("*.json")) if self.manifests_dir.is_dir() else []
        ):
            manifest = _read_json(path)
            if manifest and "bundle" in manifest:
                models.append(
                    ModelInfo(manifest["name"], self.bundle_path(manifest["bundle"]), manifest)
                )
        return sorted(models, key=lambda m: m.manifest["modified"], reverse=True)

    def copy(self, source: str, destination: str) -> ModelInfo:
        """Give a model a second name; both share one bundle."""
        src = self.get(source)
        manifest = {k: v for k, v in src.manifest.items() if k not in ("created", "modified")}
        return self.save(destination, manifest)

    def update(self, name: str, **fields: Any) -> ModelInfo:
        """Change manifest fields (system, parameters, template, ...) of one model."""
        model = self.get(name)
        return self.save(name, {**model.manifest, **fields})

    def delete(self, name: str | ModelName) -> None:
        model_name = _parse(name)
        manifest = self._read_manifest(model_name)
        if manifest is None:
            raise ModelNotFound(model_name.display)
        self._manifest_path(model_name).unlink()
        _remove_empty_parents(self._manifest_path(model_name).parent, self.manifests_dir)
        self._remove_bundle_if_unused(manifest["bundle"])

    # ---- maintenance ---------------------------------------------------------------------

    def prune(self) -> list[str]:
        """Remove bundles and (hour-old) blobs no manifest uses, and crashed writes' leftovers.

        The names removed are the bundles' and the blobs' (prune_all also counts leftovers).
        """
        return self.prune_all()[0]

    def prune_all(self) -> tuple[list[str], int]:
        """prune(): (the bundles' and blobs' names removed, how many leftovers were removed).

        Leftovers: staging of processes that are gone (or a day old), and temporary files of
        atomic JSON writes that never got renamed.
        """
        used = self._used_digests()
        removed = []
        for bundle in self._bundle_dirs():
            if bundle.name not in used:
                self._remove_bundle(bundle)
                removed.append(bundle.name)
        leftovers = self._remove_stale_staging() + self._remove_abandoned_temp_files()
        self._verified.forget_missing(self.bundles_dir)
        return removed + self._prune_blobs(), leftovers

    def verify(self, name: str | None = None) -> list[VerifyResult]:
        """Re-hash bundles (all, or the one `name` uses) and compare with their digests."""
        users: dict[str, list[str]] = {}
        for model in self.list():
            users.setdefault(model.digest, []).append(model.name)
        digests = [self.get(name).digest] if name else sorted(users)
        return [VerifyResult(d, users.get(d, []), self._bundle_problem(d)) for d in digests]

    def check(self, info: ModelInfo) -> None:
        """Refuse to load a bundle whose files do not match its digest (LibraryCorrupt).

        Files unchanged (size, mtime) since they last hashed right are trusted; the rest are
        hashed. The message names the model and the files, never a server path.
        """
        stamps = self._verified.stamps(info.digest)
        problem = self._bundle_problem(info.digest, stamps)
        if problem is not None:
            raise LibraryCorrupt(
                f'model "{info.name}" is damaged and will not be loaded: {problem}. '
                "`ortserve verify` checks the library; pull or create the model again"
            )
        self._verified.record(info.digest, stamps)

    # ---- internals -----------------------------------------------------------------------

    def adapter_files(self, info: ModelInfo) -> list[tuple[str, Path]]:
        """(name, .onnx_adapter blob path) of every adapter of a model, for the engine."""
        files = []
        for record in info.manifest.get("adapters") or []:
            if not isinstance(record, dict) or not record.get("digest"):
                raise InvalidRequest(
                    f"model {info.name} has an adapter without a digest: {record!r}"
                )
            files.append((str(record.get("name") or "adapter"), self.blob_path(record["digest"])))
        return files

    def _manifest_path(self, name: ModelName) -> Path:
        *folders, tag = name.key
        return self.manifests_dir.joinpath(*folders, f"{tag}.json")

    def _read_manifest(self, name: ModelName) -> dict[str, Any] | None:
        return _read_json(self._manifest_path(name))

    def _used_digests(self) -> set[str]:
        return {m.digest for m in self.list()}

    def _bundle_dirs(self) -> list[Path]:
        if not self.bundles_dir.is_dir():
            return []
        return [p for p in self.bundles_dir.iterdir() if p.is_dir()]

    def _remove_bundle_if_unused(self, digest: str) -> None:
        if digest not in self._used_digests():
            self._remove_bundle(self.bundle_path(digest))

    def _remove_bundle(self, bundle: Path) -> None:
        """A bundle and what was derived from it (its int8 weights, hard links to its data,
        its int8 KV cache scales)."""
        shutil.rmtree(bundle, ignore_errors=True)
        for kind in DERIVED_KINDS:
            shutil.rmtree(derived_folder(self.root, kind, bundle), ignore_errors=True)

    def _prune_blobs(self) -> list[str]:
        """Blobs no manifest's adapters[].digest names, and abandoned partial uploads."""
        if not self.blobs_dir.is_dir():
            return []
        used = {"sha256-" + str(a["digest"]).lower()[7:] for m in self.list()
                for a in m.manifest.get("adapters") or []
                if isinstance(a, dict) and a.get("digest")}  # fmt: skip
        removed = []
        for path in self.blobs_dir.iterdir():
            if path.name in used or time.time() - path.stat().st_mtime < _BLOB_GRACE_S:
                continue
            path.unlink(missing_ok=True)
            if not path.name.startswith(_PARTIAL_BLOB):
                removed.append(path.name)
        return removed

    def _remove_stale_staging(self) -> int:
        if not self.tmp_dir.is_dir():
            return 0
        stale = [entry for entry in self.tmp_dir.iterdir() if _staging_is_stale(entry)]
        for entry in stale:
            _remove(entry)
        return len(stale)

    def _remove_abandoned_temp_files(self) -> int:
        """`.<name>.json.<random>` files of atomic writes killed before their rename."""
        folders = [self.root, *(p for p in self.manifests_dir.rglob("*") if p.is_dir())]
        removed = 0
        for folder in (f for f in folders if f.is_dir()):
            for entry in folder.iterdir():
                if _is_temp_json(entry) and _age(entry) > _TEMP_FILE_GRACE_S:
                    entry.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _bundle_problem(
        self, digest: str, stamps: dict[str, list[int]] | None = None
    ) -> str | None:
        """What is wrong with a bundle, or None; files in `stamps` unchanged are not hashed."""
        path = self.bundle_path(digest)
        if not path.is_dir():
            return "bundle directory is missing"
        recorded = _read_index(path / INDEX_FILE)
        if recorded is None:
            return f"{INDEX_FILE} is missing or unreadable"
        if index_digest(recorded) != digest:
            return "file index does not match the bundle's digest"
        changed = _changed_files(path, recorded, stamps)
        if changed:
            return f"files differ from the index: {', '.join(changed[:5])}"
        return None


# ---- helpers (module level: also used by the converter and tests) -----------------------------


def derived_folder(root: Path | str, kind: str, bundle: Path | str) -> Path:
    """Where what the engine derives from `bundle` (a DERIVED_KINDS kind) is kept."""
    if kind not in DERIVED_KINDS:
        raise ValueError(f"unknown derived kind {kind!r}")
    return Path(root) / "cache" / kind / Path(bundle).name


def index_files(directory: Path) -> dict[str, Any]:
    """Path, size and sha256 of every file below `directory` except the index itself."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == INDEX_FILE:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": file_sha256(path)})
    return {"files": files}


def blob_hex(digest: str) -> str:
    """The hex of a blob digest `sha256:<64 hex>` (Ollama's form; `sha256-` is accepted too)."""
    match = _BLOB_DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise InvalidRequest(
            f"invalid digest {digest!r}: expected sha256:<64 hex digits>", param="digest"
        )
    return match.group(1).lower()


def index_digest(index: dict[str, Any]) -> str:
    canonical = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    return "sha256-" + hashlib.sha256(canonical).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_size(directory: Path) -> int:
    """Bytes of the bundle's files (the index is bookkeeping, not model)."""
    return sum(
        p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name != INDEX_FILE
    )


def _parse(name: str | ModelName) -> ModelName:
    if isinstance(name, ModelName):
        return name
    if not isinstance(name, str):
        raise InvalidName("model name must be a string", param="model")
    return ModelName.parse(name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LibraryCorrupt(f"cannot read {path}: {exc}") from exc


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    with atomic_file(path) as stream:
        stream.write(json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary stream to a temporary file beside `path`, flushed to disk and renamed over it
    when the block ends: a reader (or a crash) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# The JSON files of other stores under the library root (serving/batches.py) are read and
# written as the library's own.
read_json, write_json_atomic = _read_json, _write_json_atomic


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _staging_is_stale(entry: Path) -> bool:
    """A staging dir whose owner process is gone (or that is a day old) is garbage."""
    parts = entry.name.split("-")
    pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
    if pid is not None and pid != os.getpid() and not _pid_alive(pid):
        return True
    return time.time() - entry.stat().st_mtime > _STALE_STAGING_S


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would signal the process there; rely on age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _changed_files(
    directory: Path, recorded: dict[str, Any], stamps: dict[str, list[int]] | None
) -> list[str]:
    """Files missing, added, resized or re-hashing differently from the index.

    A file whose [size, mtime_ns] is in `stamps` is trusted unhashed; `stamps` (when given)
    is updated with every file that hashed right, and loses those that did not.
    """
    expected = {f["path"]: f for f in recorded["files"]}
    on_disk = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    on_disk.pop(INDEX_FILE, None)
    changed = set(expected.keys() ^ on_disk.keys())
    for rel in sorted(expected.keys() & on_disk.keys()):
        stat = on_disk[rel].stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        if (
            stamps is not None
            and stamps.get(rel) == stamp
            and stat.st_size == expected[rel]["size"]
        ):
            continue
        if (
            stat.st_size != expected[rel]["size"]
            or file_sha256(on_disk[rel]) != expected[rel]["sha256"]
        ):
            changed.add(rel)
            if stamps is not None:
                stamps.pop(rel, None)
        elif stamps is not None:
            stamps[rel] = stamp
    return sorted(changed)


def _stamps(directory: Path, index: dict[str, Any]) -> dict[str, list[int]]:
    """[size, mtime_ns] of every indexed file as it is now."""
    stamps = {}
    for entry in index["files"]:
        stat = (directory / entry["path"]).stat()
        stamps[entry["path"]] = [stat.st_size, stat.st_mtime_ns]
    return stamps


class _VerifiedFiles:
    """verified.json: bundle digest -> {file: [size, mtime_ns]} of files that hashed right.

    Kept in memory and written through (best effort: a read-only library still works, its
    loads just hash again). Several processes may share the file: each write merges what is
    on disk, and a lost entry only costs one more hash.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, list[int]]] | None = None

    def stamps(self, digest: str) -> dict[str, list[int]]:
        """A copy of what is known of `digest`'s files (the caller updates it, then records)."""
        with self._lock:
            return dict(self._load().get(digest, {}))

    def record(self, digest: str, stamps: dict[str, list[int]]) -> None:
        with self._lock:
            data = self._load()
            if data.get(digest) == stamps:
                return
            data[digest] = stamps
            self._write()

    def forget_missing(self, bundles_dir: Path) -> None:
        """Drop the entries of bundles that are gone (prune)."""
        with self._lock:
            data = {**_read_verified(self.path), **self._load()}
            kept = {d: v for d, v in data.items() if (bundles_dir / d).is_dir()}
            if kept != data:
                self._data = kept
                self._write(merge=False)

    def _load(self) -> dict[str, dict[str, list[int]]]:
        if self._data is None:
            self._data = _read_verified(self.path)
        return self._data

    def _write(self, *, merge: bool = True) -> None:
        assert self._data is not None
        merged = {**_read_verified(self.path), **self._data} if merge else self._data
        try:
            _write_json_atomic(self.path, merged)
        except OSError:
            return  # a read-only library: remembered in memory only
        self._data = merged


def _read_verified(path: Path) -> dict[str, dict[str, list[int]]]:
    """verified.json's entries; an unreadable or malformed file is an empty one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def _read_index(path: Path) -> dict[str, Any] | None:
    """A bundle's file index, or None when it is missing or not JSON."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("files"), list) else None


def _is_temp_json(entry: Path) -> bool:
    """`.latest.json.k2j3h4`: what _write_json_atomic writes before its rename."""
    return entry.is_file() and entry.name.startswith(".") and ".json." in entry.name


def _age(entry: Path) -> float:
    try:
        return time.time() - entry.stat().st_mtime
    except OSError:
        return 0.0


def _remove(entry: Path) -> None:
    """A leftover directory or file, whichever it is."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
