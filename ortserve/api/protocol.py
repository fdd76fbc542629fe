"""What a protocol declares about itself, and the registry that app, security and openapi read.

Each protocol module of this package (native, openai, responses, anthropic, embeddings, ...)
exports ONE `PROTOCOL`: its blueprint, the paths whose errors it shapes and its error body,
how a stream of it ends in an error, the paths that generate (admission), the headers and
query parameters that may carry an API key, the CORS headers its clients send, and its
OpenAPI rows. `protocols()` finds them by scanning the package, so adding a protocol is
adding its module: api/app.py, api/security.py, api/openapi.py and cluster/errors.py loop
over the registry and name no protocol.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Blueprint

from ortserve.errors import OrtServeError

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
REF = "#/components/schemas/"

# ---- OpenAPI rows ------------------------------------------------------------------------------

# Errors any route can answer: Host or Origin refused, key missing, the unexpected.
GUARDED = (401, 403, 500)
JSON_BODY = (*GUARDED, 400, 413, 415)
MODEL = (*JSON_BODY, 404)
GENERATION = (*MODEL, 422, 503)  # 422: structured output or tool calls that did not validate


@dataclass(frozen=True)
class Route:
    """One operation: where, what it does, the request schema it validates, what it answers."""

    method: str
    path: str  # OpenAPI's form: /v1/models/{model}
    summary: str
    request: str | None  # schemas/<request>.json: the JSON body; None: no JSON body
    responses: Mapping[str, Any]  # success responses
    errors: tuple[int, ...] = GUARDED
    parameters: tuple[dict[str, Any], ...] = field(default=())
    form: Mapping[str, Any] | None = None  # a multipart/form-data body's schema


def form_body(required: tuple[str, ...], **fields: Any) -> dict[str, Any]:
    """A multipart/form-data body: `fields` by name (a file is {"type": "string", "format":
    "binary"}), `required` of them."""
    return {"type": "object", "properties": fields, "required": list(required)}


FILE = {"type": "string", "format": "binary"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def json_body(schema: str, description: str = "OK", status: int = 200) -> dict[str, Any]:
    return {str(status): {"description": description,
                          "content": {"application/json": {"schema": ref(schema)}}}}  # fmt: skip


def ndjson_or_json(schema: str) -> dict[str, Any]:
    """Ollama's streams: NDJSON lines unless `stream` is false, then one JSON body."""
    content = {"application/json": {"schema": ref(schema)}, NDJSON: {"schema": ref("StreamLine")}}
    return {"200": {"description": "NDJSON lines as they come, or one body with stream false",
                    "content": content}}  # fmt: skip


def sse_or_json(schema: str) -> dict[str, Any]:
    """OpenAI's streams: server-sent events with `stream` true, else one JSON body."""
    content = {
        "application/json": {"schema": ref(schema)},
        SSE: {"schema": ref("ServerSentEvent")},
    }
    return {"200": {"description": "One body, or server-sent events with stream true",
                    "content": content}}  # fmt: skip


def empty(**statuses: str) -> dict[str, Any]:
    """Bodyless answers: empty(s200="deleted") -> {"200": {"description": "deleted"}}."""
    return {key.removeprefix("s"): {"description": text} for key, text in statuses.items()}


def text(media_type: str, description: str) -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {media_type: {"schema": {"type": "string"}}}}}  # fmt: skip


def path_parameter(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", **schema}}  # fmt: skip


def query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


MODEL_PARAMETER = {**path_parameter("model", "a model name, [namespace/]model[:tag]"),
                   "schema": {"$ref": REF + "common/$defs/model_name"}}  # fmt: skip

# ---- the descriptor ----------------------------------------------------------------------------

# (status, message, type, param, code) -> the protocol's JSON error body
ErrorBody = Callable[[int, str, str, "str | None", "str | None"], dict[str, Any]]


@dataclass(frozen=True)
class Protocol:
    """Everything the app, its guards, its document and the cluster's router need of a protocol.

    Paths in `owns` and `generation_paths` are relative to the mount prefix. An entry is a
    root ("/v1/messages": it and every path below it) or, with a `*`, an fnmatch pattern
    ("/v1/models/*:generateContent"). The most specific owner of a path shapes its errors.
    """

    name: str
    blueprint: Blueprint
    rank: int = 50  # the order of blueprints and of the OpenAPI document's rows
    owns: tuple[str, ...] = ()
    error_body: ErrorBody | None = None  # None: a protocol that owns no paths
    error_schema: str | None = None  # the OpenAPI component of error_body's shape
    stream_error: Callable[[OrtServeError], str] | None = None  # a failed SSE stream's end
    generation_paths: tuple[str, ...] = ()  # POSTs that hold a generation slot (admission)
    key_headers: tuple[str, ...] = ()  # headers carrying a bare API key (besides x-api-key)
    key_params: tuple[str, ...] = ()  # query parameters carrying one, on its own paths only
    cors_headers: tuple[str, ...] = ()  # request headers its browser clients send
    # Pages and their assets, answered without an API key (a browser loads them with no
    # headers of its own); the Host and Origin guards still apply. Roots, as in `owns`.
    open_paths: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    schemas: Mapping[str, Any] = field(default_factory=dict)  # its OpenAPI response schemas
    note: str = ""  # its sentence in the OpenAPI document's description

    def claim(self, path: str) -> int:
        """How specifically this protocol owns `path`: 0 not at all, more is more specific."""
        return max((_claim(entry, path) for entry in self.owns), default=0)

    def generates(self, path: str) -> bool:
        """Whether `path` is one of its generation paths (exact, or an fnmatch pattern)."""
        return any(fnmatch.fnmatchcase(path, entry) if "*" in entry else path == entry
                   for entry in self.generation_paths)  # fmt: skip


def _claim(entry: str, path: str) -> int:
    if "*" in entry:  # a pattern names its paths exactly: it beats any root
        return 10_000 + len(entry) if fnmatch.fnmatchcase(path, entry) else 0
    root = entry.rstrip("/")
    return len(root) + 1 if path == root or path.startswith(root + "/") else 0


@functools.cache
def protocols() -> tuple[Protocol, ...]:
    """Every protocol of this package, in rank order: the modules that export a PROTOCOL.

    Found by scanning (imported at the first call, by then the app is importable), so that
    a new protocol is its own module and nothing else.
    """
    found = []
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name.startswith("_") or module.name in _NOT_PROTOCOLS:
            continue
        described = getattr(importlib.import_module(f"{__package__}.{module.name}"), "PROTOCOL",
                            None)  # fmt: skip
        if isinstance(described, Protocol):
            found.append(described)
    return tuple(sorted(found, key=lambda p: (p.rank, p.name)))


# Modules of the package that are machinery, not protocols (importing them here is pointless).
_NOT_PROTOCOLS = frozenset({"app", "protocol", "security", "observe", "openapi", "state"})


def owner(path: str) -> Protocol | None:
    """The protocol that shapes the errors of `path` (mount prefix removed), if any."""
    best, claim = None, 0
    for protocol in protocols():
        mine = protocol.claim(path)
        if mine > claim:
            best, claim = protocol, mine
    return best


def ollama_error(status: int, message: str, type_: str, param=None, code=None) -> dict[str, Any]:
    """Ollama's `{"error": message}`: the body of every path no protocol owns."""
    return {"error": message}


def error_body(path: str, status: int, message: str, type_: str, param=None, code=None) -> dict:
    """The error body of `path`, in the shape of the protocol that owns it."""
    protocol = owner(path)
    build = protocol.error_body if protocol is not None and protocol.error_body else ollama_error
    return build(status, message, type_, param, code)


def generates(path: str) -> bool:
    """Whether a POST to `path` generates (holds a generation slot while it runs)."""
    return any(protocol.generates(path) for protocol in protocols())


def is_open(path: str) -> bool:
    """Whether `path` is one of a protocol's open paths: answered without an API key."""
    return any(_claim(entry, path) for protocol in protocols() for entry in protocol.open_paths)


def key_headers() -> tuple[str, ...]:
    return tuple(h for protocol in protocols() for h in protocol.key_headers)


def cors_headers() -> tuple[str, ...]:
    return tuple(h for protocol in protocols() for h in protocol.cors_headers)
