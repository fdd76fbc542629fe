"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) over the serving core.

Content blocks become template messages, tools OpenAI-style function tools; a choice becomes
a message of content blocks, its events Anthropic's SSE events. Errors on these paths take
Anthropic's shape (error_body, used by api/app.py). docs/anthropic.md lists what is supported.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ortserve.api.protocol import GENERATION, MODEL, Protocol, Route, json_body, sse_or_json
from ortserve.api.state import current_state
from ortserve.api.streaming import SSE, exchange_stream, json_response, sse_event
from ortserve.api.validation import parsed_body
from ortserve.errors import InvalidRequest, NotSupportedYet, OrtServeError
from ortserve.options import api_sampling
from ortserve.serving import core
from ortserve.serving.core import Choice, Exchange
from ortserve.serving.events import Retry, TextChunk, ThinkingChunk, ToolCallEvent
from ortserve.serving.images import ImageReader
from ortserve.serving.requests import ChatPrompt, GenerationRequest
from ortserve.serving.tools import ToolSpec, tool_spec

anthropic_bp = Blueprint("anthropic", __name__)

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_THINK = {"enabled": True, "disabled": False}  # adaptive, between_tools: the template's default
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error",
                529: "overloaded_error"}  # fmt: skip
_EMPTY_BLOCKS = {"text": {"text": ""}, "thinking": {"thinking": "", "signature": ""}}


@anthropic_bp.post("/v1/messages")
def messages():
    """The next assistant message, whole or as Anthropic's SSE events."""
    body = parsed_body("messages")
    request = _request(body)
    request.sampling = api_sampling("anthropic", body)
    exchange = core.start(current_state(), request)
    message = _Message(body["model"])
    if body.get("stream"):
        return exchange_stream(exchange, lambda events: message.stream(exchange, events),
                               stream_error, SSE)  # fmt: skip
    return json_response(message.whole(exchange.finish()[0], exchange))


@anthropic_bp.post("/v1/messages/count_tokens")
def count_tokens():
    """The tokens of the prompt a request renders to: template, system and tools included."""
    request = _request(parsed_body("count_tokens"))
    return json_response({"input_tokens": core.count_tokens(current_state(), request)})


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object for an HTTP status."""
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# ---- requests in ---------------------------------------------------------------------------


def _request(body: dict[str, Any]) -> GenerationRequest:
    """The core's request: system and messages as template messages, tools, thinking."""
    _refuse_later(body)
    turns, names = _system(body.get("system")), {}  # names: tool_use id -> its tool's name
    reader = ImageReader.of(current_state().settings)
    for i, message in enumerate(body["messages"]):
        turns += _turns(i, message, names, reader)
    tools = _tools(body.get("tools"), body.get("tool_choice") or {"type": "auto"})
    think = _THINK.get((body.get("thinking") or {}).get("type"))
    fields = {"think": "thinking", **({"images": reader.first} if reader.first else {})}
    return GenerationRequest(model=body["model"], prompts=[ChatPrompt(turns, truncate=False)],
                             kind="chat", tools=tools, think=think, fields=fields)  # fmt: skip


def _refuse_later(body: dict[str, Any]) -> None:
    """What a later version may do: refused, never silently ignored."""
    last = len(body["messages"]) - 1
    if body["messages"][last]["role"] == "assistant":  # the template would close it as a turn
        raise NotSupportedYet("a final assistant message (prefill) is not supported yet",
                              param=f"messages[{last}]")  # fmt: skip
    if (body.get("output_config") or {}).get("format"):
        raise NotSupportedYet("output_config.format is not supported yet",
                              param="output_config.format")  # fmt: skip


def _system(system: str | list[dict] | None) -> list[dict[str, Any]]:
    text = system if isinstance(system, str) else "\n".join(b["text"] for b in system or [])
    return [{"role": "system", "content": text}] if text else []


def _turns(i: int, message: dict[str, Any], names: dict[str, str],
           reader: ImageReader) -> list[dict[str, Any]]:  # fmt: skip
    """One message -> template messages: a user's tool results first, then its images and
    text."""
    role, content = message["role"], message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    texts, calls, thinking, results, images = [], [], [], [], []
    for j, block in enumerate(content):
        where, kind = f"messages[{i}].content[{j}]", block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "image" and role == "user":
            images.append(_image(block.get("source"), f"{where}.source", reader))
        elif kind == "tool_use" and role == "assistant":
            names[block["id"]] = block["name"]
            function = {"name": block["name"], "arguments": block["input"]}
            calls.append({"id": block["id"], "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, names.get(block["tool_use_id"]), where))
        elif kind == "thinking" and role == "assistant":
            thinking.append(block["thinking"])
        elif kind != "redacted_thinking":  # encrypted by Anthropic: nothing a local model reads
            raise _unsupported(kind, f"a {role} message", where)
    turn: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    turn.update({"tool_calls": calls} if calls else {})
    turn.update({"thinking": "".join(thinking)} if thinking else {})
    turn.update({"images": images} if images else {})
    return results + ([turn] if texts or calls or thinking or images else [])


def _image(source: Any, where: str, reader: ImageReader) -> bytes:
    """An image block's source: base64 data, or a URL (fetched where ORTSERVE_FETCH_IMAGES
    allows)."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        return reader.base64(source.get("data"), f"{where}.data")
    if kind == "url":
        return reader.url(source.get("url"), f"{where}.url")
    raise InvalidRequest(f"{where}.type: image sources are base64 or url, not {kind!r}",
                         param=f"{where}.type")  # fmt: skip


def _tool_result(block: dict[str, Any], name: str | None, where: str) -> dict[str, Any]:
    content = block.get("content", "")
    if isinstance(content, list):
        for k, part in enumerate(content):
            if part["type"] != "text" or not isinstance(part.get("text"), str):
                raise _unsupported(part["type"], "a tool_result", f"{where}.content[{k}]")
        content = "\n".join(part["text"] for part in content)
    if block.get("is_error"):  # templates have no error flag: the model reads it in the text
        content = f"Error: {content}"
    result = {"role": "tool", "content": content, "tool_call_id": block["tool_use_id"]}
    return {**result, "name": name} if name else result


def _unsupported(kind: str, holder: str, where: str) -> InvalidRequest:
    if kind == "image":
        why = f"image blocks are not supported in {holder}: only in a user message's content"
    elif kind == "document":
        why = "document blocks are not supported: no model here reads documents"
    else:
        why = f"unsupported content block {kind!r} in {holder}"
    return InvalidRequest(f"{where}: {why}", param=where)


def _tools(tools: list[dict] | None, choice: dict[str, Any]) -> ToolSpec | None:
    """Anthropic's tools and tool_choice as the core's (OpenAI-shaped) ToolSpec."""
    kind = choice["type"]
    if not tools:
        if kind in ("any", "tool"):
            raise InvalidRequest(f'tool_choice "{kind}" needs tools', param="tool_choice")
        return None
    functions = [{"type": "function", "function": _function(tool)} for tool in tools]
    forced = {"type": "function", "function": {"name": choice.get("name")}}
    return tool_spec(functions, _TOOL_CHOICES.get(kind, forced),
                     not choice.get("disable_parallel_tool_use", False),
                     schema_param="tools[{i}].input_schema")  # fmt: skip


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    described = {"description": tool["description"]} if "description" in tool else {}
    return {"name": tool["name"], **described, "parameters": tool["input_schema"]}


# ---- answers out ---------------------------------------------------------------------------


class _Message:
    """One answer in Anthropic's shape: whole (stream:false) or as SSE events, block by block."""

    def __init__(self, model: str):
        self.id = f"msg_{secrets.token_hex(12)}"
        self.model = model
        self.blocks = 0  # content blocks started so far
        self.open: str | None = None  # the type of the block taking deltas
        self.held = ""  # whitespace not sent yet: no blank text block before a tool_use

    def envelope(self, content: list, reason: str | None, usage: dict) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason, "stop_sequence": None,
                "usage": usage}  # fmt: skip

    def whole(self, choice: Choice, exchange: Exchange) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if choice.thoughts:
            content.append({"type": "thinking", "thinking": choice.thoughts, "signature": ""})
        if choice.content and (choice.content.strip() or not choice.calls):
            content.append({"type": "text", "text": choice.content})
        content += [_tool_use(call) for call in choice.calls]
        return self.envelope(content, stop_reason(choice), _usage(exchange))

    def stream(self, exchange: Exchange, events: Iterator) -> Iterator[str]:
        usage = {"input_tokens": exchange.prompt_tokens, "output_tokens": 0}
        yield _sse("message_start", {"message": self.envelope([], None, usage)})
        for _, event in events:
            yield from self._event(event)
        choice = exchange.choices[0]
        if self.held and not choice.calls:  # an answer of whitespace only is still the answer
            yield from self._delta("text", {"type": "text_delta", "text": self.held})
        yield from self._close()
        delta = {"stop_reason": stop_reason(choice), "stop_sequence": None}
        yield _sse("message_delta", {"delta": delta, "usage": _usage(exchange)})
        yield _sse("message_stop", {})

    def _event(self, event: Any) -> Iterator[str]:
        if isinstance(event, ThinkingChunk):
            yield from self._delta("thinking", {"type": "thinking_delta", "thinking": event.text})
        elif isinstance(event, TextChunk) and event.text:
            text, self.held = self.held + event.text, ""
            if self.open != "text" and not text.strip():
                self.held = text
            else:
                yield from self._delta("text", {"type": "text_delta", "text": text})
        elif isinstance(event, ToolCallEvent):  # whole and validated: one delta carries it
            yield from self._close()
            yield from self._start({**_tool_use(event.call), "input": {}})
            arguments = json.dumps(event.call.arguments, ensure_ascii=False)
            yield from self._delta("tool_use", {"type": "input_json_delta",
                                                "partial_json": arguments})  # fmt: skip
            yield from self._close()
        elif isinstance(event, Retry):
            # A tool attempt's text and calls exclude each other (the grammar), so a retried
            # attempt has almost never shown anything; text already sent cannot be taken back.
            if self.blocks:
                raise OrtServeError("the model's tool call failed validation after its text "
                                    "was streamed; send the request again")  # fmt: skip
            self.held = ""

    def _delta(self, kind: str, delta: dict[str, Any]) -> Iterator[str]:
        if self.open != kind:
            yield from self._close()
            yield from self._start({"type": kind, **_EMPTY_BLOCKS.get(kind, {})})
        yield _sse("content_block_delta", {"index": self.blocks - 1, "delta": delta})

    def _start(self, block: dict[str, Any]) -> Iterator[str]:
        yield _sse("content_block_start", {"index": self.blocks, "content_block": block})
        self.blocks += 1
        self.open = block["type"]

    def _close(self) -> Iterator[str]:
        if self.open is not None:
            yield _sse("content_block_stop", {"index": self.blocks - 1})
            self.open = None


def stop_reason(choice: Choice) -> str:
    """tool_use for validated calls, else the engine's reason.

    The engine cuts a stop string without saying which one matched (or whether EOS came
    first), so a stop sequence ends as end_turn with stop_sequence null (docs/anthropic.md).
    """
    if choice.calls:
        return "tool_use"
    return _STOP_REASONS.get(choice.finished.reason, "end_turn")


def _tool_use(call) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def _usage(exchange: Exchange) -> dict[str, int]:
    used = exchange.usage()  # every attempt of a retried tool call counted
    return {"input_tokens": used.prompt_tokens, "output_tokens": used.completion_tokens}


def _sse(name: str, data: dict[str, Any]) -> str:
    return sse_event({"type": name, **data}, event=name)


def stream_error(exc: OrtServeError) -> str:
    """Anthropic's error event, which ends a failed stream."""
    return _sse("error", error_body(exc.status, exc.message))


PROTOCOL = Protocol(
    "anthropic", anthropic_bp, rank=30, owns=("/v1/messages",),
    error_body=lambda status, message, *_: error_body(status, message),
    error_schema="AnthropicError", stream_error=stream_error,
    generation_paths=("/v1/messages",), cors_headers=("Anthropic-Version", "Anthropic-Beta"),
    note="Anthropic's Messages API (/v1/messages): errors are Anthropic's "
    '{"type": "error", "error": {type, message}}.',
    routes=(
        Route("POST", "/v1/messages", "A message (Anthropic's Messages API)", "messages",
              sse_or_json("Message"), GENERATION),
        Route("POST", "/v1/messages/count_tokens", "The tokens of a Messages request's prompt",
              "count_tokens", json_body("TokenCount"), MODEL),
    ),
)  # fmt: skip
