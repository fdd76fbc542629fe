"""Resolve a conversion source to a local checkpoint directory (downloading if needed)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ortserve.errors import UnsupportedModel
from ortserve.hub import CHECKPOINT_PATTERNS, PICKLE_PATTERNS, hub_errors

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ResolvedSource:
    path: Path
    source: str
    revision: str | None  # the commit downloaded, for repositories


def resolve_source(source: str, *, revision: str | None = None, allow_pickle: bool = False):
    """A local directory as is; otherwise a Hugging Face repo id, downloaded."""
    local = Path(source).expanduser()
    if local.is_dir():
        return ResolvedSource(local.resolve(), str(local.resolve()), None)
    if _looks_like_path(source) or not _REPO_ID.match(source):
        raise UnsupportedModel(f"checkpoint directory {source!r} does not exist")
    return _download(source, revision, allow_pickle)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def is_repo_id(source: str) -> bool:
    """Whether `source` (not an existing directory) names a Hugging Face repository."""
    return not _looks_like_path(source) and bool(_REPO_ID.match(source))


def default_name(source: str) -> str:
    """The library name a source gets when none is given: its last path part, cleaned."""
    base = Path(source.rstrip("/\\")).name.lower()
    return re.sub(r"[^a-z0-9_.-]", "-", base).strip("-_.") or "model"


def fingerprint(path: Path) -> str:
    """A cheap identity of a local checkpoint: each file's relative path, size and mtime.

    A local directory has no commit; this tells a re-run whether the checkpoint changed
    without re-hashing gigabytes of weights. Dot-folders (.git, .cache) are left out.
    """
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        stat = file.stat()
        digest.update(f"{relative.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "sha256-" + digest.hexdigest()


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> ResolvedSource:
    from huggingface_hub import snapshot_download

    patterns = CHECKPOINT_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    with hub_errors(f"cannot download {repo_id!r} from Hugging Face", revision=revision):
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    return ResolvedSource(path, repo_id, path.name)  # snapshot folders are named by commit
