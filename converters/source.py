"""Resolve a conversion source to a local checkpoint directory (downloading if needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ortserve.errors import SourceUnavailable, UnsupportedModel

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# What a conversion needs from a repository: configs, tokenizer, template, weights, licence.
_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.safetensors",
    "1_Pooling/*",
    "LICENSE*",
    "README.md",
]
_PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


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


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = _PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as exc:
        raise SourceUnavailable(
            f"cannot download {repo_id!r} from Hugging Face: no network connection and no "
            "cached copy. Convert a local checkpoint directory instead, or set HF_ENDPOINT"
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise SourceUnavailable(
            f"Hugging Face repository {repo_id!r} not found or not accessible (set HF_TOKEN "
            "for gated or private repositories)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise SourceUnavailable(f"revision {revision!r} of {repo_id!r} not found") from exc
    except OSError as exc:
        raise SourceUnavailable(f"cannot download {repo_id!r} from Hugging Face: {exc}") from exc
    path = Path(path)
    return ResolvedSource(path, repo_id, path.name)  # snapshot folders are named by commit
