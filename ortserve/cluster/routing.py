"""What the cluster's router reads from a request before Ray Serve picks a replica.

Ray Serve's model multiplexing routes a request to a replica that holds its model, and its
prefix-aware router a conversation to the replica that served its earlier turns (whose KV
cache holds them). Its HTTP proxy reads no body, so the router (deployments.py) reads it
once, and here it becomes the two things Ray routes on: the model id and the prompt text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ortserve.errors import InvalidName
from ortserve.library.names import ModelName

# The requests that run a model: these route to a replica holding it. Library requests
# (show, pull, create, delete, copy) name a model too, but load nothing.
MODEL_PATHS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages", "/v1/messages/count_tokens",
})  # fmt: skip
# The prompt's head is enough to tell conversations apart, and bounds the prefix tree's work.
PROMPT_CHARS = 16_384


@dataclass(frozen=True)
class Prompt:
    """The text Ray's PrefixCacheAffinityRouter matches on (it reads a `prompt` attribute)."""

    prompt: str


@dataclass(frozen=True)
class Route:
    model: str  # the multiplexed model id; "" for none
    prompt: Prompt


def route(method: str, path: str, body: bytes) -> Route:
    """What a request routes on. A request with no conversation gets a text of its own, so
    it matches none and goes where the prefix tree holds least (Ray's fallback)."""
    fields = _json(body) if method == "POST" and path in MODEL_PATHS else None
    text = conversation_text(fields)[:PROMPT_CHARS] if fields else ""
    return Route(model_id(fields), Prompt(text or uuid.uuid4().hex))


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        fields = json.loads(body) if body else None
    except ValueError:  # not JSON: any replica answers the 400
        return None
    return fields if isinstance(fields, dict) else None


def model_id(fields: dict[str, Any] | None) -> str:
    """The model's canonical name: spellings of one model ("qwen", "library/qwen:latest",
    "QWEN") give one id, so they share a replica. None valid: "" (any replica's 400)."""
    name = (fields or {}).get("model")
    if not isinstance(name, str):
        return ""
    try:
        return model_key(name)
    except InvalidName:
        return ""


def model_key(name: str) -> str:
    return "/".join(ModelName.parse(name).key)


def model_name(model: str) -> str:
    """The library's name for a model id (model_key's inverse)."""
    *path, tag = model.split("/")
    return "/".join(path) + ":" + tag


def conversation_text(fields: dict[str, Any]) -> str:
    """The conversation as text, oldest first, in any protocol: system, then the messages
    (chat, Anthropic), the input (Responses) or the prompt (generate, completions)."""
    parts = [_text(fields.get("system")), _text(fields.get("instructions"))]
    for key in ("messages", "input", "prompt"):
        parts.append(_text(fields.get(key)))
    return "".join(parts)


def _text(value: Any, depth: int = 0) -> str:
    """Text in a message, a content list or a part; depth-bounded (the body is the client's)."""
    if depth > 4 or value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(item, depth + 1) for item in value)
    if isinstance(value, dict):
        for key in ("content", "text"):
            if key in value:
                return _text(value[key], depth + 1)
    return ""
