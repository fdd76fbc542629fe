"""The OpenAPI 3.1 document of ortserve's HTTP API, built from the request JSON Schemas.

routes() is the one table of operations, each protocol's rows (api/protocol.py): a new route
is a new row in its protocol's descriptor (a test fails while a route of the app has none). Request bodies are schemas/<name>.json, the schemas the routes
validate with, so the document cannot drift from what is enforced; responses are described
here. `GET /openapi.json` serves the document and `python -m ortserve.api.openapi >
docs/openapi.json` writes the published copy (a test keeps the two equal).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from ortserve import __version__
from ortserve.api import validation
from ortserve.api.protocol import REF as _REF
from ortserve.api.protocol import Protocol, Route, owner, protocols
from ortserve.api.protocol import ref as _ref

# ---- responses ---------------------------------------------------------------------------------

_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_NUMBERS = {"type": "array", "items": {"type": "number"}}
_DETAILS = {
    "type": "object",
    "description": "What the model is: format, family, parameter size, quantization.",
    "properties": {"format": _STRING, "family": _STRING, "parameter_size": _STRING},
}


def _object(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


# Bodies ortserve answers with (requests are in schemas/). Loose on purpose: they state what a
# client relies on, and leave room for fields Ollama and OpenAI add.
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(("error",), error={"type": "string", "description": "What went wrong."}),
    "OpenAIError": _object(
        ("error",),
        error=_object(
            ("message", "type"),
            message=_STRING,
            type=_STRING,
            param={"type": ["string", "null"]},
            code={"type": ["string", "null"]},
        ),
    ),
    "Status": _object(
        ("status",),
        status=_STRING,
        error=_STRING,
        models={"type": "object", "additionalProperties": _STRING},
    ),
    "Version": _object(("version",), version=_STRING),
    "ModelList": _object(
        ("models",),
        models={
            "type": "array",
            "items": _object(
                ("name", "model", "size", "digest"),
                name=_STRING,
                model=_STRING,
                modified_at=_STRING,
                size=_INTEGER,
                digest=_STRING,
                details=_DETAILS,
            ),
        },
    ),
    "RunningList": _object(
        ("models",),
        models={
            "type": "array",
            "items": _object(
                ("name", "model", "expires_at"),
                name=_STRING,
                model=_STRING,
                size=_INTEGER,
                digest=_STRING,
                expires_at=_STRING,
                details=_DETAILS,
            ),
        },
    ),
    "Show": _object(
        ("details",),
        details=_DETAILS,
        modelfile=_STRING,
        parameters=_STRING,
        template=_STRING,
        system=_STRING,
        capabilities={"type": "array", "items": _STRING},
        model_info={"type": "object"},
    ),
    "GenerateResponse": _object(
        ("model", "created_at", "done"),
        model=_STRING,
        created_at=_STRING,
        response=_STRING,
        done={"type": "boolean"},
        done_reason=_STRING,
    ),
    "ChatResponse": _object(
        ("model", "created_at", "done"),
        model=_STRING,
        created_at=_STRING,
        message=_object(("role",), role=_STRING, content=_STRING),
        done={"type": "boolean"},
        done_reason=_STRING,
    ),
    "StreamLine": {
        "type": "object",
        "description": "One line of an NDJSON stream: a chunk of the answer, a status, or "
        'the error that ended the stream ({"error": message}).',
    },
    "Embed": _object(
        ("model", "embeddings"),
        model=_STRING,
        embeddings={"type": "array", "items": _NUMBERS},
        prompt_eval_count=_INTEGER,
    ),
    "EmbeddingLegacy": _object(("embedding",), embedding=_NUMBERS),
    "ChatCompletion": _object(
        ("id", "object", "created", "model", "choices"),
        id=_STRING,
        object={"const": "chat.completion"},
        created=_INTEGER,
        model=_STRING,
        choices={"type": "array", "items": {"type": "object"}},
        usage={"type": "object"},
    ),
    "Completion": _object(
        ("id", "object", "created", "model", "choices"),
        id=_STRING,
        object={"const": "text_completion"},
        created=_INTEGER,
        model=_STRING,
        choices={"type": "array", "items": {"type": "object"}},
        usage={"type": "object"},
    ),
    "ServerSentEvent": _object(
        ("data",),
        data={"type": "string", "description": "A chunk as JSON, or [DONE] at the end."},
        event=_STRING,
    ),
    "OpenAIModel": _object(
        ("id", "object", "created", "owned_by"),
        id=_STRING,
        object={"const": "model"},
        created=_INTEGER,
        owned_by=_STRING,
    ),
    "OpenAIModelList": _object(
        ("object", "data"),
        object={"const": "list"},
        data={"type": "array", "items": {"$ref": _REF + "OpenAIModel"}},
    ),
    "OpenAIEmbeddings": _object(
        ("object", "data", "model"),
        object={"const": "list"},
        data={
            "type": "array",
            "items": _object(
                ("object", "index", "embedding"),
                object={"const": "embedding"},
                index=_INTEGER,
                embedding={"type": ["array", "string"], "description": "floats, or base64"},
            ),
        },
        model=_STRING,
        usage={"type": "object"},
    ),
    "Response": _object(
        ("id", "object", "created_at", "model", "output", "status"),
        id=_STRING,
        object={"const": "response"},
        created_at={"type": "number"},
        model=_STRING,
        status=_STRING,
        output={"type": "array", "items": {"type": "object"}},
        usage={"type": ["object", "null"]},
    ),
    "ResponseDeleted": _object(
        ("id", "object", "deleted"), id=_STRING, object=_STRING, deleted={"type": "boolean"}
    ),
    "Message": _object(
        ("id", "type", "role", "content", "model", "stop_reason", "usage"),
        id=_STRING,
        type={"const": "message"},
        role={"const": "assistant"},
        content={"type": "array", "items": {"type": "object"}},
        model=_STRING,
        stop_reason={"type": ["string", "null"]},
        stop_sequence={"type": ["string", "null"]},
        usage={"type": "object"},
    ),
    "TokenCount": _object(("input_tokens",), input_tokens=_INTEGER),
    "AnthropicError": _object(
        ("type", "error"),
        type={"const": "error"},
        error=_object(("type", "message"), type=_STRING, message=_STRING),
    ),
    "OpenAPI": _object(("openapi", "paths"), openapi=_STRING, paths={"type": "object"}),
    "OpenAIFile": _object(
        ("id", "object", "bytes", "created_at", "filename", "purpose"),
        id=_STRING,
        object={"const": "file"},
        bytes=_INTEGER,
        created_at=_INTEGER,
        filename=_STRING,
        purpose={"enum": ["batch", "batch_output"]},
        status=_STRING,
    ),
    "OpenAIFileList": _object(
        ("object", "data", "has_more"),
        object={"const": "list"},
        data={"type": "array", "items": {"$ref": _REF + "OpenAIFile"}},
        has_more={"type": "boolean"},
        first_id={"type": ["string", "null"]},
        last_id={"type": ["string", "null"]},
    ),
    "FileDeleted": _object(
        ("id", "object", "deleted"), id=_STRING, object=_STRING, deleted={"type": "boolean"}
    ),
    "Batch": _object(
        (
            "id",
            "object",
            "endpoint",
            "input_file_id",
            "completion_window",
            "status",
            "created_at",
            "request_counts",
        ),
        id=_STRING,
        object={"const": "batch"},
        endpoint=_STRING,
        input_file_id=_STRING,
        completion_window=_STRING,
        status={
            "enum": [
                "validating",
                "failed",
                "in_progress",
                "finalizing",
                "completed",
                "expired",
                "cancelling",
                "cancelled",
            ]
        },
        output_file_id={"type": ["string", "null"]},
        error_file_id={"type": ["string", "null"]},
        created_at=_INTEGER,
        request_counts=_object(
            ("total", "completed", "failed"), total=_INTEGER, completed=_INTEGER, failed=_INTEGER
        ),
        metadata={"type": ["object", "null"]},
    ),  # fmt: skip
    "BatchList": _object(
        ("object", "data", "has_more"),
        object={"const": "list"},
        data={"type": "array", "items": {"$ref": _REF + "Batch"}},
        has_more={"type": "boolean"},
        first_id={"type": ["string", "null"]},
        last_id={"type": ["string", "null"]},
    ),
}


# ---- the document ------------------------------------------------------------------------------


def routes() -> tuple[Route, ...]:
    """Every protocol's rows, in the registry's order: the one table of operations."""
    return tuple(route for protocol in protocols() for route in protocol.routes)


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; the schemas do not change while running)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes():
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    registry = protocols()
    notes = " ".join(p.note for p in registry if p.note)
    schemes, security = _key_schemes(registry)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ortserve",
            "version": __version__,
            "description": f"Local models on ONNX Runtime GenAI, over several APIs. {notes} "
            "Request bodies are checked against the schemas below (x-checked-by-code marks "
            "rules the server's code enforces with its own message); an integer field takes a "
            "JSON integer, 2 and not 2.0, as Ollama's Go structs do.",
        },
        "paths": paths,
        "components": {
            "schemas": {**request_schemas(), **RESPONSE_SCHEMAS, **_protocol_schemas(registry)},
            "securitySchemes": schemes,
        },
        # Keys are asked only when ORTSERVE_API_KEYS is set: none ({}) is also allowed.
        "security": security,
    }


def _protocol_schemas(registry: tuple[Protocol, ...]) -> dict[str, Any]:
    return {name: schema for protocol in registry for name, schema in protocol.schemas.items()}


def _key_schemes(registry: tuple[Protocol, ...]) -> tuple[dict[str, Any], list[dict]]:
    """Bearer and x-api-key everywhere, plus each protocol's own key headers and parameters."""
    schemes: dict[str, Any] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    for protocol in registry:
        for where, names in (("header", protocol.key_headers), ("query", protocol.key_params)):
            for name in names:
                schemes[f"{protocol.name}_{where}_{name}".replace("-", "_")] = {
                    "type": "apiKey", "in": where, "name": name}  # fmt: skip
    return schemes, [{}, *({name: []} for name in schemes)]


def operation(route: Route) -> dict[str, Any]:
    """One route as an OpenAPI operation."""
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": _operation_id(route),
        "responses": {**route.responses, **_errors(route)},
    }
    if route.parameters:
        op["parameters"] = list(route.parameters)
    if route.request is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(route.request)}}}  # fmt: skip
    elif route.form is not None:
        op["requestBody"] = {"required": True,
                             "content": {"multipart/form-data": {"schema": dict(route.form)}}}  # fmt: skip
    elif route.path.startswith("/api/blobs/") and route.method == "POST":
        op["requestBody"] = {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}  # fmt: skip
    return op


def _errors(route: Route) -> dict[str, Any]:
    """Each error status in the protocol's shape (bodyless for HEAD)."""
    protocol = owner(route.path)
    shape = (protocol.error_schema if protocol is not None else None) or "Error"
    errors = {}
    for status in sorted(route.errors):
        errors[str(status)] = {"description": _ERROR_TEXT.get(status, "error")}
        if route.method != "HEAD":
            errors[str(status)]["content"] = {"application/json": {"schema": _ref(shape)}}
    return errors


_ERROR_TEXT = {
    400: "invalid request (the message names the field)",
    401: "an API key is required, or the one sent is wrong",
    403: "Host or Origin not allowed",
    404: "no such model (or file, or batch)",
    409: "the batch's status does not allow it",
    413: "request body too large",
    415: "the body is not declared as JSON",
    422: "the output did not validate against the requested schema or tools",
    500: "the model cannot load, or an unexpected error",
    501: "needs the convert extra",
    502: "the model source cannot be reached",
    503: "busy: try again after Retry-After seconds; or the execution provider named in "
    "ORTSERVE_PROVIDER cannot run or load the model (the message names the fix)",
}


def _operation_id(route: Route) -> str:
    words = route.path.strip("/").replace("{", "").replace("}", "").replace(".", "_")
    return f"{route.method.lower()}_{words.replace('/', '_') or 'root'}"


def request_schemas() -> dict[str, dict[str, Any]]:
    """The request schemas as components, their references rewritten to point into the
    document."""
    schemas = {}
    for name, schema in validation.request_schemas().items():
        schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
        schemas[name] = _rebase(schema, name)
    return schemas


def _rebase(value: Any, name: str) -> Any:
    """`#/$defs/x` in `name` -> `#/components/schemas/name/$defs/x`; `other.json#/p` likewise."""
    if isinstance(value, dict):
        return {k: _rebase_ref(v, name) if k == "$ref" else _rebase(v, name)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_rebase(item, name) for item in value]
    return value


def _rebase_ref(ref: str, name: str) -> str:
    target, _, pointer = ref.partition("#")
    schema = target.removesuffix(".json") if target else name
    return f"{_REF}{schema}{pointer}"


def main() -> None:
    """Print the document (docs/openapi.json is this output)."""
    print(json.dumps(document(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
