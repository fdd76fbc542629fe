"""Request bodies: read within a size limit, parse as JSON, check against a JSON Schema."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flask import request
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.exceptions import RequestEntityTooLarge

from ortserve.config import parse_keep_alive
from ortserve.errors import InvalidRequest
from ortserve.options import options_schema, sampling_schema


class UnsupportedMediaType(InvalidRequest):
    status = 415


SCHEMA_DIR = Path(__file__).parent / "schemas"
MAX_BODY_BYTES = 32 * 1024 * 1024
# JSON nesting a request may have: real bodies (messages, tools, schemas) stay far below.
MAX_JSON_DEPTH = 64
# Uploaded blobs (POST /api/blobs) are model weights: streamed to disk, never held whole.
MAX_BLOB_BYTES = 1 << 40
_READ_CHUNK = 1 << 20


@functools.lru_cache(maxsize=1)
def request_schemas() -> dict[str, dict[str, Any]]:
    """Every request schema by name: schemas/<name>.json, and the two generated from the
    option tables (options.json, sampling.json: the limits are written once, in options.py).
    """
    schemas = {"options": options_schema(), "sampling": sampling_schema()}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schemas[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return schemas


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    """Every request schema, addressable by its $id (they refer to each other)."""
    resources = []
    for schema in request_schemas().values():
        # Without its $schema, a schema reached through a $ref is validated by the strict
        # validator that followed the ref: with it, jsonschema switches to the stock class
        # of that dialect, and a body's "options": {"num_predict": 90.0} passed as an integer.
        contents = {k: v for k, v in schema.items() if k != "$schema"}
        resources.append((contents["$id"], Resource(contents, specification=DRAFT202012)))
    return Registry().with_resources(resources)


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """The validator of schemas/<name>.json."""
    schema = _registry().contents(f"{name}.json")
    return _StrictValidator(schema, registry=_registry())


def _whole_number(checker, instance: Any) -> bool:
    """JSON Schema's "integer" admits 2.0; the code behind these fields wants an int (as
    Ollama's Go structs do, which refuse 2.0 for an int): only real integers pass."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _whole_number),
)


def read_json(limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object; 413 over `limit`, 400 when it is not JSON."""
    _check_content_type()
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge(f"request body is larger than {limit} bytes")
    raw = read_body(limit)
    if not raw.strip():
        raise InvalidRequest("missing request body")
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise InvalidRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("invalid JSON body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_json_values(body)
    return body


def read_body(limit: int) -> bytes:
    """The whole body, at most `limit` bytes: 413 beyond, chunked bodies included.

    A chunked body has no Content-Length, and werkzeug's stream stops at the limit as if
    the body ended there (it was cut and parsed): read the server's own stream, which ends
    where the body does, until it ends or passes the limit.
    """
    chunked = request.content_length is None and request.environ.get("wsgi.input_terminated")
    stream = request.environ["wsgi.input"] if chunked else request.stream
    parts, size = [], 0
    while size <= limit:
        part = _read_part(stream, min(_READ_CHUNK, limit + 1 - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    if size > limit:
        raise RequestEntityTooLarge(f"request body is larger than {limit} bytes")
    return b"".join(parts)


def _read_part(stream: Any, size: int) -> bytes:
    """One read of the body; a client that stalls, leaves or breaks the framing is a 400."""
    try:
        return stream.read(size)
    except RequestEntityTooLarge:
        raise
    # ClientDisconnected is werkzeug's word for a failed read; OSError a read timeout or a
    # reset; anything else the server's own framing errors (a malformed chunk).
    except Exception:
        raise InvalidRequest(
            "the request body could not be read: it stopped arriving (see ORTSERVE_READ_TIMEOUT), "
            "ended early or had broken chunked framing"
        ) from None


def check_json_values(body: Any) -> None:
    """400 for JSON nested past MAX_JSON_DEPTH or a string with a lone surrogate ("\ud800").

    Both parse, and both break later: deep nesting overflows the recursion of the schema
    checks; a lone surrogate cannot be encoded (tokenizer, manifest, response).
    """
    pending: list[tuple[Any, list[str | int], int]] = [(body, [], 1)]
    while pending:  # iterative: a deep value must not overflow this check either
        value, path, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels at "
                                 f"{field_path(path) or 'the top'}")  # fmt: skip
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                pending.append((item, [*path, key], depth + 1))
        elif isinstance(value, list):
            pending.extend((item, [*path, i], depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: list[str | int]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = field_path(path) or "the body"
        raise InvalidRequest(
            f"{where}: text holds a lone UTF-16 surrogate, which is not a character",
            param=field_path(path) or None,
        ) from None


def _check_content_type() -> None:
    """JSON endpoints take JSON: a body declared as another type is refused (415).

    Not declared, and curl -d's default form type without an Origin (curl, scripts), are
    read as JSON, as Ollama does; a browser's "simple" cross-site POST (text/plain, a form,
    multipart) always carries an Origin and is refused.
    """
    declared = (request.mimetype or "").lower()
    if not declared or declared == "application/json" or declared.endswith("+json"):
        return
    if declared == "application/x-www-form-urlencoded" and "Origin" not in request.headers:
        return
    raise UnsupportedMediaType(
        f"Content-Type {declared!r} is not accepted here: send application/json",
        param="Content-Type",
    )


def validate(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with JSON nulls dropped, checked against schemas/<name>.json.

    A subschema marked `"x-checked-by-code": true` states for the published document what the
    code behind the route enforces itself, with a better message (a model name as the library
    parses it, "images" is not supported yet): its failures are left to that code.
    """
    body = _normalise(body)
    errors = (e for e in validator(name).iter_errors(body) if not e.schema.get(CHECKED_BY_CODE))
    error = best_match(errors)
    if error is not None:
        raise schema_error(error)
    return body


CHECKED_BY_CODE = "x-checked-by-code"


def parsed_body(name: str) -> dict[str, Any]:
    """The request's JSON body checked against schemas/<name>.json."""
    return validate(name, read_json())


def schema_error(error: ValidationError) -> InvalidRequest:
    """A 400 naming the failing field: `messages[0].role: 'robot' is not one of [...]`."""
    path = list(error.absolute_path)
    if error.validator == "required":
        # jsonschema reports a missing field at its parent; name the field itself.
        missing = next(f for f in error.validator_value if f not in error.instance)
        param = field_path([*path, missing])
        return InvalidRequest(f"{param} is required", param=param)
    param = field_path(path)
    message = f"{param}: {error.message}" if param else error.message
    return InvalidRequest(message, param=param or None)


def field_path(parts: Iterable[str | int]) -> str:
    """['messages', 0, 'role'] -> 'messages[0].role'."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _not_json(constant: str) -> Any:
    """Python's json accepts NaN and Infinity; JSON (and Go) do not."""
    raise ValueError(f"{constant} is not valid JSON")


def _normalise(body: dict[str, Any]) -> dict[str, Any]:
    """Read the body as Ollama's Go structs do: null means "not given", roles lower-cased."""
    body = {k: v for k, v in body.items() if v is not None}
    if isinstance(body.get("options"), dict):  # LangChain sends every option, unset ones as null
        body["options"] = {k: v for k, v in body["options"].items() if v is not None}
    if isinstance(body.get("messages"), list):
        body["messages"] = [_message(m) for m in body["messages"]]
    return body


def _message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    message = {k: v for k, v in message.items() if v is not None}
    if isinstance(message.get("role"), str):
        message["role"] = message["role"].lower()
    return message


def keep_alive_seconds(body: dict[str, Any]) -> float | None:
    """A request's keep_alive in seconds (negative: forever), None for the server default.

    A value too long to be a duration is forever (config.parse_keep_alive says why).
    """
    if "keep_alive" not in body:
        return None
    try:
        return parse_keep_alive(body["keep_alive"])
    except ValueError as exc:
        raise InvalidRequest(f"keep_alive: {exc}", param="keep_alive") from None
