"""Google's Gemini API (/v1beta/models/{model}:generateContent and its siblings, also under /v1).

contents and systemInstruction become template messages, functionDeclarations the core's
tools, generationConfig its sampling, schema and choices; a choice becomes a candidate, its
events Gemini's SSE chunks. Errors take Google's shape ({"error": {code, message, status}});
x-goog-api-key or ?key= carry the API key. docs/gemini.md lists what is supported.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, request

from ortserve.api.protocol import (
    GENERATION,
    GUARDED,
    MODEL,
    MODEL_PARAMETER,
    Protocol,
    Route,
    json_body,
    query,
    ref,
    sse_or_json,
)
from ortserve.api.state import current_state
from ortserve.api.streaming import SSE, exchange_stream, json_response, sse_event
from ortserve.api.validation import parsed_body
from ortserve.engine.guided import JSON_OBJECT_SCHEMA, check_schema
from ortserve.errors import InvalidRequest, OrtServeError
from ortserve.library import ModelInfo
from ortserve.options import api_sampling
from ortserve.serving import core, embedding
from ortserve.serving.core import Choice, Exchange
from ortserve.serving.embedding import EmbeddingRequest
from ortserve.serving.events import Finished, Retry, TextChunk, ThinkingChunk, ToolCallEvent
from ortserve.serving.images import ImageReader
from ortserve.serving.requests import EMBED_MAX_INPUTS, ChatPrompt, GenerationRequest
from ortserve.serving.tools import ToolSpec, tool_spec

gemini_bp = Blueprint("gemini", __name__)

VERSIONS = ("v1beta", "v1")  # the SDK's default, and what it posts to with a custom base URL
GENERATE, STREAM, COUNT = "generateContent", "streamGenerateContent", "countTokens"
EMBED, BATCH_EMBED = "embedContent", "batchEmbedContents"
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}
_MODES = {"AUTO": "auto", "VALIDATED": "auto", "MODE_UNSPECIFIED": "auto", "ANY": "required",
          "NONE": "none"}  # fmt: skip
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 409: "ABORTED", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
           422: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
           500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
           504: "DEADLINE_EXCEEDED"}  # fmt: skip
# Gemini's Schema (an OpenAPI 3.0 subset) keywords that mean the same in JSON Schema.
_SCHEMA_KEYS = ("description", "enum", "format", "required", "minimum", "maximum", "minItems",
                "maxItems", "minLength", "maxLength", "pattern", "title", "default",
                "minProperties", "maxProperties")  # fmt: skip


# ---- routes --------------------------------------------------------------------------------


def _post(method: str):
    """The handler under both versions: /v1beta/models/<model>:<method> and /v1/..."""

    def register(handler):
        for version in VERSIONS:
            gemini_bp.add_url_rule(f"/{version}/models/<path:model>:{method}",
                                   f"{version}_{method}", handler, methods=["POST"])  # fmt: skip
        return handler

    return register


@_post(GENERATE)
def generate_content(model: str):
    """The next model turn, whole."""
    exchange = core.start(current_state(), _request(model, parsed_body("gemini_generate")))
    return json_response(_Reply(model, exchange.request).whole(exchange.finish(), exchange))


@_post(STREAM)
def stream_generate_content(model: str):
    """The next model turn as SSE chunks (alt=sse, as the SDK asks), or a JSON array."""
    alt = request.args.get("alt", "json")
    if alt not in ("sse", "json"):
        raise InvalidRequest(f"alt must be sse or json, not {alt!r}", param="alt")
    exchange = core.start(current_state(), _request(model, parsed_body("gemini_generate")))
    reply = _Reply(model, exchange.request)
    if alt != "sse":  # Google's default: one JSON array of the chunks
        return json_response([reply.whole(exchange.finish(), exchange)])
    return exchange_stream(exchange, lambda events: reply.stream(exchange, events), stream_error,
                           SSE)  # fmt: skip


@_post(COUNT)
def count_tokens(model: str):
    """The tokens of the prompt the request renders to (system and tools included)."""
    body = parsed_body("gemini_count_tokens")
    inner = body.get("generateContentRequest") or {"contents": body.get("contents")}
    if not inner.get("contents"):
        raise InvalidRequest("contents is required", param="contents")
    total = core.count_tokens(current_state(), _request(model, inner))
    return json_response({"totalTokens": total})


@_post(EMBED)
def embed_content(model: str):
    """One vector: {"embedding": {"values": [...]}}."""
    body = parsed_body("gemini_embed")
    return json_response({"embedding": {"values": _embed(model, [body])[0]}})


@_post(BATCH_EMBED)
def batch_embed_contents(model: str):
    """One vector per request (what the SDK's embed_content calls)."""
    body = parsed_body("gemini_batch_embed")
    values = _embed(model, body["requests"])
    return json_response({"embeddings": [{"values": row} for row in values]})


@gemini_bp.get("/v1beta/models")
def list_models():
    """Every model in the library, in Gemini's shape (one page)."""
    return json_response({"models": [_model(info) for info in current_state().library.list()]})


@gemini_bp.get("/v1beta/models/<path:model>")
def get_model(model: str):
    return json_response(_model(current_state().library.get(model)))


def _model(info: ModelInfo) -> dict[str, Any]:
    embeds = "embedding" in info.capabilities and "completion" not in info.capabilities
    methods = [EMBED, BATCH_EMBED] if embeds else [GENERATE, STREAM, COUNT]
    return {"name": f"models/{info.name}", "displayName": info.name, "description": "",
            "supportedGenerationMethods": methods}  # fmt: skip


def error_body(status: int, message: str, type_: str, param=None, code=None) -> dict[str, Any]:
    """Google's error: {"error": {code, message, status}}, the field in its details."""
    error: dict[str, Any] = {"code": status, "message": message,
                             "status": _STATUS.get(status, "UNKNOWN")}  # fmt: skip
    if param:
        violation = {"field": param, "description": message}
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                             "fieldViolations": [violation]}]  # fmt: skip
    return {"error": error}


def stream_error(exc: OrtServeError) -> str:
    """A failed stream's last chunk: the error object, as Google's streams end."""
    return sse_event(error_body(exc.status, exc.message, exc.type, exc.param))


# ---- requests in ---------------------------------------------------------------------------


def _request(model: str, body: dict[str, Any]) -> GenerationRequest:
    """The core's request: system and contents as template messages, tools, config."""
    turns = _system(body.get("systemInstruction"))
    calls: dict[str, list[str]] = {}  # a function's name -> the ids of its calls, in order
    reader = ImageReader.of(current_state().settings)
    for i, content in enumerate(body["contents"]):
        turns += _turns(i, content, calls, reader)
    config = body.get("generationConfig") or {}
    tools = _tools(body.get("tools"), body.get("toolConfig") or {})
    schema = _schema(config)
    sampling = api_sampling("gemini", config)
    return GenerationRequest(model=_name(model), prompts=[ChatPrompt(turns, truncate=False)],
                             kind="chat", sampling=sampling, n=config.get("candidateCount", 1),
                             schema=schema, tools=tools,
                             think=_think(config.get("thinkingConfig")),
                             fields={"schema": "generationConfig.responseSchema",
                                     "think": "generationConfig.thinkingConfig",
                                     "images": reader.first or "contents"})  # fmt: skip


def _name(model: str) -> str:
    """The library's name: the SDK may send "models/<name>" (the path holds "models/" once)."""
    return model.removeprefix("models/")


def _system(instruction: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not instruction:
        return []
    text = "\n".join(part["text"] for part in instruction["parts"])  # text only (the schema)
    return [{"role": "system", "content": text}] if text else []


def _turns(i: int, content: dict[str, Any], calls: dict[str, list[str]],
           reader: ImageReader) -> list[dict]:  # fmt: skip
    """One content -> template messages: function responses first, then the images, text
    and calls.

    The schema admits one of text, inlineData, functionCall (a model's) or functionResponse
    per part."""
    role = "assistant" if content.get("role") == "model" else "user"
    texts, thinking, made, results, images = [], [], [], [], []
    for j, part in enumerate(content["parts"]):
        if "inlineData" in part:
            images.append(_inline(part["inlineData"], f"contents[{i}].parts[{j}].inlineData",
                                  reader))  # fmt: skip
        elif "functionCall" in part:
            made.append(_call(part["functionCall"], calls))
        elif "functionResponse" in part:
            results.append(_result(part["functionResponse"], calls))
        elif part.get("thought") and role == "assistant":
            thinking.append(part["text"])
        else:
            texts.append(part["text"])
    turn: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    turn.update({"tool_calls": made} if made else {})
    turn.update({"thinking": "".join(thinking)} if thinking else {})
    turn.update({"images": images} if images else {})
    return results + ([turn] if texts or made or thinking or images else [])


def _inline(blob: dict[str, Any], where: str, reader: ImageReader) -> bytes:
    """inlineData {mimeType, data}: an image (types.Part.from_bytes, whose SDK sends
    mime_type: Google's JSON takes either spelling)."""
    key = "mimeType" if "mimeType" in blob else "mime_type"
    mime = blob.get(key) or ""
    if not mime.lower().startswith("image/"):
        raise InvalidRequest(f"{where}.{key}: only images are read here, not {mime!r}",
                             param=f"{where}.{key}")  # fmt: skip
    return reader.base64(blob.get("data"), f"{where}.data", proto=True)


def _call(call: dict[str, Any], calls: dict[str, list[str]]) -> dict[str, Any]:
    call_id = call.get("id") or f"call_{secrets.token_hex(6)}"
    calls.setdefault(call["name"], []).append(call_id)
    function = {"name": call["name"], "arguments": call.get("args") or {}}
    return {"id": call_id, "type": "function", "function": function}


def _result(response: dict[str, Any], calls: dict[str, list[str]]) -> dict[str, Any]:
    """A tool message; without an id it answers the oldest unanswered call of that name."""
    pending = calls.get(response["name"]) or []
    call_id = response.get("id") or (pending.pop(0) if pending else response["name"])
    content = json.dumps(response["response"], ensure_ascii=False)
    return {"role": "tool", "content": content, "tool_call_id": call_id,
            "name": response["name"]}  # fmt: skip


def _tools(tools: list[dict] | None, config: dict[str, Any]) -> ToolSpec | None:
    """functionDeclarations and functionCallingConfig as the core's (OpenAI-shaped) ToolSpec."""
    functions = []
    for i, tool in enumerate(tools or []):
        others = sorted(set(tool) - {"functionDeclarations"})
        if others:
            raise InvalidRequest(f"tools[{i}]: {', '.join(others)} is not supported here; only "
                                 "functionDeclarations", param=f"tools[{i}]")  # fmt: skip
        for j, declaration in enumerate(tool.get("functionDeclarations") or []):
            functions.append(_function(declaration, f"tools[{i}].functionDeclarations[{j}]"))
    calling = config.get("functionCallingConfig") or {}
    if not functions:
        return None
    choice: Any = _MODES[calling.get("mode", "AUTO")]
    allowed = calling.get("allowedFunctionNames") or []
    if choice == "required" and len(allowed) == 1:  # ANY with one name: that function
        choice = {"type": "function", "function": {"name": allowed[0]}}
    return tool_spec(functions, choice, True,
                     schema_param="tools[0].functionDeclarations[{i}].parameters")  # fmt: skip


def _function(declaration: dict[str, Any], where: str) -> dict[str, Any]:
    if "parametersJsonSchema" in declaration:
        parameters = declaration["parametersJsonSchema"]
    else:
        parameters = json_schema(declaration.get("parameters") or {"type": "OBJECT"},
                                 f"{where}.parameters")  # fmt: skip
    described = {"description": declaration["description"]} if "description" in declaration else {}
    function = {"name": declaration["name"], **described, "parameters": parameters}
    return {"type": "function", "function": function}


def json_schema(schema: Any, where: str) -> Any:
    """Gemini's Schema (OpenAPI 3.0's: upper-case types, nullable) as a JSON Schema."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    out: dict[str, Any] = {k: schema[k] for k in _SCHEMA_KEYS if k in schema}
    kind = schema.get("type")
    if isinstance(kind, str) and kind.upper() != "TYPE_UNSPECIFIED":
        out["type"] = [kind.lower(), "null"] if schema.get("nullable") else kind.lower()
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: json_schema(value, f"{where}.properties.{name}")
                             for name, value in schema["properties"].items()}  # fmt: skip
    if "items" in schema:
        out["items"] = json_schema(schema["items"], f"{where}.items")
    if isinstance(schema.get("anyOf"), list):
        out["anyOf"] = [json_schema(s, f"{where}.anyOf[{k}]")
                        for k, s in enumerate(schema["anyOf"])]  # fmt: skip
    return out


def _schema(config: dict[str, Any]) -> dict | None:
    """responseMimeType application/json: responseJsonSchema, responseSchema, or any object."""
    mime = config.get("responseMimeType") or "text/plain"
    given = "responseJsonSchema" in config or "responseSchema" in config
    if mime == "text/plain" and not given:
        return None
    if mime != "application/json":
        param = "generationConfig.responseMimeType"
        raise InvalidRequest(f"{param} must be text/plain or application/json (with a schema), "
                             f"not {mime!r}", param=param)  # fmt: skip
    if "responseJsonSchema" in config:
        return check_schema(config["responseJsonSchema"], "generationConfig.responseJsonSchema")
    if "responseSchema" in config:
        param = "generationConfig.responseSchema"
        return check_schema(json_schema(config["responseSchema"], param), param)
    return JSON_OBJECT_SCHEMA


def _think(config: dict[str, Any] | None) -> bool | None:
    """thinkingBudget 0 turns thinking off; includeThoughts asks for it; else the template's."""
    if not config:
        return None
    if config.get("thinkingBudget") == 0:
        return False
    return True if config.get("includeThoughts") else None


def _embed(model: str, bodies: list[dict[str, Any]]) -> list[list[float]]:
    """The vector of each request's text parts, in order (one model; widths as each asks)."""
    if len(bodies) > EMBED_MAX_INPUTS:
        raise InvalidRequest(f"requests: more than {EMBED_MAX_INPUTS}", param="requests")
    groups: dict[int | None, list[int]] = {}  # outputDimensionality -> the requests asking it
    for i, body in enumerate(bodies):
        width = body.get("outputDimensionality")  # 90.0 passes a cross-file $ref (validation.py)
        groups.setdefault(None if width is None else int(width), []).append(i)
    vectors: list[list[float]] = [[] for _ in bodies]
    for dimensions, members in groups.items():
        texts = ["\n".join(p["text"] for p in bodies[i]["content"]["parts"]) for i in members]
        request = EmbeddingRequest(_name(model), texts, dimensions=dimensions, param="requests")
        rows = embedding.embed(current_state(), request).vectors.tolist()
        for i, row in zip(members, rows, strict=True):
            vectors[i] = row
    return vectors


# ---- answers out ---------------------------------------------------------------------------


class _Reply:
    """One answer in Gemini's shape: whole, or as SSE chunks of its candidates' parts."""

    def __init__(self, model: str, request_: GenerationRequest):
        self.id = secrets.token_urlsafe(16)
        self.model = _name(model)
        self.thoughts = request_.think is True  # includeThoughts: thought parts are shown
        self.hold = request_.schema is not None  # JSON is sent once valid (a retry restarts it)
        self.sent: set[int] = set()  # candidates with parts already sent

    def envelope(self, candidates: list[dict], usage: dict | None = None) -> dict[str, Any]:
        body = {"candidates": candidates, "modelVersion": self.model, "responseId": self.id}
        return {**body, "usageMetadata": usage} if usage is not None else body

    def whole(self, choices: list[Choice], exchange: Exchange) -> dict[str, Any]:
        candidates = [self.candidate(i, self.parts(c), _finish(c)) for i, c in enumerate(choices)]
        return self.envelope(candidates, _usage(exchange))

    def parts(self, choice: Choice) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        if choice.thoughts and self.thoughts:
            parts.append({"text": choice.thoughts, "thought": True})
        if choice.content and (choice.content.strip() or not choice.calls):
            parts.append({"text": choice.content})
        return parts + [_function_call(call) for call in choice.calls]

    @staticmethod
    def candidate(index: int, parts: list[dict], finish: str | None = None) -> dict[str, Any]:
        content = {"role": "model", "parts": parts}
        candidate = {"content": content, "index": index}
        return {**candidate, "finishReason": finish} if finish else candidate

    def stream(self, exchange: Exchange, events: Iterator) -> Iterator[str]:
        for index, event in events:
            part = self._part(index, event, exchange.choices[index])
            if part is not None:
                self.sent.add(index)
                yield sse_event(self.envelope([self.candidate(index, [part])]))
        last = [self.candidate(i, [], _finish(c)) for i, c in enumerate(exchange.choices)]
        yield sse_event(self.envelope(last, _usage(exchange)))

    def _part(self, index: int, event: Any, choice: Choice) -> dict[str, Any] | None:
        if isinstance(event, ThinkingChunk) and self.thoughts and event.text:
            return {"text": event.text, "thought": True}
        if isinstance(event, TextChunk) and event.text and not self.hold:
            return {"text": event.text}
        if isinstance(event, ToolCallEvent):
            return _function_call(event.call)
        if isinstance(event, Retry) and index in self.sent and not self.hold:
            raise OrtServeError("the model's tool call failed validation after its text was "
                                "streamed; send the request again")  # fmt: skip
        if isinstance(event, Finished) and self.hold and choice.content:
            return {"text": choice.content}  # the accepted attempt's JSON, whole
        return None


def _function_call(call) -> dict[str, Any]:
    return {"functionCall": {"id": call.id, "name": call.name, "args": call.arguments}}


def _finish(choice: Choice) -> str:
    return "STOP" if choice.calls else _FINISH.get(choice.finished.reason, "STOP")


def _usage(exchange: Exchange) -> dict[str, int]:
    used = exchange.usage()  # every attempt of a retried answer counted
    usage = {"promptTokenCount": used.prompt_tokens,
             "candidatesTokenCount": used.completion_tokens,
             "totalTokenCount": used.total_tokens}  # fmt: skip
    return {**usage, "cachedContentTokenCount": used.cached_tokens} if used.cached_tokens else usage


# ---- the descriptor ------------------------------------------------------------------------

_GENERATING = (GENERATE, STREAM, EMBED, BATCH_EMBED)
# streamGenerateContent: SSE chunks with alt=sse, else one JSON array of them (Google's default)
_STREAMED = {"200": {"description": "Server-sent events with alt=sse, else a JSON array",
                     "content": {"application/json": {"schema": {"type": "array",
                                                                 "items": ref("GeminiResponse")}},
                                 SSE: {"schema": ref("ServerSentEvent")}}}}  # fmt: skip
_ALT = query("alt", "sse: server-sent events", enum=["sse", "json"])
_ANSWERS = {GENERATE: ("gemini_generate", sse_or_json("GeminiResponse"), GENERATION),
            STREAM: ("gemini_generate", _STREAMED, GENERATION),
            COUNT: ("gemini_count_tokens", json_body("GeminiTokenCount"), MODEL),
            EMBED: ("gemini_embed", json_body("GeminiEmbedding"), GENERATION),
            BATCH_EMBED: ("gemini_batch_embed", json_body("GeminiEmbeddings"), GENERATION)}  # fmt: skip
_OBJECT = {"type": "object"}
_VALUES = {"type": "object", "properties": {"values": {"type": "array",
                                                       "items": {"type": "number"}}}}  # fmt: skip

PROTOCOL = Protocol(
    "gemini", gemini_bp, rank=35,
    owns=("/v1beta", *(f"/v1/models/*:{m}" for m in (*_GENERATING, COUNT))),
    error_body=error_body, error_schema="GeminiError", stream_error=stream_error,
    generation_paths=tuple(f"/{v}/models/*:{m}" for v in VERSIONS for m in _GENERATING),
    key_headers=("x-goog-api-key",), key_params=("key",), cors_headers=("X-Goog-Api-Client",),
    note="Google's Gemini API (/v1beta/models/{model}:generateContent and its siblings, also "
    'under /v1): errors are Google\'s {"error": {code, message, status}}.',
    routes=(
        *(Route("POST", f"/{version}/models/{{model}}:{method}", f"Gemini {method}", schema,
                answer, errors, (MODEL_PARAMETER, *((_ALT,) if method == STREAM else ())))
          for version in VERSIONS for method, (schema, answer, errors) in _ANSWERS.items()),
        Route("GET", "/v1beta/models", "The models in the library (Gemini)", None,
              json_body("GeminiModelList")),
        Route("GET", "/v1beta/models/{model}", "One model (Gemini)", None,
              json_body("GeminiModel"), (*GUARDED, 400, 404), (MODEL_PARAMETER,)),
    ),
    schemas={
        "GeminiError": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message", "status"],
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                           "status": {"type": "string"}, "details": {"type": "array"}}}}},
        "GeminiResponse": {"type": "object", "properties": {
            "candidates": {"type": "array", "items": _OBJECT}, "usageMetadata": _OBJECT,
            "modelVersion": {"type": "string"}, "responseId": {"type": "string"}}},
        "GeminiTokenCount": {"type": "object", "required": ["totalTokens"],
                             "properties": {"totalTokens": {"type": "integer"}}},
        "GeminiEmbedding": {"type": "object", "properties": {"embedding": _VALUES}},
        "GeminiEmbeddings": {"type": "object", "properties": {
            "embeddings": {"type": "array", "items": _VALUES}}},
        "GeminiModel": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "displayName": {"type": "string"},
            "supportedGenerationMethods": {"type": "array", "items": {"type": "string"}}}},
        "GeminiModelList": {"type": "object", "properties": {
            "models": {"type": "array", "items": {"$ref": "#/components/schemas/GeminiModel"}}}},
    },
)  # fmt: skip
