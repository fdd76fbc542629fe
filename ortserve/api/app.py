"""The Flask application: blueprints, the runtime they share, and errors mapped to JSON."""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Flask, current_app, request
from werkzeug.exceptions import HTTPException

from ortserve import metrics
from ortserve.api.observe import install as install_observe
from ortserve.api.protocol import error_body, owner, protocols
from ortserve.api.security import install as install_security
from ortserve.api.state import EXTENSION, ServerState
from ortserve.api.streaming import json_response
from ortserve.api.validation import MAX_BODY_BYTES
from ortserve.config import Settings
from ortserve.errors import OrtServeError

log = logging.getLogger("ortserve.api")


def create_app(settings: Settings | None = None, *, runtime: Any = None) -> Flask:
    """The ortserve application (gunicorn 'ortserve.api:create_app()')."""
    app = Flask("ortserve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    state = init_app(app, settings=settings, runtime=runtime)
    state.owns_app = True  # every error on this app is answered in ortserve's shapes
    return app


def init_app(
    app: Flask, settings: Settings | None = None, runtime: Any = None, *, url_prefix: str = ""
) -> ServerState:
    """Mount ortserve's blueprints and error handlers into `app` (yours or create_app's)."""
    from ortserve.api.batch import start_runner
    from ortserve.engine.install import check_flavours

    check_flavours()  # two onnxruntime-genai flavours: stop now, naming the fix
    state = ServerState(settings or Settings.from_env(), runtime, url_prefix=url_prefix)
    app.extensions[EXTENSION] = state
    for protocol in protocols():  # each protocol module's PROTOCOL (api/protocol.py)
        app.register_blueprint(protocol.blueprint, url_prefix=url_prefix or None)
    register_error_handlers(app)
    install_security(app, _is_ours)
    install_observe(app, _is_ours)
    state.start_preload()  # ORTSERVE_PRELOAD: in the background; /readyz waits for it
    start_runner(app, state, only_if_pending=True)  # a restarted server resumes its batches
    return state


# ---- errors: the one place they become HTTP responses ------------------------------------------


def register_error_handlers(app: Flask) -> None:
    """JSON errors on ortserve's requests; a host app's other requests keep its own handlers."""
    for error_class in (OrtServeError, HTTPException, Exception):
        previous = app.error_handler_spec[None][None].get(error_class)
        if getattr(previous, "ortserve", False):
            previous = None  # init_app called twice: do not chain to ourselves
        handler = functools.partial(_handle_error, previous=previous)
        handler.ortserve = True  # type: ignore[attr-defined]
        app.register_error_handler(error_class, handler)


def _handle_error(error: Exception, previous=None):
    if not _is_ours():
        if previous is not None:
            return previous(error)
        if isinstance(error, HTTPException):
            return error  # Flask's default page
        raise error  # Flask's default 500 handling, as if we were not here
    if isinstance(error, OrtServeError):
        metrics.ERRORS.labels(error.type).inc()
        response = error_response(error.status, error.message, error.type, error.param, error.code)
        if getattr(error, "retry_after", None) is not None:  # ServerBusy: when to come back
            response.headers["Retry-After"] = str(error.retry_after)
        return response
    if isinstance(error, HTTPException):
        response = error_response(error.code or 500, _http_message(error), _http_type(error))
        if getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response
    metrics.ERRORS.labels("server_error").inc()
    log.exception("unexpected error in %s %s", request.method, request.path)
    return error_response(500, "internal error", "server_error")


def error_response(status: int, message: str, type_: str, param=None, code=None):
    """The error in the shape of the protocol that owns the path (api/protocol.py): Ollama's
    `{"error": msg}` where none does."""
    return json_response(error_body(_route_path(), status, message, type_, param, code), status)


def _is_ours() -> bool:
    state = current_app.extensions.get(EXTENSION)
    if not isinstance(state, ServerState) or state.owns_app:
        return True
    if request.blueprint in {protocol.blueprint.name for protocol in protocols()}:
        return True
    path = request.path
    return path.startswith(state.url_prefix) and owner(_route_path()) is not None


def _route_path() -> str:
    """The request's path after the mount prefix."""
    state = current_app.extensions.get(EXTENSION)
    prefix = state.url_prefix if isinstance(state, ServerState) else ""
    path = request.path
    return path[len(prefix) :] if prefix and path.startswith(prefix) else path


def _http_message(error: HTTPException) -> str:
    if error.code == 404:
        return "404 page not found"  # what Ollama (gin) says for an unknown path
    if error.code == 405:
        return f"405 method not allowed: {request.method} {request.path}"
    if error.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH") or MAX_BODY_BYTES
        size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit} bytes"
        return f"request body too large (the limit is {size})"
    return f"{error.code} {(error.name or '').lower()}: {error.description}"


def _http_type(error: HTTPException) -> str:
    return {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
        error.code or 500, "api_error"
    )
