"""Model names: `[host/][namespace/]model[:tag]`, validated so no name can leave the library;
and the two other things a pull reference can be: a Hugging Face repository id, or a bare
`model[:tag]` that the catalog of short names resolves."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ortserve.errors import InvalidName

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama's rules (types/model/name.go): parts start with a letter or digit, tags may start
# with an underscore. No part may be "." or "..", so a name can never climb out of a folder.
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_FORBIDDEN = ("\\", "\0", "..")
# A Hugging Face repository id, ORG/REPO, by the hub's rules (huggingface_hub's
# validate_repo_id): at most 96 characters a part, ASCII letters, digits, '_', '.', '-', each
# part starting with a letter or digit and not ending in '.' or '-'; no '--', '..' or '.git' end.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"^(?!.*(?:--|\.\.))(?!.*\.git$){_REPO_PART}/{_REPO_PART}$")


@dataclass(frozen=True)
class ModelName:
    """A parsed, validated model name."""

    model: str
    namespace: str = DEFAULT_NAMESPACE
    tag: str = DEFAULT_TAG
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse `[host/][namespace/]model[:tag]`; raise InvalidName saying what is wrong."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidName("model name is empty", param="model")
        text = text.strip()
        _reject_unsafe(text)
        path, tag = _split_tag(text)
        parts = path.split("/")
        if len(parts) > 3:
            raise InvalidName(
                f"invalid model name {text!r}: use [namespace/]model[:tag]", param="model"
            )
        for part in parts:
            _check_part(text, part)
        host = parts[0] if len(parts) == 3 else None
        namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        return cls(model=parts[-1], namespace=namespace, tag=tag, host=host)

    def __str__(self) -> str:
        return self.display

    @property
    def display(self) -> str:
        """The name as Ollama prints it: the default namespace is left out."""
        prefix = [p for p in (self.host, self.namespace) if p]
        if prefix == [DEFAULT_NAMESPACE]:
            prefix = []
        return "/".join([*prefix, self.model]) + f":{self.tag}"

    @property
    def key(self) -> tuple[str, ...]:
        """Case-insensitive identity, as Ollama compares names; also the storage path parts."""
        parts = [p for p in (self.host, self.namespace, self.model, self.tag) if p]
        return tuple(p.lower() for p in parts)


def bare_name(text: str) -> ModelName | None:
    """`model[:tag]` alone (no namespace, no host), as Ollama's library and ortserve's catalog
    name models (`llama3.2`, `qwen2.5:0.5b`); None for anything else."""
    if not isinstance(text, str) or "/" in text or not text.strip():
        return None
    try:
        return ModelName.parse(text)
    except InvalidName:
        return None


def _reject_unsafe(text: str) -> None:
    for bad in _FORBIDDEN:
        if bad in text:
            what = {"\\": "a backslash", "\0": "a NUL byte", "..": "'..'"}[bad]
            raise InvalidName(f"invalid model name {text!r}: it contains {what}", param="model")
    if text.startswith("/") or re.match(r"^[A-Za-z]:[/\\]", text):
        raise InvalidName(
            f"invalid model name {text!r}: it must not be an absolute path", param="model"
        )


def _split_tag(text: str) -> tuple[str, str]:
    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, DEFAULT_TAG
    if not _TAG.match(tag):
        raise InvalidName(
            f"invalid tag {tag!r} in {text!r}: letters, digits, '_', '.', '-' only", param="model"
        )
    return path, tag


def _check_part(text: str, part: str) -> None:
    if not part:
        raise InvalidName(f"invalid model name {text!r}: it has an empty part", param="model")
    if not _PART.match(part):
        raise InvalidName(
            f"invalid model name {text!r}: {part!r} must start with a letter or digit and use "
            "only letters, digits, '_', '.', '-' (at most 80)",
            param="model",
        )
