"""/api/create and /api/blobs: models made from a base and Ollama's create fields."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request

from ortserve.api.protocol import (
    GUARDED,
    MODEL,
    Protocol,
    Route,
    empty,
    ndjson_or_json,
    path_parameter,
)
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response, ndjson_line, stream_response
from ortserve.api.validation import MAX_BLOB_BYTES, read_json, validate
from ortserve.errors import InvalidRequest, OrtServeError
from ortserve.library import Library
from ortserve.library.modelfile import ModelSpec
from ortserve.library.store import blob_hex
from ortserve.models.create import CreatePlan, prepare_create, safe_filename

log = logging.getLogger("ortserve.api")

create_bp = Blueprint("create", __name__)

# Older Ollama clients sent a Modelfile's text; its paths would name files on the server.
_REFUSED = {
    "modelfile": "send the Modelfile's values as fields (from, system, parameters, ...), as "
    "current Ollama clients do",
    "path": "upload files with POST /api/blobs/:digest and name them in files",
}


@create_bp.route("/api/blobs/<digest>", methods=["HEAD"])
def blob_exists(digest: str):
    blob_hex(digest)  # 400 for a malformed digest
    return Response(status=200 if current_state().library.has_blob(digest) else 404)


@create_bp.post("/api/blobs/<digest>")
def upload_blob(digest: str):
    """The raw body, streamed to disk while hashed; kept only if its sha256 is `digest`."""
    blob_hex(digest)
    library = current_state().library
    if library.has_blob(digest):
        return Response(status=200)  # as Ollama: already there, the body is not needed
    request.max_content_length = MAX_BLOB_BYTES  # weights: far above the JSON body limit
    library.add_blob(request.stream, digest)
    return Response(status=201)


@create_bp.post("/api/create")
def create():
    """Ollama's create: checked up front (400/404), then status lines as the work goes."""
    body = read_json()
    if "model" not in body and "name" in body:  # older clients say name
        body["model"] = body.pop("name")
    for field, hint in _REFUSED.items():
        if body.get(field):
            raise InvalidRequest(f'"{field}" is not supported: {hint}', param=field)
    body = validate("create", body)
    state = current_state()
    plan = prepare_create(
        state.library, body["model"], spec_from_body(body, state.library),
        quantize=body.get("quantize"),
    )  # fmt: skip
    if not body.get("stream", True):
        _run(plan, state, lambda _status: None)
        return json_response({"status": "success"})
    return stream_response(_status_lines(plan, state))


def spec_from_body(body: dict[str, Any], library: Library) -> ModelSpec:
    """A ModelSpec from /api/create's fields (never server paths: `from` names a model)."""
    license_ = body.get("license")
    return ModelSpec(
        from_=body.get("from"),
        parameters=dict(body.get("parameters") or {}),
        template=body.get("template"),
        system=body.get("system"),
        adapters=_adapter_sources(body.get("adapters") or {}, library),
        messages=body.get("messages"),
        license=[license_] if isinstance(license_, str) else list(license_ or []),
        files=dict(body.get("files") or {}),
        draft=body.get("draft"),
    )


def _adapter_sources(adapters: dict[str, str], library: Library) -> list:
    sources = []
    for filename, digest in adapters.items():
        safe_filename(filename, "adapters")
        if not library.has_blob(digest):
            raise InvalidRequest(
                f"adapters: blob {digest} for {filename} is not on the server", param="adapters"
            )
        sources.append((filename, library.blob_path(digest)))
    return sources


def _run(plan: CreatePlan, state, progress) -> None:
    info = plan.run(progress)
    runtime = state.started_runtime
    if runtime is not None:
        # The runtime reloads a model whose bundle changed, not one whose system prompt or
        # parameters did: unload it so the next request sees the new manifest.
        runtime.unload(info.name)


def _status_lines(plan: CreatePlan, state) -> Iterator[str]:
    """The create runs in a thread; its status lines stream as they come."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            _run(plan, state, events.put)
        except OrtServeError as exc:
            events.put(exc)
        except Exception:
            log.exception("create of %s failed", plan.name.display)
            events.put(OrtServeError("internal error"))
        finally:
            events.put(None)

    # Not a daemon: a client that leaves does not cancel a create half-way (as in Ollama).
    threading.Thread(target=work, name=f"create {plan.name.display}").start()
    while (event := events.get()) is not None:
        if isinstance(event, OrtServeError):
            yield ndjson_line({"error": event.message})
        else:
            yield ndjson_line({"status": event})


_DIGEST = path_parameter("digest", "the file's sha256", pattern="^sha256[:-][0-9a-fA-F]{64}$")

PROTOCOL = Protocol("create", create_bp, rank=14, routes=(
    Route("POST", "/api/create", "Make a model from a base and Ollama's create fields", "create",
          ndjson_or_json("Status"), (*MODEL, 501)),
    Route("HEAD", "/api/blobs/{digest}", "Whether the server has an uploaded file", None,
          empty(s200="present", s404="absent"), (*GUARDED, 400), (_DIGEST,)),
    Route("POST", "/api/blobs/{digest}", "Upload a file for /api/create", None,
          empty(s200="already present", s201="stored"), (*GUARDED, 400, 413), (_DIGEST,)),
))  # fmt: skip
