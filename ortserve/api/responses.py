"""OpenAI's Responses API (/v1/responses) over the serving core: items in, items and events out.

Responses are stored (in memory, serving/store.py, or under the library,
serving/response_files.py: ServerState.responses picks) for GET, DELETE and
previous_response_id; errors take OpenAI's shape in api/app.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ortserve.api.openai import error_body as openai_error
from ortserve.api.openai import response_format_schema
from ortserve.api.protocol import (
    GENERATION,
    GUARDED,
    Protocol,
    Route,
    json_body,
    path_parameter,
    sse_or_json,
)
from ortserve.api.state import current_state
from ortserve.api.streaming import (
    SSE,
    answer_response,
    exchange_stream,
    json_response,
    sse_event,
)
from ortserve.api.validation import parsed_body
from ortserve.engine.toolcalls import ToolCall
from ortserve.errors import InvalidRequest, NotSupportedYet, OrtServeError
from ortserve.options import api_sampling
from ortserve.serving import core, images
from ortserve.serving.core import Exchange
from ortserve.serving.events import Finished, Retry, TextChunk, ThinkingChunk, ToolCallEvent
from ortserve.serving.requests import ChatPrompt, GenerationRequest, think_from_effort
from ortserve.serving.store import (
    ResponseStore,
    StoredResponse,
    call_item,
    chat_tool_choice,
    chat_tools,
    incomplete,
    item_messages,
    message_item,
    new_id,
    output_items,
    reasoning_item,
    response_object,
    text_part,
    usage_object,
)
from ortserve.serving.tools import tool_spec

responses_bp = Blueprint("responses", __name__)

# Fields that ask for what this server does not do: refused, never silently ignored.
_LATER = ("background", "conversation", "prompt", "top_logprobs")
# The event name and extra fields of each streamed item's text.
_TEXT = {"message": ("output_text", {"logprobs": []}), "reasoning": ("reasoning_text", {})}
# Core errors name the core's fields; a client of this API knows them by these.
_PARAMS = {"messages": "input"}


def _store() -> ResponseStore:
    return current_state().responses


# ---- routes --------------------------------------------------------------------------------


@responses_bp.post("/v1/responses")
def create():
    """A model response to `input`, after the stored conversation of previous_response_id."""
    body = parsed_body("responses")
    for field in _LATER:
        if body.get(field):
            raise NotSupportedYet(f'"{field}" is not supported yet', param=field)
    store = _store()
    before: list[dict] = []
    if "previous_response_id" in body:
        stored = store.get(body["previous_response_id"], "previous_response_id")
        before = images.restored(stored.conversation)
    reader = images.ImageReader.of(current_state().settings)
    conversation = [*before, *item_messages(body["input"], "input", before, reader)]
    shape = _Shape(body, store, conversation)
    request = _request(body, conversation)
    request.fields["images"] = reader.first or "input"  # or the stored conversation's
    exchange = _start(request)
    if body.get("stream"):
        events = _Events(shape, exchange)
        return exchange_stream(exchange, events.render, events.error, SSE)
    choice = exchange.finish()[0]
    status = "incomplete" if incomplete(choice) else "completed"
    return answer_response(shape.final(output_items(choice), status, exchange), exchange)


@responses_bp.get("/v1/responses/<response_id>")
def retrieve(response_id: str):
    return json_response(_store().get(response_id).response)


@responses_bp.delete("/v1/responses/<response_id>")
def delete(response_id: str):
    _store().delete(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


# ---- requests in ---------------------------------------------------------------------------


def _request(body: dict[str, Any], conversation: list[dict]) -> GenerationRequest:
    """The core's request: instructions first, tools, text.format, sampling, reasoning."""
    instructions = body.get("instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    fmt = (body.get("text") or {}).get("format") or {}
    schema = response_format_schema(fmt.get("type", "text"), fmt.get("schema"),
                                    param="text.format", schema_param="text.format.schema")  # fmt: skip
    tools = tool_spec(chat_tools(body.get("tools")), chat_tool_choice(body.get("tool_choice")),
                      body.get("parallel_tool_calls", True))  # fmt: skip
    sampling = api_sampling("openai", body)
    # truncation "auto" drops the oldest turns to fit the context; "disabled" refuses (400).
    prompt = ChatPrompt([*system, *conversation], truncate=body.get("truncation") == "auto")
    return GenerationRequest(model=body["model"], prompts=[prompt], kind="chat",
                             sampling=sampling, schema=schema, tools=tools,
                             think=_think(body),
                             fields={"schema": "text.format", "think": "reasoning.effort"})  # fmt: skip


def _think(body: dict[str, Any]) -> bool | None:
    """reasoning.effort: none or minimal turn thinking off, any other level on."""
    return think_from_effort((body.get("reasoning") or {}).get("effort"))


def _start(request: GenerationRequest) -> Exchange:
    """core.start, its 400s naming this API's fields."""
    try:
        return core.start(current_state(), request)
    except InvalidRequest as exc:
        param = _PARAMS.get((exc.param or "").partition("[")[0].partition(".")[0])
        if param is None:
            raise
        raise InvalidRequest(f"{param}: {exc.message}", param=param, code=exc.code) from None


# ---- answers out ---------------------------------------------------------------------------


class _Shape:
    """One response's id and the fields it echoes; stores it when it ends (store: true)."""

    def __init__(self, body: dict[str, Any], store: ResponseStore, conversation: list[dict]):
        self.body, self.store, self.conversation = body, store, conversation
        self.id = new_id("resp")
        self.created_at = int(time.time())

    def response(self, output: list[dict], status: str, usage: dict | None = None) -> dict:
        return response_object(self.id, self.created_at, self.body, output, status, usage)

    def final(self, output: list[dict], status: str, exchange: Exchange) -> dict:
        """The finished response, stored (with its conversation) unless store is false."""
        response = self.response(output, status, usage_object(exchange.usage()))
        if self.body.get("store", True):
            answer = item_messages(output, "output", self.conversation)
            conversation = images.portable([*self.conversation, *answer])  # JSON, as files
            self.store.put(StoredResponse(response, conversation))
        return response


class _Events:
    """A streamed response: the core's events as Responses events, numbered in order.

    Text and thinking open a message or reasoning item and stream into it; a call arrives
    whole (validated) and is sent as one item. A Retry ends the open item as "incomplete"
    (with `ortserve_retry`, and no output_text.done, so the SDK never parses its text) and
    drops it from the final output; output_index keeps counting, as each index names one item.
    """

    def __init__(self, shape: _Shape, exchange: Exchange):
        self.shape, self.exchange = shape, exchange
        self.sequence = 0
        self.output: list[dict] = []  # the finished items the final response holds
        self.added = 0  # items added so far: the next item's output_index
        self.open: dict | None = None  # the message or reasoning item streaming now
        self.parts: list[str] = []
        self.answered = False  # a message item was opened (since the last Retry)
        self.held = ""  # whitespace before any message text: calls may follow, and no text

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return sse_event({"type": kind, **fields, "sequence_number": self.sequence - 1}, kind)

    def error(self, exc: OrtServeError) -> str:
        return self.event("error", code=exc.code or exc.type, message=exc.message,
                          param=exc.param)  # fmt: skip

    def render(self, events: Iterator) -> Iterator[str]:
        for kind in ("response.created", "response.in_progress"):
            yield self.event(kind, response=self.shape.response([], "in_progress"))
        for _, event in events:
            if isinstance(event, TextChunk) and event.text:
                yield from self._stream("message", event.text)
            elif isinstance(event, ThinkingChunk):
                yield from self._stream("reasoning", event.text)
            elif isinstance(event, ToolCallEvent):
                yield from self._close("completed")
                yield from self._call(event.call)
            elif isinstance(event, Retry):
                yield from self._close("incomplete", retry=event)
                self.answered, self.held = False, ""
            elif isinstance(event, Finished):
                yield from self._finish()

    def _finish(self) -> Iterator[str]:
        choice = self.exchange.choices[0]
        if not choice.calls and not self.answered:  # an answer without calls has its message
            yield from self._stream("message", "", hold=False)
        status = "incomplete" if incomplete(choice) else "completed"
        yield from self._close(status)
        response = self.shape.final(self.output, status, self.exchange)
        yield self.event(f"response.{status}", response=response)

    def _stream(self, kind: str, text: str, hold: bool = True) -> Iterator[str]:
        if (self.open or {}).get("type") != kind:
            if kind == "message":
                text, self.held = self.held + text, ""
                if hold and not text.strip():
                    self.held = text
                    return
            yield from self._close("completed")
            yield from self._open(kind)
        if text:
            self.parts.append(text)
            name, extra = _TEXT[kind]
            yield self.event(f"response.{name}.delta", **self._where(), delta=text, **extra)

    def _open(self, kind: str) -> Iterator[str]:
        if kind == "message":
            item, self.answered = message_item(new_id("msg"), None, "in_progress"), True
        else:
            item = reasoning_item(new_id("rs"), None)
        self.open, self.parts = item, []
        self.added += 1
        yield self.event("response.output_item.added", output_index=self.added - 1, item=item)
        yield self.event("response.content_part.added", **self._where(), part=text_part(kind, ""))

    def _close(self, status: str, retry: Retry | None = None) -> Iterator[str]:
        """End the open item; a retried one is sent as incomplete and left out of the output."""
        item, text, ours = self.open, "".join(self.parts), {}
        if item is None:
            return
        if item["type"] == "message":
            done = message_item(item["id"], text, "incomplete" if retry else status)
        else:
            done = reasoning_item(item["id"], text)
        if retry is None:
            name, extra = _TEXT[item["type"]]
            yield self.event(f"response.{name}.done", **self._where(), text=text, **extra)
            yield self.event("response.content_part.done", **self._where(),
                             part=done["content"][0])  # fmt: skip
            self.output.append(done)
        else:
            ours = {"ortserve_retry": {"attempt": retry.attempt, "reason": retry.reason}}
        yield self.event("response.output_item.done", output_index=self.added - 1, item=done,
                         **ours)  # fmt: skip
        self.open = None

    def _call(self, call: ToolCall) -> Iterator[str]:
        item = call_item(new_id("fc"), call, "in_progress")
        where = {"item_id": item["id"], "output_index": self.added}
        self.added += 1
        yield self.event("response.output_item.added", output_index=where["output_index"],
                         item={**item, "arguments": ""})  # fmt: skip
        yield self.event("response.function_call_arguments.delta", **where,
                         delta=item["arguments"])  # fmt: skip
        yield self.event("response.function_call_arguments.done", **where, name=call.name,
                         arguments=item["arguments"])  # fmt: skip
        done = {**item, "status": "completed"}
        yield self.event("response.output_item.done", output_index=where["output_index"],
                         item=done)  # fmt: skip
        self.output.append(done)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": self.added - 1, "content_index": 0}


def stream_error(exc: OrtServeError) -> str:
    """The Responses API's error event, which ends a failed stream."""
    body = {"type": "error", "code": exc.type, "message": exc.message, "param": None}
    return sse_event(body, event="error")


_RESPONSE_ID = path_parameter("response_id", "a stored response's id (resp_...)")

PROTOCOL = Protocol(
    "responses", responses_bp, rank=21, owns=("/v1/responses",), error_body=openai_error,
    error_schema="OpenAIError", stream_error=stream_error, generation_paths=("/v1/responses",),
    routes=(
        Route("POST", "/v1/responses", "A model response (Responses API)", "responses",
              sse_or_json("Response"), GENERATION),
        Route("GET", "/v1/responses/{response_id}", "A stored response", None,
              json_body("Response"), (*GUARDED, 404), (_RESPONSE_ID,)),
        Route("DELETE", "/v1/responses/{response_id}", "Delete a stored response", None,
              json_body("ResponseDeleted"), (*GUARDED, 404), (_RESPONSE_ID,)),
    ),
)  # fmt: skip
