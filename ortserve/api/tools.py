"""Tool calling shared by both APIs: request checks, the call grammar, and tool turns.

A request with tools is generated under a lark grammar (llguidance) that admits, by
tool_choice, plain text and/or calls in the model family's own format, each call's JSON
constrained to {"name": const, "arguments": <that tool's parameters>}. The text is parsed
with toolcalls.StreamingToolCallParser; every call is validated before it is passed on.
tool_choice "none" renders the tools in the prompt (the model knows them) but adds no grammar
and parses no calls: the answer is plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ortserve.engine.guided import bounded_schema
from ortserve.engine.toolcalls import (
    StreamingToolCallParser,
    ToolCall,
    ToolCallError,
    detect_format,
    validate_arguments,
)
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.errors import InvalidRequest

CHOICES = ("auto", "none", "required")
# The most calls one answer may make: a weak model would otherwise call until max_tokens.
MAX_PARALLEL_CALLS = 4
# (open marker, close marker or None, separator between calls) of each format.
_MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>", '"\\n"?'),
    "phi4": ("<|tool_call|>", "<|/tool_call|>", '"\\n"?'),
    "mistral": ("[TOOL_CALLS]", None, None),
    "llama3": ("<|python_tag|>", None, None),
}


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete, validated call, as a turn's event between its TextChunks."""

    call: ToolCall


@dataclass
class ToolSpec:
    """What a request asks of its tools: which ones, how they must be used, in which format."""

    tools: list[dict]
    choice: str = "auto"  # "auto", "none", "required", or "function" (forced to `name`)
    name: str | None = None
    parallel: bool = True
    fmt: str = "hermes"
    names: list[str] = field(default_factory=list)


def tool_spec(body: dict[str, Any]) -> ToolSpec | None:
    """The request's tools, tool_choice and parallel_tool_calls; None without tools."""
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(_is_function(t) for t in tools):
        raise InvalidRequest("tools must be an array of {type: function, function: {name}}",
                             param="tools")  # fmt: skip
    names = [t["function"]["name"] for t in tools]
    choice, name = _choice(body.get("tool_choice", "auto"), names)
    parallel = body.get("parallel_tool_calls", True) is not False
    return ToolSpec(tools, choice, name, parallel, names=names)


def _is_function(tool: Any) -> bool:
    function = tool.get("function") if isinstance(tool, dict) else None
    return (isinstance(function, dict) and isinstance(function.get("name"), str)
            and tool.get("type", "function") == "function")  # fmt: skip


def _choice(value: Any, names: list[str]) -> tuple[str, str | None]:
    if value in CHOICES:
        return value, None
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest('tool_choice must be "auto", "none", "required" or '
                             '{"type": "function", "function": {"name": ...}}',
                             param="tool_choice")  # fmt: skip
    if name not in names:
        raise InvalidRequest(f'tool_choice names unknown function "{name}"', param="tool_choice")
    return "function", name


def call_schema(spec: ToolSpec) -> dict:
    """The JSON Schema of one call: {"name", "arguments"} for any (or the forced) tool."""
    options = []
    for tool in spec.tools:
        function = tool["function"]
        if spec.name is not None and function["name"] != spec.name:
            continue
        params = dict(function.get("parameters") or {"type": "object"})
        if "properties" in params:  # generated calls keep to the declared properties
            params.setdefault("additionalProperties", False)
        options.append({"type": "object", "additionalProperties": False,
                        "required": ["name", "arguments"],
                        "properties": {"name": {"const": function["name"]},
                                       "arguments": params}})  # fmt: skip
    return bounded_schema(options[0] if len(options) == 1 else {"anyOf": options})


def _marker(text: str, tokenizer) -> str:
    """A marker in lark: a special token by id where the tokenizer has one, else a string."""
    token_id = tokenizer.token_to_id(text) if tokenizer is not None else None
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def tool_grammar(spec: ToolSpec, tokenizer=None) -> str | None:
    """The lark grammar of the answer; None for tool_choice "none" (plain text)."""
    if spec.choice == "none":
        return None
    opener, closer, sep = _MARKERS[spec.fmt]
    body = f'{_marker(opener, tokenizer)} "\\n"? payload'
    if closer is not None:
        body += f' "\\n"? {_marker(closer, tokenizer)}'
    many = spec.parallel and spec.choice != "function"
    calls = _repeat(f"{sep} call", MAX_PARALLEL_CALLS - 1) if many and sep else "call"
    payload = json.dumps(call_schema(spec))
    if many and sep is None:  # one marker, then a JSON array of calls
        payload = json.dumps({"type": "array", "minItems": 1, "items": call_schema(spec)})
    start = "calls | TEXT" if spec.choice == "auto" else "calls"
    return "\n".join([f"start: {start}", f"calls: {calls}", f"call: {body}",
                      f"payload: %json {payload}", "TEXT: /(.|\\n)+/", ""])  # fmt: skip


def _repeat(more: str, times: int) -> str:
    """call, then up to `times` more: nested optionals, plain lark."""
    tail = ""
    for _ in range(times):
        tail = f"({more}{tail})?" if not tail else f"({more} {tail})?"
    return f"call {tail}".strip()


def start_tool_turn(loaded, tokens: list[int], options: GenerationOptions,
                    spec: ToolSpec) -> ToolTurn:  # fmt: skip
    """A turn under the spec's grammar whose calls come out as ToolCallEvents."""
    grammar = tool_grammar(spec, getattr(loaded, "tokenizer", None))
    if grammar is None:  # "none": plain text, special tokens skipped as usual
        return ToolTurn(loaded.generate(tokens, options), spec)
    options = replace(options, guidance=("lark_grammar", grammar))
    turn = loaded.generate(tokens, options, skip_special_tokens=False)
    return ToolTurn(turn, spec)


def model_format(loaded) -> str:
    template = getattr(loaded.template, "source", None)
    return detect_format(template, loaded.info.details.get("family"))


class ToolTurn:
    """A turn whose text is split into TextChunks and validated ToolCallEvents."""

    attempts = None

    def __init__(self, turn, spec: ToolSpec):
        self.turn, self.spec = turn, spec
        self.calls: list[ToolCall] = []
        self._parser = StreamingToolCallParser(spec.fmt) if spec.choice != "none" else None

    def cancel(self) -> None:
        self.turn.cancel()

    def __iter__(self) -> Iterator[TextChunk | ToolCallEvent | Finished]:
        for event in self.turn:
            if not isinstance(event, TextChunk):
                if isinstance(event, Finished) and self._parser is not None:
                    yield from self._items(self._parser.finish(), 0)
                    event = self._finished(event)
                yield event
                continue
            if self._parser is None:
                yield event
            else:
                yield from self._items(self._parser.feed(event.text), event.tokens)

    def _items(self, items: list, tokens: int) -> Iterator[TextChunk | ToolCallEvent]:
        for item in items:
            if isinstance(item, str):
                if item:
                    yield TextChunk(item, tokens)
                continue
            validate_arguments(item, self.spec.tools)
            self._check_choice(item)
            self.calls.append(item)
            yield ToolCallEvent(item)

    def _check_choice(self, call: ToolCall) -> None:
        if self.spec.name is not None and call.name != self.spec.name:
            raise ToolCallError(f'the model called "{call.name}", not "{self.spec.name}"')
        if self.calls and not self.spec.parallel:
            raise ToolCallError("the model made several calls, parallel_tool_calls is false")

    def _finished(self, event: Finished) -> Finished:
        if self.spec.choice in ("required", "function") and not self.calls \
                and event.reason not in ("cancelled", "length"):  # fmt: skip
            raise ToolCallError(
                "the model answered without the tool call that tool_choice requires"
            )
        return event


def template_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls as templates take them: arguments as objects."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"invalid type for {where}: expected array", param=where)
    converted = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}[{j}].function.name is required", param=f"{where}[{j}]")
        args = function.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise InvalidRequest(f"{where}[{j}].function.arguments is not valid JSON",
                                     param=f"{where}[{j}].function.arguments") from None  # fmt: skip
        entry = {"type": "function", "function": {"name": function["name"], "arguments": args}}
        converted.append({**({"id": call["id"]} if "id" in call else {}), **entry})
    return converted


def native_call(call: ToolCall) -> dict[str, Any]:
    """A call in Ollama's shape: arguments as an object."""
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


def openai_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call in OpenAI's shape: arguments as a JSON string; index in a stream delta."""
    at = {} if index is None else {"index": index}
    function = {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}
    return {**at, "id": call.id, "type": "function", "function": function}
