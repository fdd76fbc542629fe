"""Ollama's native API (/api/*): thin routes over the runtime and the library."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from flask import Blueprint, Response

from ortserve import __version__
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response, ndjson_line, rfc3339, stream_response
from ortserve.api.structured import GuidedTurn, native_schema, start_turn
from ortserve.api.tools import (
    ToolCallEvent,
    model_format,
    native_call,
    start_tool_turn,
    template_calls,
    tool_spec,
)
from ortserve.api.validation import keep_alive_seconds, parsed_body, read_json, validate
from ortserve.engine.guided import Retry
from ortserve.engine.types import Finished, TextChunk
from ortserve.errors import (
    InvalidRequest,
    NotSupportedYet,
    OrtServeError,
    ServerBusy,
)
from ortserve.library import Library, ModelInfo

log = logging.getLogger("ortserve.api")

native_bp = Blueprint("native", __name__)

# Fields a later version implements, and when a value asks for them: refused, never ignored.
_LATER: dict[str, Callable[[Any], bool]] = {
    "images": bool,
    "suffix": bool,
    "template": bool,
    "context": bool,
    "think": lambda v: v is not False,
    "logprobs": bool,
    "top_logprobs": bool,
}
_MESSAGE_LATER = ("images",)


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
    return json_response({"models": runtime.ps() if runtime is not None else []})


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
    if state.started_runtime is not None:
        state.started_runtime.unload(info.name)  # a deleted model must stop answering
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
    _refuse_later(body)
    keep_alive = keep_alive_seconds(body)
    if not body.get("prompt"):
        return _load_or_unload(body, keep_alive, "generate")
    return _run(body, keep_alive, "generate", _generate_tokens)


@native_bp.post("/api/chat")
def chat():
    body = parsed_body("chat")
    _refuse_later(body)
    keep_alive = keep_alive_seconds(body)
    if not body.get("messages"):
        return _load_or_unload(body, keep_alive, "chat")
    return _run(body, keep_alive, "chat", _chat_tokens)


# ---- request checks ------------------------------------------------------------------------


def _model_alias(body: dict[str, Any]) -> dict[str, Any]:
    """Older clients send `name` where newer ones send `model` (Ollama accepts both)."""
    if "model" not in body and "name" in body:
        body = {**body, "model": body.pop("name")}
    return body


def _refuse_later(body: dict[str, Any]) -> None:
    for field, asks in _LATER.items():
        if field in body and asks(body[field]):
            raise NotSupportedYet(f'"{field}" is not supported yet', param=field)
    for i, message in enumerate(body.get("messages") or []):
        for field in _MESSAGE_LATER:
            if message.get(field):
                param = f"messages[{i}].{field}"
                raise NotSupportedYet(f'"{param}" is not supported yet', param=param)


def _require_completion(library: Library, name: str, kind: str) -> ModelInfo:
    """The model, checked before loading: an embedding model cannot generate or chat."""
    info = library.get(name)
    if "completion" not in info.capabilities:
        raise InvalidRequest(f'"{info.name}" does not support {kind}', param="model")
    return info


# ---- generate and chat ---------------------------------------------------------------------


def _load_or_unload(body: dict[str, Any], keep_alive: float | None, kind: str) -> Response:
    """An empty prompt loads the model; with keep_alive 0 it unloads it instead."""
    state = current_state()
    name = body["model"]
    if keep_alive == 0:
        state.library.get(name)  # 404 for a model that does not exist
        if state.started_runtime is not None:
            state.started_runtime.unload(name)
        reason = "unload"
    else:
        _require_completion(state.library, name, kind)
        loaded = state.runtime.acquire(name, keep_alive)
        state.runtime.release(loaded, keep_alive)
        reason = "load"
    reply = _Reply(name, kind)
    return json_response({**reply.chunk(""), "done": True, "done_reason": reason})


def _run(body: dict[str, Any], keep_alive: float | None, kind: str, tokens_of) -> Response:
    """Load the model, build and encode the prompt, start the turn, answer."""
    started = time.perf_counter_ns()
    state = current_state()
    schema = native_schema(body)
    spec = tool_spec(body) if kind == "chat" else None
    if spec is not None and schema is not None and spec.choice != "none":
        raise InvalidRequest("tools and format cannot be combined", param="tools")
    _require_completion(state.library, body["model"], kind)
    runtime = state.runtime
    loaded = runtime.acquire(body["model"], keep_alive)
    try:
        options = _options(body, loaded)
        tokens = tokens_of(body, loaded, options)
        if spec is not None:
            spec.fmt = model_format(loaded)
            turn = start_tool_turn(loaded, tokens, options, spec, state.settings.format_retries)
        else:
            turn = start_turn(loaded, tokens, options, schema, state.settings)
    except BaseException:
        runtime.release(loaded, keep_alive, failed=True)
        raise
    exchange = _Exchange(runtime, loaded, keep_alive, turn, _Reply(body["model"], kind), started)
    if body.get("stream", True):
        return _stream(exchange)
    return _collect(exchange)


def _options(body: dict[str, Any], loaded):
    from ortserve.engine.sampling import resolve_options

    return resolve_options(
        body.get("options"),
        loaded.info.manifest.get("parameters"),
        context_length=loaded.context_length,
        max_tokens=current_state().settings.max_tokens,
    )


def _generate_tokens(body: dict[str, Any], loaded, options) -> list[int]:
    """The prompt of /api/generate: raw, or in the model's template with its system prompt."""
    from ortserve.engine.prompts import build_chat_prompt, build_generate_prompt, template_of

    template = template_of(loaded)
    raw = body.get("raw", False)
    system = body.get("system") or loaded.info.manifest.get("system")
    examples = loaded.info.manifest.get("messages") or []
    encoder = _Encoder(loaded)
    if examples and not raw and template is not None:
        # Modelfile MESSAGEs precede the prompt, as in Ollama; one prompt is never cut.
        messages = [*examples, {"role": "user", "content": body["prompt"]}]
        text, _ = build_chat_prompt(template, messages, system=system, tools=None,
                                    count_tokens=encoder.count, num_ctx=options.num_ctx,
                                    truncate=False)  # fmt: skip
    else:
        text, _ = build_generate_prompt(template, body["prompt"], system=system, raw=raw,
                                        count_tokens=encoder.count, num_ctx=options.num_ctx)  # fmt: skip
    return encoder.encode(text)


def _chat_tokens(body: dict[str, Any], loaded, options) -> list[int]:
    """The prompt of /api/chat: Modelfile MESSAGEs, then the conversation, in the template."""
    from ortserve.engine.prompts import build_chat_prompt, template_of

    examples = loaded.info.manifest.get("messages") or []
    messages = [*examples, *(_chat_message(i, m) for i, m in enumerate(body["messages"]))]
    encoder = _Encoder(loaded)
    text, _ = build_chat_prompt(
        template_of(loaded),
        messages,
        system=loaded.info.manifest.get("system"),
        tools=body.get("tools") or None,
        count_tokens=encoder.count,
        num_ctx=options.num_ctx,
        truncate=body.get("truncate", True),
    )
    return encoder.encode(text)


def _chat_message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """A message as templates take it: content a string, tool calls' arguments objects."""
    message = {**message, "content": message.get("content") or ""}
    if message.get("tool_calls"):
        message["tool_calls"] = template_calls(message["tool_calls"], f"messages[{i}].tool_calls")
    if message.get("role") == "tool" and "tool_name" in message:
        message.setdefault("name", message["tool_name"])
    return message


class _Encoder:
    """Counts tokens for the prompt builder and keeps the last result: one encode per prompt."""

    def __init__(self, loaded):
        self._loaded = loaded
        self._text: str | None = None
        self._ids: list[int] = []

    def count(self, text: str) -> int:
        if self._loaded.exceeds_context(text):  # too long to fit: say so without tokenizing
            return self._loaded.min_tokens(text)
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        if text != self._text:
            self._text, self._ids = text, self._loaded.encode(text)
        return self._ids


class _Reply:
    """The shape of /api/generate and /api/chat objects."""

    def __init__(self, model: str, kind: str):
        self.model = model
        self.kind = kind

    def chunk(self, text: str, calls: list | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": rfc3339()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
            if calls:
                body["message"]["tool_calls"] = [native_call(c) for c in calls]
        else:
            body["response"] = text
        body["done"] = False
        return body


class _Exchange:
    """One running turn: its reply shape, its timing, and its clean-up (exactly once)."""

    def __init__(self, runtime, loaded, keep_alive, turn, reply: _Reply, started_ns: int):
        self.runtime = runtime
        self.loaded = loaded
        self.keep_alive = keep_alive
        self.turn = turn
        self.reply = reply
        self.started_ns = started_ns
        self.finished: Finished | None = None
        self._closed = False

    @property
    def attempts(self) -> int | None:
        """How many attempts a structured answer took (None for a plain turn)."""
        return self.turn.attempts if isinstance(self.turn, GuidedTurn) else None

    def retry(self, event: Retry) -> dict[str, Any]:
        """The object that tells a client to discard the text streamed so far."""
        reply = self.reply
        return {"model": reply.model, "created_at": rfc3339(),
                "retry": {"attempt": event.attempt, "reason": event.reason}, "done": False}  # fmt: skip

    def final(self, finished: Finished, text: str = "", calls=None) -> dict[str, Any]:
        """The done object with Ollama's metrics (all durations in nanoseconds)."""
        self.finished = finished
        attempts = {} if self.attempts is None else {"attempts": self.attempts}
        return {
            **self.reply.chunk(text, calls),
            "done": True,
            "done_reason": finished.reason,
            "total_duration": time.perf_counter_ns() - self.started_ns,
            "load_duration": self.loaded.load_duration_ns,
            "prompt_eval_count": finished.usage.prompt_tokens,
            "prompt_eval_duration": finished.prompt_eval_duration_ns,
            "eval_count": finished.usage.generated_tokens,
            "eval_duration": finished.eval_duration_ns,
            **attempts,
        }

    def close(self) -> None:
        """Cancel an unfinished turn (the client left) and release the model, once."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.finished is None:
                self.turn.cancel()
        finally:
            self.runtime.release(self.loaded, self.keep_alive)


def _cancelled() -> ServerBusy:
    return ServerBusy("generation was cancelled: the model was unloaded or the server is stopping")


def _stream(exchange: _Exchange) -> Response:
    """NDJSON, one object per chunk; an error before any output keeps its HTTP status."""
    events = iter(exchange.turn)
    try:
        first = next(events)
    except BaseException:
        exchange.close()
        raise
    lines = _lines(exchange, itertools.chain([first], events))
    return stream_response(lines, on_close=exchange.close)


def _lines(exchange: _Exchange, events: Iterator[TextChunk | Finished]) -> Iterator[str]:
    try:
        for event in events:
            if isinstance(event, TextChunk):
                yield ndjson_line(exchange.reply.chunk(event.text))
                continue
            if isinstance(event, ToolCallEvent):
                yield ndjson_line(exchange.reply.chunk("", [event.call]))
                continue
            if isinstance(event, Retry):
                yield ndjson_line(exchange.retry(event))
                continue
            if event.reason == "cancelled":
                raise _cancelled()
            yield ndjson_line(exchange.final(event))
            return
        raise OrtServeError("generation ended without finishing")
    except OrtServeError as exc:  # the status is sent already: the error is the last line
        yield ndjson_line({"error": exc.message})
    except Exception:
        log.exception("unexpected error while streaming")
        yield ndjson_line({"error": "internal error"})
    finally:
        exchange.close()  # also runs on GeneratorExit: the client went away


def _collect(exchange: _Exchange) -> Response:
    """stream:false: the whole text in one application/json object."""
    try:
        parts, calls = [], []
        for event in exchange.turn:
            if isinstance(event, TextChunk):
                parts.append(event.text)
            elif isinstance(event, ToolCallEvent):
                calls.append(event.call)
            elif isinstance(event, Retry):
                parts.clear()  # a failed attempt's text is not the answer
            elif event.reason == "cancelled":
                raise _cancelled()
            else:
                final = exchange.final(event, "".join(parts), calls)
                return _with_attempts(exchange, final)
        raise OrtServeError("generation ended without finishing")
    finally:
        exchange.close()


def _with_attempts(exchange: _Exchange, body: dict[str, Any]) -> Response:
    """The stream:false response; X-Ortserve-Attempts on a structured answer."""
    response = json_response(body)
    if exchange.attempts is not None:
        response.headers["X-Ortserve-Attempts"] = str(exchange.attempts)
    return response


# ---- library entries -----------------------------------------------------------------------


def tag_entry(info: ModelInfo) -> dict[str, Any]:
    """One /api/tags model."""
    return {
        "name": info.name,
        "model": info.name,
        "modified_at": _timestamp(info.modified),
        "size": info.size,
        "digest": info.digest.removeprefix("sha256-"),
        "details": details(info),
        "capabilities": info.capabilities,
    }


def show_entry(info: ModelInfo) -> dict[str, Any]:
    """The /api/show body; empty fields are left out, as Ollama's omitempty does."""
    from ortserve.library.modelfile import render_modelfile

    manifest = info.manifest
    license_ = manifest.get("license") or ""
    body = {
        "license": "\n".join(license_) if isinstance(license_, list) else license_,
        "modelfile": render_modelfile(info),
        "parameters": parameter_text(manifest.get("parameters") or {}),
        "template": manifest.get("template") or "",
        "system": manifest.get("system") or "",
        "details": details(info),
        "messages": manifest.get("messages") or [],
        "model_info": model_info(info),
        "capabilities": info.capabilities,
        "modified_at": _timestamp(info.modified),
    }
    return {key: value for key, value in body.items() if value not in ("", [], None)}


def details(info: ModelInfo) -> dict[str, Any]:
    d = info.details
    family = d.get("family", "")
    out = {
        "parent_model": "",
        "format": d.get("format", ""),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": d.get("parameter_size", ""),
        "quantization_level": d.get("quantization_level") or d.get("quantization", ""),
    }
    out.update({k: d[k] for k in ("context_length", "embedding_length") if d.get(k)})
    return out


def model_info(info: ModelInfo) -> dict[str, Any]:
    """Ollama's GGUF-style keys: general.architecture, <arch>.context_length, ..."""
    rest = dict(info.details)
    arch = rest.pop("family", None) or "unknown"
    out: dict[str, Any] = {"general.architecture": arch}
    if "parameter_count" in rest:
        out["general.parameter_count"] = rest.pop("parameter_count")
    for key in ("context_length", "embedding_length"):
        if key in rest:
            out[f"{arch}.{key}"] = rest.pop(key)
    out.update({f"general.{key}": value for key, value in sorted(rest.items())})
    return out


def parameter_text(parameters: dict[str, Any]) -> str:
    """Ollama's text form: `key` padded to 30, a space, the value (strings quoted)."""
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(item, ensure_ascii=False)}")
    return "\n".join(lines)


def _timestamp(when: datetime) -> str:
    seconds = int(when.timestamp())
    return rfc3339(seconds * 1_000_000_000 + when.microsecond * 1000)
