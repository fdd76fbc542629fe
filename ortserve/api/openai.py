"""OpenAI's API (/v1/*): chat completions, completions and models over the runtime.

Embeddings live in their own blueprint. Errors take OpenAI's shape in api/app.py.
"""

from __future__ import annotations

import abc
import functools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response

from ortserve import __version__
from ortserve.api.state import current_state
from ortserve.api.streaming import SSE, json_response, sse_events, stream_response
from ortserve.api.structured import GuidedTurn, attempt_usages, openai_schema, start_turn
from ortserve.api.tools import (
    ToolCallEvent,
    ToolSpec,
    model_format,
    openai_call,
    start_tool_turn,
    template_calls,
    tool_spec,
)
from ortserve.api.validation import parsed_body
from ortserve.engine.guided import Retry
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.errors import InvalidRequest, NotSupportedYet, OrtServeError, ServerBusy
from ortserve.library import Library, ModelInfo
from ortserve.library.names import ModelName

log = logging.getLogger("ortserve.api")

openai_bp = Blueprint("openai", __name__)

# Choices one request may ask for (n, times the prompts of /v1/completions): each is a turn
# in the batch, and one request must not take every slot of the model.
MAX_CHOICES = 8
SYSTEM_FINGERPRINT = f"fp_ortserve_{__version__}"
# Default max_tokens of OpenAI's /v1/completions (chat completions have none).
COMPLETIONS_MAX_TOKENS = 16

_NO_LOGPROBS = "onnxruntime-genai's engine does not return log probabilities"
# The legacy function-calling fields (use tools), and when a value asks for them.
_CHAT_LATER: dict[str, Callable[[Any], bool]] = {
    "functions": bool,
    "function_call": lambda v: v != "none",
}
_MESSAGE_LATER = ("function_call",)

TokensOf = Callable[[Any, GenerationOptions], list[list[int]]]


# ---- routes --------------------------------------------------------------------------------


@openai_bp.post("/v1/chat/completions")
def chat_completions():
    """The next assistant message of a conversation, n times."""
    body = parsed_body("chat_completions")
    _refuse_logprobs(body)
    for field, asks in _CHAT_LATER.items():
        if field in body and asks(body[field]):
            raise NotSupportedYet(f'"{field}" is not supported yet', param=field)
    schema = openai_schema(body)
    spec = tool_spec(body)
    if spec is not None and schema is not None and spec.choice != "none":
        raise InvalidRequest("tools and response_format cannot be combined", param="tools")
    messages = chat_messages(body["messages"])
    tokens_of = functools.partial(_chat_prompts, messages, spec)
    return _run(body, _ChatShape(body["model"]), tokens_of, schema, spec)


@openai_bp.post("/v1/completions")
def completions():
    """Continuations of raw prompts (no chat template)."""
    body = parsed_body("completions")
    _refuse_logprobs(body)
    if body.get("suffix"):
        raise InvalidRequest("suffix is not supported: no model here does infilling",
                             param="suffix")  # fmt: skip
    if body.get("best_of", 1) != 1:
        raise InvalidRequest("best_of is not supported (use n)", param="best_of")
    prompts = _prompt_list(body["prompt"], body.get("n", 1))
    body = {"max_tokens": COMPLETIONS_MAX_TOKENS, **body}
    echoed = [prompt for prompt, _ in prompts] if body.get("echo") else None
    shape = _CompletionShape(body["model"], echoed, body.get("n", 1))
    return _run(body, shape, functools.partial(_completion_prompts, prompts))


@openai_bp.get("/v1/models")
def models():
    """Every model in the library."""
    entries = [model_entry(info) for info in current_state().library.list()]
    return json_response({"object": "list", "data": entries})


@openai_bp.get("/v1/models/<path:model>")
def model(model: str):
    """One model; 404 model_not_found when the library has no such model."""
    return json_response(model_entry(current_state().library.get(model)))


def model_entry(info: ModelInfo) -> dict[str, Any]:
    """One model in OpenAI's shape; owned_by is its namespace ("library" by default)."""
    return {
        "id": info.name,
        "object": "model",
        "created": int(info.modified.timestamp()),
        "owned_by": ModelName.parse(info.name).namespace,
    }


# ---- requests -> prompts -------------------------------------------------------------------


def _prompt_list(prompt: str | list[str], n: int) -> list[tuple[str, str]]:
    """(prompt, its param name) for each prompt; prompts times n is within MAX_CHOICES."""
    if isinstance(prompt, str):
        return [(prompt, "prompt")]
    if len(prompt) * n > MAX_CHOICES:
        raise InvalidRequest(f"at most {MAX_CHOICES} choices per request: {len(prompt)} "
                             f"prompts times n={n} is {len(prompt) * n}", param="prompt")  # fmt: skip
    return [(text, f"prompt[{i}]") for i, text in enumerate(prompt)]


def _refuse_logprobs(body: dict[str, Any]) -> None:
    """logprobs cannot be honoured: refuse them rather than answer without them."""
    for field in ("logprobs", "top_logprobs"):
        if body.get(field):  # false and 0 ask for nothing
            raise InvalidRequest(f"{field} is not supported: {_NO_LOGPROBS}", param=field)


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as the prompt builder takes them: string content, known roles."""
    converted = []
    for i, message in enumerate(messages):
        for field in _MESSAGE_LATER:
            if message.get(field):
                param = f"messages[{i}].{field}"
                raise NotSupportedYet(f'"{param}" is not supported yet', param=param)
        # "developer" is what OpenAI's newer models call the system role.
        role = "system" if message["role"] == "developer" else message["role"]
        content = _content_text(message.get("content") or "", f"messages[{i}].content")
        extra = {k: message[k] for k in ("name", "tool_call_id") if k in message}
        if message.get("tool_calls"):
            extra["tool_calls"] = template_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        converted.append({"role": role, "content": content, **extra})
    return converted


def _content_text(content: str | list[dict[str, Any]], where: str) -> str:
    """Content given as parts -> one string; only text parts, since no model here has vision."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        if part["type"] == "text":
            texts.append(part["text"])
        elif part["type"] == "image_url":
            raise InvalidRequest(f"{param}: this model does not support images", param=param)
        else:
            raise InvalidRequest(f"{param}: unsupported content part {part['type']!r}", param=param)
    return "\n".join(texts)


def _chat_prompts(messages: list[dict], spec: ToolSpec | None, loaded,
                  options: GenerationOptions) -> list[list[int]]:  # fmt: skip
    """The conversation in the model's template, never truncated (OpenAI does not truncate)."""
    from ortserve.engine.prompts import build_chat_prompt, template_of

    manifest = loaded.info.manifest
    encode = _encoder(loaded)
    text, _ = build_chat_prompt(
        template_of(loaded),
        [*(manifest.get("messages") or []), *messages],
        system=manifest.get("system"),
        tools=spec.tools if spec is not None else None,
        count_tokens=_counter(loaded, encode),
        num_ctx=options.num_ctx,
        truncate=False,
    )
    return [encode(text)]


def _completion_prompts(prompts: list[tuple[str, str]], loaded, options) -> list[list[int]]:
    """The tokens of every /v1/completions prompt."""
    return [_prompt_tokens(prompt, param, loaded, options) for prompt, param in prompts]


def _prompt_tokens(prompt: str, param: str, loaded, options: GenerationOptions) -> list[int]:
    """A /v1/completions prompt, raw (no chat template), as OpenAI's completions take it."""
    from ortserve.engine.prompts import build_generate_prompt

    if not prompt:
        raise InvalidRequest(f"{param} is empty", param=param)
    encode = _encoder(loaded)
    build_generate_prompt(None, prompt, system=None, raw=True,
                          count_tokens=_counter(loaded, encode), num_ctx=options.num_ctx)  # fmt: skip
    return encode(prompt)


def _counter(loaded, encode: Callable[[str], list[int]]) -> Callable[[str], int]:
    """Token counts for the prompt builder; a text that cannot fit is not tokenized."""

    def count(text: str) -> int:
        if loaded.exceeds_context(text):
            return loaded.min_tokens(text)
        return len(encode(text))

    return count


def _encoder(loaded) -> Callable[[str], list[int]]:
    """loaded.encode that remembers its last text: the prompt is counted, then encoded."""
    last: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in last:
            last.clear()
            last[text] = loaded.encode(text)
        return last[text]

    return encode


def _require_completion(library: Library, name: str, kind: str) -> None:
    """Checked before loading: an embedding model cannot chat or complete."""
    info = library.get(name)
    if "completion" not in info.capabilities:
        raise InvalidRequest(
            f'model does not support {kind}: "{info.name}" does not generate text', param="model"
        )


# ---- running the turns ---------------------------------------------------------------------


def _run(body: dict[str, Any], shape: _Shape, tokens_of: TokensOf, schema: dict | None = None,
         spec: ToolSpec | None = None) -> Response:  # fmt: skip
    """Load the model, submit every choice's turn, answer as one body or as SSE."""
    from ortserve.engine.sampling import openai_options

    state = current_state()
    _require_completion(state.library, body["model"], shape.kind)
    runtime = state.runtime
    loaded = runtime.acquire(body["model"])
    exchange = _Exchange(runtime, loaded, shape, schema, state.settings)
    if spec is not None:
        exchange.spec = replace(spec, fmt=model_format(loaded))
    try:
        parameters = loaded.info.manifest.get("parameters")
        options = openai_options(body, parameters, context_length=loaded.context_length,
                                 max_tokens=current_state().settings.max_tokens)  # fmt: skip
        exchange.start(tokens_of(loaded, options), body.get("n", 1), options)
    except BaseException:
        exchange.close(failed=True)
        raise
    if body.get("stream"):
        return _stream(exchange, bool((body.get("stream_options") or {}).get("include_usage")))
    return _collect(exchange)


class _Exchange:
    """One request's turns (one per choice), their output so far, and the clean-up (once)."""

    def __init__(self, runtime, loaded, shape: _Shape, schema: dict | None = None, settings=None):
        self.runtime = runtime
        self.schema = schema  # a structured answer's schema, None for plain text
        self.settings = settings
        self.loaded = loaded
        self.shape = shape
        self.turns: list[Any] = []
        self.groups: list[int] = []  # the prompt each choice continues
        self.texts: list[list[str]] = []
        self.finished: dict[int, Finished] = {}
        self.spec: ToolSpec | None = None  # the request's tools, None without any
        self.calls: list[list[dict]] = []
        self._closed = False

    def start(self, prompts: list[list[int]], n: int, options: GenerationOptions) -> None:
        """Submit every turn before reading any, so that the batch runs them side by side."""
        for group, tokens in enumerate(prompts):
            for _ in range(n):
                if self.spec is not None:
                    retries = self.settings.format_retries
                    turn = start_tool_turn(self.loaded, tokens, options, self.spec, retries)
                else:
                    turn = start_turn(self.loaded, tokens, options, self.schema, self.settings)
                self.turns.append(turn)
                self.calls.append([])
                self.groups.append(group)
                self.texts.append([])

    def events(self) -> Iterator[tuple[int, TextChunk | Finished]]:
        return merged(self.turns)

    def take(self, index: int, event: TextChunk | Finished) -> dict[str, Any] | None:
        """Record an event; the stream choice it becomes (None for nothing to send)."""
        if isinstance(event, TextChunk):
            self.texts[index].append(event.text)
            return self.shape.delta(index, event.text) if event.text else None
        if isinstance(event, ToolCallEvent):
            self.calls[index].append(openai_call(event.call))
            return self.shape.call_delta(index, event.call, len(self.calls[index]) - 1)
        if isinstance(event, Retry):
            self.texts[index] = []  # a failed attempt's text is not the answer
            self.calls[index] = []
            return self.shape.closing(index, None)
        if event.reason == "cancelled":
            raise ServerBusy(
                "generation was cancelled: the model was unloaded or the server is stopping"
            )
        self.finished[index] = event
        return self.shape.closing(index, self.reason(index))

    def reason(self, index: int) -> str:
        """The finish_reason: "tool_calls" when the answer holds complete, valid calls.

        The calls were parsed and validated whole; the cap can only have cut what the model
        wrote after them (text the grammar allows there, never shown with calls), so the
        client acts on the calls, as OpenAI's "tool_calls" says.
        """
        reason = self.finished[index].reason
        return "tool_calls" if self.calls[index] and reason in ("stop", "length") else reason

    def extra(self, index: int, event) -> dict[str, Any]:
        """The ortserve fields of a stream chunk: a retry, or the attempts of a final chunk."""
        if isinstance(event, Retry):
            return {"ortserve_retry": {"attempt": event.attempt, "reason": event.reason}}
        if isinstance(event, Finished) and isinstance(self.turns[index], GuidedTurn):
            return {"ortserve_attempts": self.turns[index].attempts}
        return {}

    @property
    def attempts(self) -> int | None:
        """The most attempts any structured choice took (None for plain text)."""
        guided = [t.attempts for t in self.turns if isinstance(t, GuidedTurn)]
        return max(guided) if guided else None

    def usage(self) -> dict[str, int]:
        """The engine's counts of every attempt; a prompt shared by n choices counts once."""
        prompts: dict[int, int] = {}
        retried = 0  # a retry prefilled the prompt again: it counts
        for index, finished in self.finished.items():
            attempts = attempt_usages(self.turns[index], finished)
            prompts[self.groups[index]] = attempts[0].prompt_tokens
            retried += sum(u.prompt_tokens for u in attempts[1:])
        completion = sum(f.usage.generated_tokens for f in self.finished.values())
        prompt = sum(prompts.values()) + retried
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}  # fmt: skip

    def whole(self) -> dict[str, Any]:
        """The stream:false body."""
        choices = [
            self.shape.choice(i, "".join(self.texts[i]), self.reason(i), self.calls[i])
            for i in range(len(self.turns))
        ]
        return {**self.shape.envelope(choices), "usage": self.usage()}

    def close(self, *, failed: bool = False) -> None:
        """Cancel unfinished turns (the client left, or a choice failed); release the model."""
        if self._closed:
            return
        self._closed = True
        try:
            for index, turn in enumerate(self.turns):
                if index not in self.finished:
                    turn.cancel()
        finally:
            self.runtime.release(self.loaded, failed=failed)


def merged(turns: list[Any]) -> Iterator[tuple[int, TextChunk | Finished]]:
    """(choice index, event) of every turn as they come: one thread reads each of several."""
    if len(turns) == 1:
        yield from ((0, event) for event in turns[0])
        return
    inbox: queue.Queue = queue.Queue()
    for index, turn in enumerate(turns):
        threading.Thread(target=_pump, args=(index, turn, inbox), daemon=True).start()
    running = len(turns)
    while running:
        index, event = inbox.get()
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Finished):
            running -= 1
        yield index, event


def _pump(index: int, turn, inbox: queue.Queue) -> None:
    """Read one turn into `inbox` (a thread's work), ending with Finished or an exception."""
    try:
        for event in turn:
            inbox.put((index, event))
            if isinstance(event, Finished):
                return
        inbox.put((index, OrtServeError("generation ended without finishing")))
    except BaseException as exc:  # handed to the request thread, which answers it
        inbox.put((index, exc))


def _collect(exchange: _Exchange) -> Response:
    """stream:false: every choice's whole text in one JSON body."""
    try:
        for index, event in exchange.events():
            exchange.take(index, event)
        if len(exchange.finished) < len(exchange.turns):
            raise OrtServeError("generation ended without finishing")
        response = json_response(exchange.whole())
        if exchange.attempts is not None:
            response.headers["X-Ortserve-Attempts"] = str(exchange.attempts)
        return response
    finally:
        exchange.close()


def _stream(exchange: _Exchange, include_usage: bool) -> Response:
    """SSE chunks, then [DONE]; an error before any output keeps its HTTP status."""
    exchange.shape.streaming = True
    events = exchange.events()
    try:
        first = next(events)
    except BaseException:
        exchange.close()
        raise
    objects = _chunks(exchange, _prepend(first, events), include_usage)
    return stream_response(sse_events(objects), SSE, on_close=exchange.close)


def _prepend(first, rest: Iterator) -> Iterator:
    """`first`, then the rest: the event read before the response started comes first."""
    yield first
    yield from rest


def _chunks(exchange: _Exchange, events: Iterator, include_usage: bool) -> Iterator[dict]:
    """The stream's objects: openings, deltas, closings, usage; an error is the last object."""
    shape = exchange.shape
    usage = {"usage": None} if include_usage else {}
    try:
        for index in range(len(exchange.turns)):
            opening = shape.opening(index)
            if opening is not None:
                yield {**shape.envelope([opening]), **usage}
        for index, event in events:
            choice = exchange.take(index, event)
            if choice is not None:
                yield {**shape.envelope([choice]), **usage, **exchange.extra(index, event)}
        if len(exchange.finished) < len(exchange.turns):
            raise OrtServeError("generation ended without finishing")
        if include_usage:
            yield {**shape.envelope([]), "usage": exchange.usage()}
    except OrtServeError as exc:  # the status is sent already: the error is an event
        yield _error_event(exc.message, exc.type, exc.param, exc.code)
    except Exception:
        log.exception("unexpected error while streaming")
        yield _error_event("internal error", "server_error")
    finally:
        exchange.close()  # also runs on GeneratorExit: the client went away


def _error_event(message: str, type_: str, param=None, code=None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- response shapes -----------------------------------------------------------------------


class _Shape(abc.ABC):
    """What chat completions and completions share: ids, envelopes, choice fields."""

    kind = ""
    object = ""
    chunk_object = ""
    prefix = ""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.streaming = False

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = self.chunk_object if self.streaming else self.object
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}  # fmt: skip

    @abc.abstractmethod
    def opening(self, index: int) -> dict[str, Any] | None:
        """The streamed choice that opens choice `index`, if any."""

    @abc.abstractmethod
    def delta(self, index: int, text: str) -> dict[str, Any]:
        """The streamed choice carrying new text."""

    @abc.abstractmethod
    def closing(self, index: int, reason: str) -> dict[str, Any]:
        """The streamed choice carrying finish_reason."""

    @abc.abstractmethod
    def choice(self, index: int, text: str, reason: str, calls=()) -> dict[str, Any]:
        """The whole choice of a stream:false answer."""

    def call_delta(self, index: int, call, position: int) -> dict[str, Any]:
        """The streamed choice carrying one whole tool call (chat only)."""
        # /v1/completions never requests tools, so no call can reach this shape.
        raise TypeError(f"{self.object} has no tool calls")


class _ChatShape(_Shape):
    kind = "chat"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"

    def opening(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"role": "assistant", "content": ""}, None)

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk(index, {"content": text}, None)

    def closing(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk(index, {}, reason)

    def call_delta(self, index: int, call, position: int) -> dict[str, Any]:
        return self._chunk(index, {"tool_calls": [openai_call(call, position)]}, None)

    def choice(self, index: int, text: str, reason: str, calls=()) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message = {**message, "content": text if text.strip() else None,
                       "tool_calls": list(calls)}  # fmt: skip
        return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}

    def _chunk(self, index: int, delta: dict, reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


class _CompletionShape(_Shape):
    kind = "completions"
    object = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, echoed: list[str] | None, n: int):
        super().__init__(model)
        self.echoed = echoed  # the prompts, when echo asks for them before each text
        self.n = n

    def opening(self, index: int) -> dict[str, Any] | None:
        return self.delta(index, self._echo(index)) if self.echoed else None

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def closing(self, index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def choice(self, index: int, text: str, reason: str, calls=()) -> dict[str, Any]:
        text = self._echo(index) + text
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def _echo(self, index: int) -> str:
        return self.echoed[index // self.n] if self.echoed else ""
