"""OpenAI's API (/v1/*): chat completions, completions and models, over the serving core.

Embeddings live in their own blueprint, the Responses API in responses.py. Errors take
OpenAI's shape in api/app.py.
"""

from __future__ import annotations

import abc
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response

import ortserve.api.logprobs as shape_logprobs
from ortserve import __version__
from ortserve.api.protocol import (
    GENERATION,
    GUARDED,
    MODEL_PARAMETER,
    Protocol,
    Route,
    json_body,
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
from ortserve.engine.guided import JSON_OBJECT_SCHEMA, check_schema
from ortserve.errors import InvalidRequest, NotSupportedYet, OrtServeError
from ortserve.library import ModelInfo
from ortserve.library.names import ModelName
from ortserve.options import Sampling, api_sampling
from ortserve.serving import core
from ortserve.serving.core import Choice, Exchange
from ortserve.serving.events import Finished, Retry, TextChunk, ThinkingChunk, ToolCallEvent
from ortserve.serving.images import ImageReader
from ortserve.serving.requests import (
    ChatPrompt,
    GenerationRequest,
    TextPrompt,
    logprob_count,
    think_from_effort,
)
from ortserve.serving.tools import template_calls, tool_spec

openai_bp = Blueprint("openai", __name__)

# Choices one request may ask for (n, times the prompts of /v1/completions): each is a turn
# in the batch, and one request must not take every slot of the model.
MAX_CHOICES = 8
SYSTEM_FINGERPRINT = f"fp_ortserve_{__version__}"
# Default max_tokens of OpenAI's /v1/completions (chat completions have none).
COMPLETIONS_MAX_TOKENS = 16
# The legacy function-calling fields (use tools), and when a value asks for them.
_CHAT_LATER: dict[str, Callable[[Any], bool]] = {
    "functions": bool,
    "function_call": lambda v: v != "none",
}
_MESSAGE_LATER = ("function_call",)
# reasoning_effort values that mean no thinking section (the rest turn it on)
_DONE = "data: [DONE]\n\n"  # how OpenAI's streams end, an error included


# ---- routes --------------------------------------------------------------------------------


@openai_bp.post("/v1/chat/completions")
def chat_completions():
    """The next assistant message of a conversation, n times."""
    body = parsed_body("chat_completions")
    for field, asks in _CHAT_LATER.items():
        if field in body and asks(body[field]):
            raise NotSupportedYet(f'"{field}" is not supported yet', param=field)
    reader = ImageReader.of(current_state().settings)
    request = _request(body, [ChatPrompt(chat_messages(body["messages"], reader),
                                         truncate=False)], "chat")  # fmt: skip
    if reader.first:
        request.fields["images"] = reader.first
    fmt = body.get("response_format") or {}
    request.schema = response_format_schema(
        fmt.get("type", "text"), (fmt.get("json_schema") or {}).get("schema"),
        param="response_format", schema_param="response_format.json_schema.schema")  # fmt: skip
    request.tools = tool_spec(body.get("tools"), body.get("tool_choice"),
                              body.get("parallel_tool_calls", True))  # fmt: skip
    request.logprobs = logprob_count(body.get("logprobs"), body.get("top_logprobs"))
    return _answer(body, _ChatShape(body["model"]), request)


@openai_bp.post("/v1/completions")
def completions():
    """Continuations of raw prompts (no chat template)."""
    body = parsed_body("completions")
    if body.get("suffix"):
        raise InvalidRequest("suffix is not supported: no model here does infilling",
                             param="suffix")  # fmt: skip
    if body.get("best_of", 1) != 1:
        raise InvalidRequest("best_of is not supported (use n)", param="best_of")
    prompts = _prompt_list(body["prompt"], body.get("n", 1))
    body = {"max_tokens": COMPLETIONS_MAX_TOKENS, **body}
    request = _request(body, prompts, "completions")
    request.logprobs = body.get("logprobs")  # an integer 0..5 here: top alternatives
    echoed = [p.text for p in prompts] if body.get("echo") else None
    return _answer(body, _CompletionShape(body["model"], echoed, body.get("n", 1)), request)


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


def openai_call(call, index: int | None = None) -> dict[str, Any]:
    """A call (toolcalls.ToolCall) in OpenAI's shape: arguments as a JSON string; index in a
    stream delta."""
    at = {} if index is None else {"index": index}
    function = {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}
    return {**at, "id": call.id, "type": "function", "function": function}


# ---- requests in ---------------------------------------------------------------------------


def sampling(body: dict[str, Any]) -> Sampling:
    """OpenAI's sampling fields under Ollama's names (max_completion_tokens wins)."""
    return api_sampling("openai", body)


def _request(body: dict[str, Any], prompts: list, kind: str) -> GenerationRequest:
    return GenerationRequest(model=body["model"], prompts=prompts, kind=kind,
                             sampling=sampling(body), n=body.get("n", 1),
                             think=think_from_effort(body.get("reasoning_effort")),
                             fields={"schema": "response_format", "think": "reasoning_effort"})  # fmt: skip


def _prompt_list(prompt: str | list[str], n: int) -> list[TextPrompt]:
    """The raw prompts (prompts times n is within MAX_CHOICES), each naming its field."""
    if isinstance(prompt, str):
        prompts = [(prompt, "prompt")]
    else:
        if len(prompt) * n > MAX_CHOICES:
            raise InvalidRequest(f"at most {MAX_CHOICES} choices per request: {len(prompt)} "
                                 f"prompts times n={n} is {len(prompt) * n}", param="prompt")  # fmt: skip
        prompts = [(text, f"prompt[{i}]") for i, text in enumerate(prompt)]
    for text, param in prompts:
        if not text:
            raise InvalidRequest(f"{param} is empty", param=param)
    return [TextPrompt(text, raw=True, param=param) for text, param in prompts]


def chat_messages(messages: list[dict[str, Any]], reader: ImageReader) -> list[dict[str, Any]]:
    """OpenAI messages as the prompt builder takes them: string content, known roles, the
    image_url parts' pictures as bytes (checked) in `images`."""
    converted = []
    for i, message in enumerate(messages):
        for field in _MESSAGE_LATER:
            if message.get(field):
                param = f"messages[{i}].{field}"
                raise NotSupportedYet(f'"{param}" is not supported yet', param=param)
        # "developer" is what OpenAI's newer models call the system role.
        role = "system" if message["role"] == "developer" else message["role"]
        content, images = content_parts(message.get("content") or "", f"messages[{i}].content",
                                        reader)  # fmt: skip
        extra = {k: message[k] for k in ("name", "tool_call_id") if k in message}
        if images:
            extra["images"] = images
        if message.get("reasoning_content"):
            extra["thinking"] = message["reasoning_content"]
        if message.get("tool_calls"):
            extra["tool_calls"] = template_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        converted.append({"role": role, "content": content, **extra})
    return converted


def content_parts(content: str | list[dict[str, Any]], where: str, reader: ImageReader
                  ) -> tuple[str, list[bytes]]:  # fmt: skip
    """Content given as parts -> one string (text parts joined) and the image_url parts'
    pictures (a data URL, or an http(s) URL where ORTSERVE_FETCH_IMAGES allows)."""
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        kind = part.get("type")
        if kind == "text":
            texts.append(part["text"])
        elif kind == "image_url":
            url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else None
            images.append(reader.url(url, f"{param}.image_url.url"))
        else:
            raise InvalidRequest(f"{param}: unsupported content part {kind!r}", param=param)
    return "\n".join(texts), images


# ---- answers out ---------------------------------------------------------------------------


def _answer(body: dict[str, Any], shape: _Shape, request: GenerationRequest) -> Response:
    exchange = core.start(current_state(), request)
    if body.get("stream"):
        shape.streaming = True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return exchange_stream(exchange, lambda events: _sse(exchange, shape, events,
                                                              include_usage),
                               stream_error, SSE)  # fmt: skip
    choices = exchange.finish()
    whole = [shape.choice(i, c) for i, c in enumerate(choices)]
    return answer_response({**shape.envelope(whole), "usage": usage(exchange)}, exchange)


def _sse(exchange: Exchange, shape: _Shape, events: Iterator, include_usage: bool
         ) -> Iterator[str]:  # fmt: skip
    """The stream's chunks: openings, deltas, closings, usage, then [DONE]."""
    extra = {"usage": None} if include_usage else {}
    for index in range(len(exchange.choices)):
        opening = shape.opening(index)
        if opening is not None:
            yield sse_event({**shape.envelope([opening]), **extra})
    for index, event in events:
        choice = shape.event(index, event, exchange.choices[index])
        if choice is not None:
            yield sse_event({**shape.envelope([choice]), **extra, **_ours(exchange, index, event)})
    if include_usage:
        yield sse_event({**shape.envelope([]), "usage": usage(exchange)})
    yield _DONE


def _ours(exchange: Exchange, index: int, event) -> dict[str, Any]:
    """The ortserve fields of a stream chunk: a retry, or the attempts of a final chunk."""
    if isinstance(event, Retry):
        return {"ortserve_retry": {"attempt": event.attempt, "reason": event.reason}}
    attempts = exchange.choices[index].attempts
    if isinstance(event, Finished) and attempts is not None:
        return {"ortserve_attempts": attempts}
    return {}


def usage(exchange: Exchange) -> dict[str, int]:
    used = exchange.usage()
    return {"prompt_tokens": used.prompt_tokens, "completion_tokens": used.completion_tokens,
            "total_tokens": used.total_tokens,
            "prompt_tokens_details": {"cached_tokens": used.cached_tokens}}  # fmt: skip


def error_object(exc: OrtServeError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}  # fmt: skip


def finish_reason(choice: Choice) -> str:
    """ "tool_calls" when the answer holds complete, validated calls, else the engine's reason.

    The calls were parsed and validated whole; the cap can only have cut what the model
    wrote after them (text the grammar allows there, never shown with calls), so the
    client acts on the calls, as OpenAI's "tool_calls" says.
    """
    reason = choice.finished.reason
    return "tool_calls" if choice.calls and reason in ("stop", "length") else reason


# ---- response shapes -----------------------------------------------------------------------


class _Shape(abc.ABC):
    """What chat completions and completions share: ids, envelopes, choice fields."""

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

    def event(self, index: int, event: Any, choice: Choice) -> dict[str, Any] | None:
        """The streamed choice an event becomes (None: nothing to send)."""
        if isinstance(event, TextChunk):
            return self.delta(index, event) if event.text or event.logprobs else None
        if isinstance(event, ThinkingChunk):
            return self.thinking(index, event.text)
        if isinstance(event, ToolCallEvent):
            return self.call_delta(index, event.call, len(choice.calls) - 1)
        if isinstance(event, Retry):  # a failed attempt: the client discards that choice
            self.restart(index)
            return self.closing(index, None)
        if isinstance(event, Finished):
            return self.closing(index, finish_reason(choice))
        return None

    def restart(self, index: int) -> None:  # noqa: B027 (most shapes keep no per-choice state)
        """A retried choice starts its text afresh."""

    @abc.abstractmethod
    def opening(self, index: int) -> dict[str, Any] | None:
        """The streamed choice that opens choice `index`, if any."""

    @abc.abstractmethod
    def delta(self, index: int, chunk: TextChunk) -> dict[str, Any]:
        """The streamed choice carrying new text."""

    @abc.abstractmethod
    def closing(self, index: int, reason: str | None) -> dict[str, Any]:
        """The streamed choice carrying finish_reason."""

    @abc.abstractmethod
    def choice(self, index: int, choice: Choice) -> dict[str, Any]:
        """The whole choice of a stream:false answer."""

    def thinking(self, index: int, text: str) -> dict[str, Any] | None:
        """The streamed choice carrying thinking (chat only)."""
        return None

    def call_delta(self, index: int, call, position: int) -> dict[str, Any]:
        """The streamed choice carrying one whole tool call (chat only)."""
        # /v1/completions never requests tools, so no call can reach this shape.
        raise TypeError(f"{self.object} has no tool calls")


class _ChatShape(_Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"

    def opening(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"role": "assistant", "content": ""}, None)

    def delta(self, index: int, chunk: TextChunk) -> dict[str, Any]:
        logprobs = shape_logprobs.openai_chat(list(chunk.logprobs)) if chunk.logprobs else None
        return self._chunk(index, {"content": chunk.text}, None, logprobs)

    def thinking(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk(index, {"reasoning_content": text}, None)

    def closing(self, index: int, reason: str | None) -> dict[str, Any]:
        return self._chunk(index, {}, reason)

    def call_delta(self, index: int, call, position: int) -> dict[str, Any]:
        return self._chunk(index, {"tool_calls": [openai_call(call, position)]}, None)

    def choice(self, index: int, choice: Choice) -> dict[str, Any]:
        text = choice.content
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if choice.thinking:
            message["reasoning_content"] = choice.thoughts
        if choice.calls:
            message = {**message, "content": text if text.strip() else None,
                       "tool_calls": [openai_call(c) for c in choice.calls]}  # fmt: skip
        logprobs = shape_logprobs.openai_chat(choice.logprobs) if choice.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": finish_reason(choice)}  # fmt: skip

    def _chunk(self, index: int, delta: dict, reason: str | None, logprobs=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


class _CompletionShape(_Shape):
    object = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, echoed: list[str] | None, n: int):
        super().__init__(model)
        self.echoed = echoed  # the prompts, when echo asks for them before each text
        self.n = n
        self._offsets: dict[int, int] = {}  # streamed characters per choice (text_offset)

    def opening(self, index: int) -> dict[str, Any] | None:
        echo = self._echo(index)
        self._offsets[index] = len(echo)
        return self._text(index, echo) if self.echoed else None

    def restart(self, index: int) -> None:
        self._offsets[index] = len(self._echo(index))

    def delta(self, index: int, chunk: TextChunk) -> dict[str, Any]:
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(chunk.text)
        logprobs = None
        if chunk.logprobs:
            logprobs = shape_logprobs.openai_completion(list(chunk.logprobs), offset)
        return self._text(index, chunk.text, logprobs=logprobs)

    def closing(self, index: int, reason: str | None) -> dict[str, Any]:
        return self._text(index, "", reason)

    def choice(self, index: int, choice: Choice) -> dict[str, Any]:
        echo = self._echo(index)
        logprobs = None
        if choice.logprobs:
            logprobs = shape_logprobs.openai_completion(choice.logprobs, len(echo))
        return self._text(index, echo + choice.content, finish_reason(choice), logprobs)

    def _text(self, index: int, text: str, reason: str | None = None, logprobs=None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _echo(self, index: int) -> str:
        return self.echoed[index // self.n] if self.echoed else ""


def response_format_schema(kind: str, schema: Any, *, param: str, schema_param: str
                           ) -> dict | None:  # fmt: skip
    """OpenAI's response formats: text (None), json_object, or json_schema with its schema.

    `param` names the format object ("response_format" on chat, "text.format" on responses),
    `schema_param` its schema ("response_format.json_schema.schema", "text.format.schema").
    """
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{schema_param} is required", param=schema_param)
        return check_schema(schema, schema_param)
    raise InvalidRequest(f"{param}.type must be text, json_object or json_schema, not {kind!r}",
                         param=f"{param}.type")  # fmt: skip


def error_body(status: int, message: str, type_: str, param=None, code=None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {message, type, param, code}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def stream_error(exc: OrtServeError) -> str:
    """How OpenAI's streams end in an error: the error as an event, then [DONE]."""
    return sse_event(error_object(exc)) + _DONE


PROTOCOL = Protocol(
    "openai", openai_bp, rank=20, owns=("/v1",), error_body=error_body,
    error_schema="OpenAIError", stream_error=stream_error,
    generation_paths=("/v1/chat/completions", "/v1/completions"),
    cors_headers=("OpenAI-Organization", "OpenAI-Project", "X-Stainless-*"),
    note="An OpenAI-compatible API (/v1/*, the Responses and Batch APIs included): errors are "
    'OpenAI\'s {"error": {message, type, param, code}}.',
    routes=(
        Route("POST", "/v1/chat/completions", "Chat completions", "chat_completions",
              sse_or_json("ChatCompletion"), GENERATION),
        Route("POST", "/v1/completions", "Completions of raw prompts", "completions",
              sse_or_json("Completion"), GENERATION),
        Route("GET", "/v1/models", "The models in the library", None,
              json_body("OpenAIModelList")),
        Route("GET", "/v1/models/{model}", "One model", None, json_body("OpenAIModel"),
              (*GUARDED, 400, 404), (MODEL_PARAMETER,)),
    ),
)  # fmt: skip
