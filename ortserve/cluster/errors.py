"""The errors the cluster's router answers itself, in the shape of the request's protocol.

Requests the replicas answer carry the app's own errors; these are the router's: no replica
could take the request (a 503 before any output), or the replica died mid-stream (the
stream's last event, as each protocol ends a stream that failed).
"""

from __future__ import annotations

import json
from typing import Any

from ortserve.api import protocol
from ortserve.api.streaming import ndjson_line, sse_event
from ortserve.errors import OrtServeError


def error_body(path: str, exc: OrtServeError) -> dict[str, Any]:
    """The error body of the protocol that owns `path` (api/protocol.py), Ollama's elsewhere."""
    return protocol.error_body(path, exc.status, exc.message, exc.type, exc.param, exc.code)


def error_response(path: str, exc: OrtServeError):
    """A whole error response (starlette: the router runs on Ray Serve's ASGI side)."""
    from starlette.responses import Response

    headers = {}
    if getattr(exc, "retry_after", None) is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return Response(json.dumps(error_body(path, exc)) + "\n", status_code=exc.status,
                    media_type="application/json", headers=headers)  # fmt: skip


def stream_error(path: str, content_type: str, exc: OrtServeError) -> str:
    """The last event of a stream that failed, as the protocol's own streams end one."""
    if content_type.startswith("application/x-ndjson"):
        return ndjson_line({"error": exc.message})
    if not content_type.startswith("text/event-stream"):
        return ""  # a whole JSON body cut short: the client sees it incomplete
    owner = protocol.owner(path)
    if owner is not None and owner.stream_error is not None:
        return owner.stream_error(exc)
    return sse_event(error_body(path, exc), event="error")
