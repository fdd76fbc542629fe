"""The OpenAPI 3.1 document of ortserve's HTTP API, built from the request JSON Schemas.

ROUTES is the one table of operations: a new route is a new row (a test fails while a route
of the app has none). Request bodies are schemas/<name>.json, the schemas the routes
validate with, so the document cannot drift from what is enforced; responses are described
here. `GET /openapi.json` serves the document and `python -m ortserve.api.openapi >
docs/openapi.json` writes the published copy (a test keeps the two equal).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ortserve import __version__
from ortserve.api.validation import SCHEMA_DIR

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
_REF = "#/components/schemas/"

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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def json_body(schema: str, description: str = "OK", status: int = 200) -> dict[str, Any]:
    return {str(status): {"description": description,
                          "content": {"application/json": {"schema": _ref(schema)}}}}  # fmt: skip


def ndjson_or_json(schema: str) -> dict[str, Any]:
    """Ollama's streams: NDJSON lines unless `stream` is false, then one JSON body."""
    content = {"application/json": {"schema": _ref(schema)}, NDJSON: {"schema": _ref("StreamLine")}}
    return {"200": {"description": "NDJSON lines as they come, or one body with stream false",
                    "content": content}}  # fmt: skip


def sse_or_json(schema: str) -> dict[str, Any]:
    """OpenAI's streams: server-sent events with `stream` true, else one JSON body."""
    content = {
        "application/json": {"schema": _ref(schema)},
        SSE: {"schema": _ref("ServerSentEvent")},
    }
    return {"200": {"description": "One body, or server-sent events with stream true",
                    "content": content}}  # fmt: skip


def empty(**statuses: str) -> dict[str, Any]:
    """Bodyless answers: empty(s200="deleted") -> {"200": {"description": "deleted"}}."""
    return {key.removeprefix("s"): {"description": text} for key, text in statuses.items()}


def text(media_type: str, description: str) -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {media_type: {"schema": {"type": "string"}}}}}  # fmt: skip


# ---- the route table ---------------------------------------------------------------------------

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


def _path_parameter(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", **schema}}  # fmt: skip


_DIGEST = _path_parameter("digest", "the file's sha256", pattern="^sha256[:-][0-9a-fA-F]{64}$")
_MODEL = {**_path_parameter("model", "a model name, [namespace/]model[:tag]"),
          "schema": {"$ref": _REF + "common/$defs/model_name"}}  # fmt: skip
_RESPONSE_ID = _path_parameter("response_id", "a stored response's id (resp_...)")
_FILE_ID = _path_parameter("file_id", "a file's id (file-...)")
_BATCH_ID = _path_parameter("batch_id", "a batch's id (batch_...)")


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


_AFTER = _query("after", "the id the page starts after", type="string")

ROUTES: tuple[Route, ...] = (
    # ops
    Route("GET", "/healthz", "Liveness: the process answers HTTP", None, json_body("Status")),
    Route("GET", "/readyz", "Readiness: the model library can be read and the models "
          "ORTSERVE_PRELOAD names are loaded", None,
          {**json_body("Status"), **json_body("Status", "not ready", 503)}),
    Route("GET", "/metrics", "Prometheus metrics", None, text("text/plain", "Prometheus text")),
    Route("GET", "/openapi.json", "This document", None, json_body("OpenAPI")),
    # Ollama's native API
    Route("GET", "/", "Says the server is running", None, text("text/plain", "a sentence")),
    Route("GET", "/api/version", "The server's version", None, json_body("Version")),
    Route("GET", "/api/tags", "The models in the library", None, json_body("ModelList")),
    Route("GET", "/api/ps", "The models loaded now", None, json_body("RunningList")),
    Route("POST", "/api/show", "One model's details, template and parameters", "show",
          json_body("Show"), MODEL),
    Route("DELETE", "/api/delete", "Remove a model", "delete", empty(s200="deleted"), MODEL),
    Route("POST", "/api/copy", "Give a model another name", "copy", empty(s200="copied"), MODEL),
    Route("POST", "/api/generate", "A completion of a prompt (an empty prompt loads the model)",
          "generate", ndjson_or_json("GenerateResponse"), GENERATION),
    Route("POST", "/api/chat", "The next message of a chat (no messages loads the model)",
          "chat", ndjson_or_json("ChatResponse"), GENERATION),
    Route("POST", "/api/embed", "One vector per input text", "embed", json_body("Embed"),
          GENERATION),
    Route("POST", "/api/embeddings", "One vector (Ollama's older endpoint)", "embeddings",
          json_body("EmbeddingLegacy"), GENERATION),
    Route("POST", "/api/pull", "Pull a model from the Hugging Face Hub", "pull",
          ndjson_or_json("Status"), (*MODEL, 501, 502)),
    Route("POST", "/api/push", "Push a model to a Hugging Face Hub repository", "push",
          ndjson_or_json("Status"), (*MODEL, 502)),
    Route("POST", "/api/create", "Make a model from a base and Ollama's create fields", "create",
          ndjson_or_json("Status"), (*MODEL, 501)),
    Route("HEAD", "/api/blobs/{digest}", "Whether the server has an uploaded file", None,
          empty(s200="present", s404="absent"), (*GUARDED, 400), (_DIGEST,)),
    Route("POST", "/api/blobs/{digest}", "Upload a file for /api/create", None,
          empty(s200="already present", s201="stored"), (*GUARDED, 400, 413), (_DIGEST,)),
    # OpenAI's API
    Route("POST", "/v1/chat/completions", "Chat completions", "chat_completions",
          sse_or_json("ChatCompletion"), GENERATION),
    Route("POST", "/v1/completions", "Completions of raw prompts", "completions",
          sse_or_json("Completion"), GENERATION),
    Route("POST", "/v1/embeddings", "Embeddings", "openai_embeddings",
          json_body("OpenAIEmbeddings"), GENERATION),
    Route("GET", "/v1/models", "The models in the library", None, json_body("OpenAIModelList")),
    Route("GET", "/v1/models/{model}", "One model", None, json_body("OpenAIModel"),
          (*GUARDED, 400, 404), (_MODEL,)),
    # OpenAI's Responses API
    Route("POST", "/v1/responses", "A model response (Responses API)", "responses",
          sse_or_json("Response"), GENERATION),
    Route("GET", "/v1/responses/{response_id}", "A stored response", None, json_body("Response"),
          (*GUARDED, 404), (_RESPONSE_ID,)),
    Route("DELETE", "/v1/responses/{response_id}", "Delete a stored response", None,
          json_body("ResponseDeleted"), (*GUARDED, 404), (_RESPONSE_ID,)),
    # Anthropic's Messages API
    Route("POST", "/v1/messages", "A message (Anthropic's Messages API)", "messages",
          sse_or_json("Message"), GENERATION),
    Route("POST", "/v1/messages/count_tokens", "The tokens of a Messages request's prompt",
          "count_tokens", json_body("TokenCount"), MODEL),
    # OpenAI's Batch API: files, and batches of their lines
    Route("POST", "/v1/files", "Upload a batch input file (JSONL, multipart/form-data)", None,
          json_body("OpenAIFile"), (*GUARDED, 400, 413)),
    Route("GET", "/v1/files", "This key's files, newest first", None, json_body("OpenAIFileList"),
          (*GUARDED, 400), (_query("purpose", "only files of this purpose", type="string"),
                            _query("limit", "files per page", type="integer", minimum=1,
                                   maximum=10000),
                            _query("order", "by creation time", enum=["asc", "desc"]), _AFTER)),
    Route("GET", "/v1/files/{file_id}", "One file", None, json_body("OpenAIFile"),
          (*GUARDED, 404), (_FILE_ID,)),
    Route("DELETE", "/v1/files/{file_id}", "Delete a file", None, json_body("FileDeleted"),
          (*GUARDED, 404), (_FILE_ID,)),
    Route("GET", "/v1/files/{file_id}/content", "A file's content", None,
          text("application/octet-stream", "the file's bytes (JSONL)"), (*GUARDED, 404),
          (_FILE_ID,)),
    Route("POST", "/v1/batches", "Run an uploaded file's lines as a batch", "batch_create",
          json_body("Batch"), (*JSON_BODY, 404)),
    Route("GET", "/v1/batches", "This key's batches, newest first", None, json_body("BatchList"),
          (*GUARDED, 400), (_query("limit", "batches per page", type="integer", minimum=1,
                                   maximum=100), _AFTER)),
    Route("GET", "/v1/batches/{batch_id}", "One batch", None, json_body("Batch"),
          (*GUARDED, 404), (_BATCH_ID,)),
    Route("POST", "/v1/batches/{batch_id}/cancel", "Cancel a batch: no more lines start",
          None, json_body("Batch"), (*GUARDED, 404, 409), (_BATCH_ID,)),
)  # fmt: skip


# ---- the document ------------------------------------------------------------------------------


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; the schemas do not change while running)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ortserve",
            "version": __version__,
            "description": "Ollama's API (/api/*), an OpenAI-compatible API (/v1/*, the "
            "Responses API included) and Anthropic's Messages API (/v1/messages) on ONNX "
            'Runtime GenAI. Errors are {"error": message} on /api, OpenAI\'s {"error": '
            '{message, type, param, code}} on /v1, and Anthropic\'s {"type": "error", '
            '"error": {type, message}} on /v1/messages. Request bodies are checked against '
            "the schemas below (x-checked-by-code marks rules the server's code enforces with "
            "its own message); an integer field takes a JSON integer, 2 and not 2.0, as "
            "Ollama's Go structs do.",
        },
        "paths": paths,
        "components": {
            "schemas": {**request_schemas(), **RESPONSE_SCHEMAS},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        # Keys are asked only when ORTSERVE_API_KEYS is set: none ({}) is also allowed.
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }


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
    elif route.path == "/v1/files" and route.method == "POST":
        form = _object(("file", "purpose"), file={"type": "string", "format": "binary"},
                       purpose={"enum": ["batch"]})  # fmt: skip
        op["requestBody"] = {"required": True,
                             "content": {"multipart/form-data": {"schema": form}}}  # fmt: skip
    elif route.path.startswith("/api/blobs/") and route.method == "POST":
        op["requestBody"] = {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}  # fmt: skip
    return op


def _errors(route: Route) -> dict[str, Any]:
    """Each error status in the protocol's shape (bodyless for HEAD)."""
    shape = "OpenAIError" if route.path.startswith("/v1/") else "Error"
    if route.path.startswith("/v1/messages"):
        shape = "AnthropicError"
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
    """schemas/*.json as components, their references rewritten to point into the document."""
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        name = path.stem
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
