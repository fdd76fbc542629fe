"""Tool calling for every protocol: request checks, the call grammar, and tool turns.

A request with tools is generated under a lark grammar (llguidance) that admits, by
tool_choice, plain text and/or calls in the model family's own format, each call's JSON
constrained to {"name": const, "arguments" (llama3: "parameters"): <that tool's parameters>}.
A ToolTurn is a GuidedTurn: its text is parsed with toolcalls.StreamingToolCallParser, its
calls validated, and an attempt that fails is retried like structured output; the calls are
passed on only once their attempt is accepted. tool_choice "none" renders the tools in the
prompt (the model knows them) but adds no grammar and parses no calls: the answer is text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ortserve.engine.guided import OutputRejected, bounded_schema, check_schema, check_size
from ortserve.engine.toolcalls import (
    StreamingToolCallParser,
    ToolCall,
    ToolCallError,
    detect_format,
    parameters_schema,
    parse,
    validate_arguments,
)
from ortserve.engine.types import GenerationOptions, Guidance, TextChunk
from ortserve.errors import InvalidRequest
from ortserve.serving.structured import GuidedTurn, image_args

CHOICES = ("auto", "none", "required")
# The most calls one answer may make: a weak model would otherwise call until max_tokens.
MAX_PARALLEL_CALLS = 4


@dataclass(frozen=True)
class _Layout:
    """How a family writes its calls, in lark: markers, padding, separator, arguments key."""

    open: str | None  # the marker before the calls; None: llama3's bare JSON message
    close: str | None  # the marker after a block of calls
    pad: str  # optional whitespace after the opening marker (lark)
    sep: str | None  # lark between calls in blocks of their own; None: one block, a JSON array
    args: str = "arguments"  # the key the family's calls put their arguments under


_LAYOUTS = {
    "hermes": _Layout("<tool_call>", "</tool_call>", '"\\n"?', '"\\n"?'),
    "phi4": _Layout("<|tool_call|>", "<|/tool_call|>", '"\\n"?', None),
    "mistral": _Layout("[TOOL_CALLS]", None, '" "?', None),
    # Llama 3.1+ answers a custom tool with a bare {"name", "parameters"} object, ";" between.
    "llama3": _Layout(None, None, "", '";" " "?', args="parameters"),
}
# Plain text in an "auto" answer; llama3's must not open like a call (a "{").
_TEXT = {"llama3": "/[^{\\s](.|\\n)*/"}
_ANY_TEXT = "/(.|\\n)+/"


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


def tool_spec(tools: Any, tool_choice: Any = "auto", parallel: Any = True, *,
              schema_param: str = "tools[{i}].function.parameters") -> ToolSpec | None:  # fmt: skip
    """Tools in OpenAI's shape ({type: function, function: {name, parameters}}), a
    tool_choice ("auto", "none", "required" or {function: {name}}) and whether several calls
    may be made; None without tools. `schema_param` names a tool's schema in errors, as the
    protocol spells it (Anthropic's "tools[{i}].input_schema")."""
    if not tools:
        return None
    if not isinstance(tools, list) or not all(_is_function(t) for t in tools):
        raise InvalidRequest("tools must be an array of {type: function, function: {name}}",
                             param="tools")  # fmt: skip
    for i, tool in enumerate(tools):
        _check_parameters(tool["function"], schema_param.format(i=i))
    names = [t["function"]["name"] for t in tools]
    choice, name = _choice("auto" if tool_choice is None else tool_choice, names)
    spec = ToolSpec(tools, choice, name, parallel is not False, names=names)
    if choice != "none":  # the grammar holds every tool the call may name, side by side
        check_size(_call_options(spec, "arguments"), "tools")
    return spec


def _check_parameters(function: dict, param: str) -> None:
    """400 for a parameters schema that is not a JSON Schema the guidance can enforce: the
    grammar and the argument checks are built from it, and a broken one would fail there
    (500) or every attempt (422)."""
    schema = function.get("parameters")
    if schema is None:
        return  # no arguments
    check_schema(schema, param)  # valid, and what the guidance can enforce


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


def call_schema(spec: ToolSpec, args: str = "arguments") -> dict:
    """The JSON Schema of one call: {"name", args} for any (or the forced) tool, bounded."""
    return bounded_schema(_call_options(spec, args))


def _call_options(spec: ToolSpec, args: str) -> dict:
    """One call's schema before bounds: an anyOf over the tools the call may name."""
    options = []
    for tool in spec.tools:
        function = tool["function"]
        if spec.name is not None and function["name"] != spec.name:
            continue
        params = parameters_schema(function)
        if "properties" in params:  # generated calls keep to the declared properties
            params.setdefault("additionalProperties", False)
        options.append({"type": "object", "additionalProperties": False,
                        "required": ["name", args],
                        "properties": {"name": {"const": function["name"]},
                                       args: params}})  # fmt: skip
    return options[0] if len(options) == 1 else {"anyOf": options}


def _marker(text: str, tokenizer) -> str:
    """A marker in lark: a special token by id where the tokenizer has one, else a string.

    A tokenizer without the token (the tiny test models) gets the marker as plain text, which
    the parser finds just the same.
    """
    token_id = tokenizer.token_to_id(text) if tokenizer is not None else None
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def tool_grammar(spec: ToolSpec, tokenizer=None) -> str | None:
    """The lark grammar of the answer; None for tool_choice "none" (plain text)."""
    if spec.choice == "none":
        return None
    layout = _LAYOUTS[spec.fmt]
    many = spec.parallel and spec.choice != "function"
    one = _call_options(spec, layout.args)
    if layout.sep is None:  # one block holding a JSON array of calls
        most = MAX_PARALLEL_CALLS if many else 1
        payload = bounded_schema({"type": "array", "minItems": 1, "maxItems": most, "items": one})
        calls = "call"
    else:
        payload = bounded_schema(one)
        calls = _repeat(f"{layout.sep} call", MAX_PARALLEL_CALLS - 1) if many else "call"
    body = "payload"
    if layout.open is not None:
        body = f"{_marker(layout.open, tokenizer)} {layout.pad} payload"
    if layout.close is not None:
        body += f' "\\n"? {_marker(layout.close, tokenizer)}'
    start = "calls | TEXT" if spec.choice == "auto" else "calls"
    return "\n".join([f"start: {start}", f"calls: {calls}", f"call: {body}",
                      f"payload: %json {json.dumps(payload)}",
                      f"TEXT: {_TEXT.get(spec.fmt, _ANY_TEXT)}", ""])  # fmt: skip


def _repeat(more: str, times: int) -> str:
    """call, then up to `times` more: nested optionals, plain lark."""
    tail = ""
    for _ in range(times):
        tail = f"({more}{tail})?" if not tail else f"({more} {tail})?"
    return f"call {tail}".strip()


def start_tool_turn(loaded, tokens: list[int], options: GenerationOptions, spec: ToolSpec,
                    retries: int, images: tuple[bytes, ...] = ()) -> Any:  # fmt: skip
    """A ToolTurn under the spec's grammar; a plain turn for tool_choice "none"."""
    if spec.choice == "none":  # plain text, special tokens skipped as usual
        return loaded.generate(tokens, options, **image_args(images))
    return ToolTurn(loaded, tokens, options, spec, retries, images)


def model_format(loaded) -> str:
    """The model's tool-call format: from the template its prompts use, else its family."""
    from ortserve.engine.prompts import template_of

    template = getattr(template_of(loaded), "source", None)
    return detect_format(template, loaded.info.details.get("family"))


class ToolTurn(GuidedTurn):
    """A turn under the call grammar, retried like structured output until its calls validate.

    Text streams as it comes, call markup left out; the calls follow as ToolCallEvents once
    the whole attempt has parsed and validated, so no call is ever sent and then retracted.
    """

    failure = "tool call failed validation"
    skip_special_tokens = False  # markers that are special tokens must reach the parser
    default_max_tokens = None  # a text answer may be as long as a plain one

    def __init__(self, loaded, tokens: list[int], options: GenerationOptions, spec: ToolSpec,
                 retries: int, images: tuple[bytes, ...] = ()):  # fmt: skip
        grammar = tool_grammar(spec, getattr(loaded, "tokenizer", None))
        super().__init__(loaded, tokens, options, None, retries,
                         guidance=Guidance("lark_grammar", grammar), images=images)  # fmt: skip
        self.spec = spec
        self._parser: StreamingToolCallParser | None = None
        self._broken = False  # this attempt's markup failed to parse: check() rejects it

    @property
    def calls(self) -> list[ToolCall]:
        """The accepted attempt's calls."""
        return self.result.value if self.result is not None else []

    def check(self, text: str, finish_reason: str | None) -> list[ToolCall]:
        """The attempt's calls, parsed and validated; OutputRejected otherwise."""
        try:
            calls = parse(text, self.spec.fmt).tool_calls
            check_calls(calls, self.spec)
        except ToolCallError as exc:
            raise OutputRejected(exc.message, finish_reason == "length") from None
        return calls

    def shown(self, chunk: TextChunk) -> list[TextChunk]:
        return self._texts(lambda parser: parser.feed(chunk.text), chunk.tokens)

    def held(self) -> list[TextChunk]:
        texts = self._texts(lambda parser: parser.finish(), 0)
        self._parser, self._broken = None, False  # the next attempt parses afresh
        return texts

    def accepted(self, result) -> list[ToolCallEvent]:
        return [ToolCallEvent(call) for call in result.value]

    def _texts(self, step, tokens: int) -> list[TextChunk]:
        """The plain text pieces of one parser step (calls wait for check())."""
        if self._parser is None:
            self._parser = StreamingToolCallParser(self.spec.fmt)
        if self._broken:
            return []
        try:
            items = step(self._parser)
        except ToolCallError:
            self._broken = True
            return []
        texts = [item for item in items if isinstance(item, str) and item]
        return [TextChunk(text, tokens if i == 0 else 0) for i, text in enumerate(texts)]


def check_calls(calls: list[ToolCall], spec: ToolSpec) -> None:
    """Raise ToolCallError unless the calls are valid and keep to tool_choice."""
    for call in calls:
        validate_arguments(call, spec.tools)
        if spec.name is not None and call.name != spec.name:
            raise ToolCallError(f'the model called "{call.name}", not "{spec.name}"')
    if len(calls) > 1 and not spec.parallel:
        raise ToolCallError("the model made several calls, parallel_tool_calls is false")
    if spec.choice in ("required", "function") and not calls:
        raise ToolCallError("the model answered without the tool call that tool_choice requires")


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
