"""Ollama's native API (/api/*): translates requests into the serving core's and back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response

import ortserve.api.logprobs as shape_logprobs
from ortserve import __version__
from ortserve.api.entries import ps_entry, show_entry, tag_entry
from ortserve.api.protocol import (
    GENERATION,
    MODEL,
    Protocol,
    Route,
    empty,
    json_body,
    ndjson_or_json,
    ollama_error,
    text,
)
from ortserve.api.state import current_state
from ortserve.api.streaming import (
    answer_response,
    exchange_stream,
    json_response,
    ndjson_line,
    rfc3339,
)
from ortserve.api.validation import keep_alive_seconds, parsed_body, read_json, validate
from ortserve.engine.guided import JSON_OBJECT_SCHEMA, check_schema
from ortserve.errors import InvalidRequest, NotSupportedYet
from ortserve.library import ModelInfo
from ortserve.options import parse_options
from ortserve.serving import core
from ortserve.serving.core import Choice, Exchange
from ortserve.serving.events import Finished, Retry, TextChunk, ThinkingChunk, ToolCallEvent
from ortserve.serving.images import ImageReader
from ortserve.serving.requests import ChatPrompt, GenerationRequest, TextPrompt, logprob_count
from ortserve.serving.tools import template_calls, tool_spec

native_bp = Blueprint("native", __name__)

# Fields a later version implements, and when a value asks for them: refused, never ignored.
_LATER = ("suffix", "template", "context")


# ---- routes --------------------------------------------------------------------------------


@native_bp.get("/")
def root():
    return Response("ortserve is running", mimetype="text/plain")


@native_bp.get("/api/version")
def version():
    return json_response({"version": __version__})


@native_bp.get("/api/tags")
def tags():
    return json_response({"models": [tag_entry(m) for m in current_state().library.list()]})


@native_bp.get("/api/ps")
def ps():
    runtime = current_state().started_runtime  # nothing is loaded before the runtime exists
    loaded = runtime.loaded_models() if runtime is not None else []
    return json_response({"models": [ps_entry(m) for m in loaded]})


@native_bp.post("/api/show")
def show():
    body = validate("show", _model_alias(read_json()))
    state = current_state()
    info = state.library.get(body["model"])
    return json_response({**show_entry(info), **_runs_on(state, info)})


def _runs_on(state, info: ModelInfo) -> dict[str, Any]:
    """The provider a loaded model runs on, or the one it will load on first (not Ollama's)."""
    from ortserve.engine.runtime import planned_provider

    runtime = state.started_runtime
    loaded = runtime.loaded(info.name) if runtime is not None else None
    if loaded is not None:
        return {"provider": loaded.provider, "loaded": True}
    return {"provider": planned_provider(info, state.settings.provider), "loaded": False}


@native_bp.delete("/api/delete")
def delete():
    body = validate("delete", _model_alias(read_json()))
    state = current_state()
    info = state.library.get(body["model"])
    core.unload(state, info)  # a deleted model must stop answering
    state.library.delete(info.name)
    return Response(status=200)


@native_bp.post("/api/copy")
def copy():
    body = parsed_body("copy")
    current_state().library.copy(body["source"], body["destination"])
    return Response(status=200)


@native_bp.post("/api/generate")
def generate():
    body = parsed_body("generate")
    if body.get("tools"):  # Ollama's generate has no tools: refused, never silently ignored
        raise InvalidRequest("tools is not supported on /api/generate; use /api/chat",
                             param="tools")  # fmt: skip
    if body.get("raw") and any(body.get(k) for k in ("template", "system", "context")):
        raise InvalidRequest("raw mode does not support template, system, or context")
    if not body.get("prompt"):
        return _load_or_unload(body, "generate")
    reader = ImageReader.of(current_state().settings)
    images = tuple(reader.base64(data, f"images[{j}]")
                   for j, data in enumerate(body.get("images") or ()))  # fmt: skip
    prompt = TextPrompt(body["prompt"], system=body.get("system"), raw=body.get("raw", False),
                        images=images)  # fmt: skip
    request = _request(body, prompt, "generate", reader)
    return _answer(body, request, _Reply(body["model"], "generate"))


@native_bp.post("/api/chat")
def chat():
    body = parsed_body("chat")
    if not body.get("messages"):
        return _load_or_unload(body, "chat")
    reader = ImageReader.of(current_state().settings)
    messages = [_chat_message(i, m, reader) for i, m in enumerate(body["messages"])]
    prompt = ChatPrompt(messages, truncate=body.get("truncate", True))
    request = _request(body, prompt, "chat", reader)
    request.tools = tool_spec(body.get("tools"), body.get("tool_choice"),
                              body.get("parallel_tool_calls", True))  # fmt: skip
    return _answer(body, request, _Reply(body["model"], "chat"))


# ---- requests in ---------------------------------------------------------------------------


def _model_alias(body: dict[str, Any]) -> dict[str, Any]:
    """Older clients send `name` where newer ones send `model` (Ollama accepts both)."""
    if "model" not in body and "name" in body:
        body = {**body, "model": body.pop("name")}
    return body


def _refuse_later(body: dict[str, Any]) -> None:
    for field in _LATER:
        if body.get(field):
            raise NotSupportedYet(f'"{field}" is not supported yet', param=field)


def _request(body: dict[str, Any], prompt, kind: str, reader: ImageReader) -> GenerationRequest:
    """The core's request: prompt, options, format, think, logprobs, keep_alive."""
    _refuse_later(body)
    return GenerationRequest(
        model=body["model"],
        prompts=[prompt],
        kind=kind,
        sampling=parse_options(body.get("options")),
        keep_alive=keep_alive_seconds(body),
        schema=format_schema(body.get("format")),
        think=_think(body.get("think")),
        logprobs=logprob_count(body.get("logprobs"), body.get("top_logprobs")),
        fields={"images": reader.first} if reader.first else {},
    )


def _think(value: bool | str | None) -> bool | None:
    """think: a boolean, or a level ("low", "medium", "high"), which here means on."""
    if isinstance(value, str):
        if value not in ("low", "medium", "high"):
            raise InvalidRequest('think must be true, false, "low", "medium" or "high"',
                                 param="think")  # fmt: skip
        return True
    return value


def _chat_message(i: int, message: dict[str, Any], reader: ImageReader) -> dict[str, Any]:
    """A message as templates take it: content a string, tool calls' arguments objects,
    images as bytes (checked)."""
    message = {**message, "content": message.get("content") or ""}
    pictures = message.pop("images", None) or ()
    if pictures:
        message["images"] = [reader.base64(data, f"messages[{i}].images[{j}]")
                             for j, data in enumerate(pictures)]  # fmt: skip
    if message.get("tool_calls"):
        message["tool_calls"] = template_calls(message["tool_calls"], f"messages[{i}].tool_calls")
    if message.get("role") == "tool" and "tool_name" in message:
        message.setdefault("name", message["tool_name"])
    return message


def _load_or_unload(body: dict[str, Any], kind: str) -> Response:
    """An empty prompt loads the model; with keep_alive 0 it unloads it instead."""
    _refuse_later(body)
    keep_alive = keep_alive_seconds(body)
    state = current_state()
    if keep_alive == 0:
        core.unload(state, body["model"])
        reason = "unload"
    else:
        core.load(state, body["model"], keep_alive, kind)
        reason = "load"
    reply = _Reply(body["model"], kind)
    return json_response({**reply.chunk(), "done": True, "done_reason": reason})


# ---- answers out ---------------------------------------------------------------------------


class _Reply:
    """The shape of /api/generate and /api/chat objects."""

    def __init__(self, model: str, kind: str):
        self.model = model
        self.kind = kind

    def chunk(self, text: str = "", *, thinking: str = "", calls=(), logprobs=()) -> dict:
        body: dict[str, Any] = {"model": self.model, "created_at": rfc3339()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [native_call(c) for c in calls]
            body["message"] = message
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        body["done"] = False
        if logprobs:
            body["logprobs"] = shape_logprobs.ollama(list(logprobs))
        return body

    def final(self, exchange: Exchange, choice: Choice, *, whole: bool) -> dict[str, Any]:
        """The done object with Ollama's metrics (all durations in nanoseconds)."""
        finished = choice.finished
        if whole:
            out = self.chunk(choice.content, thinking=choice.thoughts, calls=choice.calls,
                             logprobs=choice.logprobs)  # fmt: skip
        else:
            out = self.chunk()
        attempts = {} if choice.attempts is None else {"attempts": choice.attempts}
        return {
            **out,
            "done": True,
            "done_reason": finished.reason,
            "total_duration": time.perf_counter_ns() - exchange.started_ns,
            "load_duration": exchange.load_duration_ns,
            "prompt_eval_count": finished.usage.prompt_tokens,
            "prompt_eval_duration": finished.prompt_eval_duration_ns,
            "eval_count": finished.usage.generated_tokens,
            "eval_duration": finished.eval_duration_ns,
            **attempts,
        }


def _answer(body: dict[str, Any], request: GenerationRequest, reply: _Reply) -> Response:
    exchange = core.start(current_state(), request)
    if body.get("stream", True):
        return exchange_stream(exchange, lambda events: _lines(exchange, reply, events),
                               lambda exc: ndjson_line({"error": exc.message}),
                               "application/x-ndjson")  # fmt: skip
    choice = exchange.finish()[0]
    return answer_response(reply.final(exchange, choice, whole=True), exchange)


def _lines(exchange: Exchange, reply: _Reply, events: Iterator) -> Iterator[str]:
    """NDJSON, one object per event; a Retry tells the client to discard what it has."""
    for _, event in events:
        if isinstance(event, TextChunk):
            if event.text or event.logprobs:
                yield ndjson_line(reply.chunk(event.text, logprobs=event.logprobs))
        elif isinstance(event, ThinkingChunk):
            yield ndjson_line(reply.chunk(thinking=event.text))
        elif isinstance(event, ToolCallEvent):
            yield ndjson_line(reply.chunk(calls=[event.call]))
        elif isinstance(event, Retry):
            yield ndjson_line({"model": reply.model, "created_at": rfc3339(),
                               "retry": {"attempt": event.attempt, "reason": event.reason},
                               "done": False})  # fmt: skip
        elif isinstance(event, Finished):
            yield ndjson_line(reply.final(exchange, exchange.choices[0], whole=False))


def native_call(call) -> dict[str, Any]:
    """A call in Ollama's shape: arguments as an object."""
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


def format_schema(fmt: Any, param: str = "format") -> dict | None:
    """The schema of Ollama's `format`: "json", a JSON Schema object, or none."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return JSON_OBJECT_SCHEMA
    if isinstance(fmt, dict):
        return check_schema(fmt, param)
    raise InvalidRequest('invalid format: expected "json" or a JSON Schema object', param=param)


PROTOCOL = Protocol(
    "native", native_bp, rank=10, owns=("/api",), error_body=ollama_error, error_schema="Error",
    generation_paths=("/api/generate", "/api/chat"),
    note='Ollama\'s API (/api/*): errors are {"error": message}.',
    routes=(
        Route("GET", "/", "Says the server is running", None, text("text/plain", "a sentence")),
        Route("GET", "/api/version", "The server's version", None, json_body("Version")),
        Route("GET", "/api/tags", "The models in the library", None, json_body("ModelList")),
        Route("GET", "/api/ps", "The models loaded now", None, json_body("RunningList")),
        Route("POST", "/api/show", "One model's details, template and parameters", "show",
              json_body("Show"), MODEL),
        Route("DELETE", "/api/delete", "Remove a model", "delete", empty(s200="deleted"), MODEL),
        Route("POST", "/api/copy", "Give a model another name", "copy", empty(s200="copied"),
              MODEL),
        Route("POST", "/api/generate", "A completion of a prompt (an empty prompt loads the "
              "model)", "generate", ndjson_or_json("GenerateResponse"), GENERATION),
        Route("POST", "/api/chat", "The next message of a chat (no messages loads the model)",
              "chat", ndjson_or_json("ChatResponse"), GENERATION),
    ),
)  # fmt: skip
