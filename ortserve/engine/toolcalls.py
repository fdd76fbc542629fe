"""Tool calls out of generated text, in each model family's own format.

Formats: "hermes" (Qwen, Hermes: `<tool_call>{...}</tool_call>` blocks), "llama3" (Llama 3.1/3.2:
the message is a JSON object, optionally after `<|python_tag|>`, several joined by `;`),
"mistral" (`[TOOL_CALLS][{...}, ...]` or `[TOOL_CALLS]name[ARGS]{...}`) and "phi4"
(`<|tool_call|>[{...}]<|/tool_call|>`). One streaming parser serves both streaming and
`parse()`, so a streamed answer and a parsed one can never disagree.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from ortserve.errors import OrtServeError

FORMATS = ("hermes", "llama3", "mistral", "phi4")
DEFAULT_FORMAT = "hermes"  # the format of the documented default tool prompt
QUOTE_LIMIT = 200

# Template markers, most specific first: "ipython" is only a hint, so it comes last.
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call|>", "phi4"),
    ("<|tool|>", "phi4"),  # Phi-4-mini's templates list tools in <|tool|>...<|/tool|>
    ("<|python_tag|>", "llama3"),
    ("ipython", "llama3"),
)
_FAMILY_PREFIXES = (("qwen", "hermes"), ("llama", "llama3"), ("mistral", "mistral"))
_FAMILY_PREFIXES += (("phi3", "phi4"), ("phi4", "phi4"))
_MISTRAL_HEADER = re.compile(r"\s*([\w.\-]+)(?:\[CALL_ID\][\w\-]*)?\s*")
_ARGS = "[ARGS]"


class ToolCallError(OrtServeError):
    """Generated tool-call markup that cannot be turned into a valid call."""

    status = 422
    type = "invalid_output"


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=_new_id)


@dataclass
class ParsedMessage:
    content: str
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class _Format:
    open: str
    close: str | None  # None: the call ends where its JSON value ends
    bare_json: bool = False  # llama3: a message that starts with "{" is a call


_SPECS = {
    "hermes": _Format("<tool_call>", "</tool_call>"),
    "phi4": _Format("<|tool_call|>", "<|/tool_call|>"),
    "mistral": _Format("[TOOL_CALLS]", None),
    "llama3": _Format("<|python_tag|>", None, bare_json=True),
}


def detect_format(chat_template: str | None, model_family: str | None) -> str:
    """The tool-call format: from the chat template's markers, else the family, else hermes."""
    for marker, fmt in _TEMPLATE_MARKERS:
        if chat_template and marker in chat_template:
            return fmt
    family = (model_family or "").lower()
    for prefix, fmt in _FAMILY_PREFIXES:
        if family.startswith(prefix):
            return fmt
    return DEFAULT_FORMAT


def _quote(text: str) -> str:
    """The offending text for an error message, cut to a readable length."""
    text = text.strip()
    if len(text) > QUOTE_LIMIT:
        text = text[:QUOTE_LIMIT] + "…"
    return json.dumps(text, ensure_ascii=False)


def _make_call(obj: Any, raw: str) -> ToolCall:
    """One call from its decoded JSON object; arguments given as a JSON string are decoded."""
    if not isinstance(obj, dict):
        raise ToolCallError(f"malformed tool call: expected a JSON object in {_quote(raw)}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallError(f"malformed tool call: missing function name in {_quote(raw)}")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolCallError(
                f'malformed tool call "{name}": arguments are not valid JSON ({e.msg}) '
                f"in {_quote(raw)}"
            ) from None
    if not isinstance(args, dict):
        raise ToolCallError(
            f'malformed tool call "{name}": arguments are not a JSON object in {_quote(raw)}'
        )
    return ToolCall(name=name, arguments=args)


def _decode(raw: str) -> Any:
    """A call's JSON text decoded, or a ToolCallError that quotes it."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ToolCallError(
            f"malformed tool call: invalid JSON ({e.msg} at position {e.pos}) in {_quote(raw)}"
        ) from None


def _calls_from_json(raw: str) -> list[ToolCall]:
    """The calls in one JSON value: an object or a list of objects."""
    value = _decode(raw)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ToolCallError(f"malformed tool call: empty list in {_quote(raw)}")
    return [_make_call(item, raw) for item in items]


def _json_end(text: str) -> int | None:
    """Index just past the JSON object or array that text starts with, None while it is open."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that could be the start of marker."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _merge(items: list[ToolCall | str]) -> list[ToolCall | str]:
    """Adjacent text pieces joined, empty ones dropped."""
    out: list[ToolCall | str] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += item
                continue
        out.append(item)
    return out


class StreamingToolCallParser:
    """Generated text in, plain text pieces and complete ToolCalls out, as early as is certain.

    Only a tail that could begin a call marker is held back. One instance per stream.
    """

    def __init__(self, fmt: str):
        if fmt not in _SPECS:
            raise ValueError(f"unknown tool-call format {fmt!r}, expected one of {FORMATS}")
        self._spec = _SPECS[fmt]
        self._buf = ""
        self._mode = "start" if self._spec.bare_json else "text"
        self._name: str | None = None  # mistral's name form: the name read before [ARGS]
        self._after_separator = False  # llama3: just read a ";" between calls
        self._done = False

    def feed(self, delta: str) -> list[ToolCall | str]:
        """Add generated text: what is known now, text and complete calls, in order."""
        if self._done:
            raise ValueError("feed() after finish()")
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[ToolCall | str]:
        """Everything held back at the end of generation; a call left open is an error."""
        if self._done:
            return []
        out = self._run(final=True)
        self._done = True
        if self._mode == "body" or (self._mode in ("json", "head") and not self._optional_end()):
            raise ToolCallError(
                f"unterminated tool call at the end of the output: {_quote(self._buf)}"
            )
        return out

    def _optional_end(self) -> bool:
        """After llama3's ";" separator, nothing more is fine; elsewhere a call was promised."""
        empty = not self._buf.strip()
        return self._mode == "json" and self._name is None and self._after_separator and empty

    def _run(self, *, final: bool) -> list[ToolCall | str]:
        handlers = {
            "start": self._start,
            "text": self._text,
            "body": self._body,
            "json": self._json,
            "head": self._head,
            "after": self._after,
        }
        out: list[ToolCall | str] = []
        progressed = True
        while progressed:
            progressed = handlers[self._mode](out, final)
        return _merge(out)

    def _start(self, out: list, final: bool) -> bool:
        """llama3: a message that starts with "{" is a call; wait until the first character."""
        head = self._buf.lstrip()
        if not head or (not final and self._spec.open.startswith(head)):
            if final:
                self._mode = "text"
            return final
        if head[0] == "{":
            self._buf, self._mode = head, "json"
        else:
            self._mode = "text"
        return True

    def _text(self, out: list, final: bool) -> bool:
        """Plain text up to an opening marker, holding back a tail that may begin one."""
        marker = self._spec.open
        i = self._buf.find(marker)
        if i < 0:
            keep = 0 if final else _held_suffix(self._buf, marker)
            split = len(self._buf) - keep
            out.append(self._buf[:split])
            self._buf = self._buf[split:]
            return False
        out.append(self._buf[:i])
        self._buf = self._buf[i + len(marker) :]
        self._mode = "body" if self._spec.close else "json"
        self._after_separator = False
        return True

    def _body(self, out: list, final: bool) -> bool:
        """A call with a closing marker: complete once the marker is seen."""
        assert self._spec.close is not None
        j = self._buf.find(self._spec.close)
        if j < 0:
            return False
        out.extend(_calls_from_json(self._buf[:j]))
        self._buf = self._buf[j + len(self._spec.close) :]
        self._mode = "text"
        return True

    def _json(self, out: list, final: bool) -> bool:
        """A call without a closing marker: complete once its JSON value is balanced."""
        body = self._buf.lstrip()
        if not body:
            return False
        if body[0] not in "{[":
            if self._spec.open == "[TOOL_CALLS]" and self._name is None:
                self._mode = "head"
                return True
            raise ToolCallError(f"malformed tool call: expected JSON in {_quote(body)}")
        end = _json_end(body)
        if end is None:
            return False
        raw, self._buf = body[:end], body[end:]
        if self._name is None:
            out.extend(_calls_from_json(raw))
        else:
            out.append(_make_call({"name": self._name, "arguments": _decode(raw)}, raw))
        self._name = None
        self._mode = "after" if self._spec.bare_json else "text"
        return True

    def _head(self, out: list, final: bool) -> bool:
        """Mistral's name form: `name[ARGS]{...}`, with an optional `[CALL_ID]id` after name."""
        k = self._buf.find(_ARGS)
        if k < 0:
            return False
        match = _MISTRAL_HEADER.fullmatch(self._buf[:k])
        if not match:
            raise ToolCallError(f"malformed tool call: bad function name in {_quote(self._buf)}")
        self._name, self._buf = match.group(1), self._buf[k + len(_ARGS) :]
        self._mode = "json"
        return True

    def _after(self, out: list, final: bool) -> bool:
        """llama3: after a call, ";" introduces another one; anything else is plain text."""
        rest = self._buf.lstrip()
        if not rest and not final:
            return False
        if rest.startswith(";"):
            self._buf, self._mode, self._after_separator = rest[1:], "json", True
        else:
            self._mode = "text"
        return True


def parse(text: str, fmt: str) -> ParsedMessage:
    """A whole generated message: its text without call markup, and its calls in order."""
    parser = StreamingToolCallParser(fmt)
    items = parser.feed(text) + parser.finish()
    content = "".join(item for item in items if isinstance(item, str))
    calls = [item for item in items if isinstance(item, ToolCall)]
    return ParsedMessage(content=content.strip(), tool_calls=calls)


def _find_function(name: str, tools: list[dict]) -> dict:
    """The function definition called name in OpenAI-format tools."""
    for tool in tools:
        function = tool.get("function") or {}
        if tool.get("type", "function") == "function" and function.get("name") == name:
            return function
    known = ", ".join(sorted(str((t.get("function") or {}).get("name")) for t in tools))
    raise ToolCallError(f'call to unknown function "{name}" (available: {known or "none"})')


# OpenAI's meaning of a function without `parameters`: it takes no arguments.
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def parameters_schema(function: dict) -> dict:
    """A function's parameters schema; none given means an empty argument object."""
    return dict(function.get("parameters") or NO_ARGUMENTS)


def validate_arguments(call: ToolCall, tools: list[dict]) -> None:
    """Raise ToolCallError unless call names a tool and its arguments match its parameters."""
    function = _find_function(call.name, tools)
    schema = parameters_schema(function)
    try:
        Draft202012Validator.check_schema(schema)
        error = best_match(Draft202012Validator(schema).iter_errors(call.arguments))
    except SchemaError as e:  # a bad schema is the caller's, but must not pass as valid
        raise ToolCallError(f'parameters schema of "{call.name}" is invalid: {e.message}') from None
    if error is None:
        return
    path = "/" + "/".join(str(p) for p in error.absolute_path)
    raise ToolCallError(
        f'arguments of "{call.name}" do not match its parameters schema at {path}: {error.message}',
        param=path,
    )
