"""The tool-call grammar builder and request checks (ortserve.api.tools)."""

from __future__ import annotations

import json

import pytest

from ortserve.api.tools import (
    MAX_PARALLEL_CALLS,
    call_schema,
    openai_call,
    template_calls,
    tool_grammar,
    tool_spec,
)
from ortserve.engine.toolcalls import ToolCall
from ortserve.errors import InvalidRequest


def _tool(name, **props):
    params = {"type": "object", "properties": props, "required": list(props)}
    return {"type": "function", "function": {"name": name, "parameters": params}}


TOOLS = [_tool("a", x={"type": "string"}), _tool("b", n={"type": "integer"})]


class _Tokenizer:
    def token_to_id(self, text):
        return {"<tool_call>": 7, "</tool_call>": 8}.get(text)


def _payload(grammar: str) -> dict:
    line = next(ln for ln in grammar.splitlines() if ln.startswith("payload:"))
    return json.loads(line.split("%json", 1)[1])


def test_no_tools_no_spec():
    assert tool_spec({}) is None
    assert tool_spec({"tools": []}) is None


def test_auto_allows_text_or_calls():
    grammar = tool_grammar(tool_spec({"tools": TOOLS}))
    assert grammar.startswith("start: calls | TEXT")
    assert '"<tool_call>"' in grammar and '"</tool_call>"' in grammar
    assert len(_payload(grammar)["anyOf"]) == 2


def test_required_needs_a_call_and_caps_parallel_calls():
    grammar = tool_grammar(tool_spec({"tools": TOOLS, "tool_choice": "required"}))
    assert grammar.splitlines()[0] == "start: calls"
    calls_line = next(ln for ln in grammar.splitlines() if ln.startswith("calls:"))
    assert calls_line.split(":", 1)[1].count("call") == MAX_PARALLEL_CALLS


def test_parallel_false_allows_one_call():
    spec = tool_spec({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert "calls: call\n" in tool_grammar(spec)


def test_named_function_is_the_only_option():
    spec = tool_spec(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "b"}}}
    )
    payload = _payload(tool_grammar(spec))
    assert payload["properties"]["name"] == {"const": "b"}
    assert payload["properties"]["arguments"]["additionalProperties"] is False
    assert "calls: call\n" in tool_grammar(spec)


def test_none_has_no_grammar():
    assert tool_grammar(tool_spec({"tools": TOOLS, "tool_choice": "none"})) is None


def test_special_token_markers_by_id():
    grammar = tool_grammar(tool_spec({"tools": TOOLS}), _Tokenizer())
    assert "<[7]>" in grammar and "<[8]>" in grammar


def test_formats_without_closing_marker_take_an_array():
    spec = tool_spec({"tools": TOOLS, "tool_choice": "required"})
    spec.fmt = "mistral"
    grammar = tool_grammar(spec)
    assert '"[TOOL_CALLS]"' in grammar and _payload(grammar)["type"] == "array"


def test_call_schema_is_bounded():
    schema = call_schema(tool_spec({"tools": TOOLS[:1]}))
    assert schema["properties"]["arguments"]["properties"]["x"]["maxLength"] == 256


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [{"type": "function"}]},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "zz"}}},
    ],
)
def test_bad_requests(body):
    with pytest.raises(InvalidRequest):
        tool_spec(body)


def test_template_calls_decode_string_arguments():
    calls = template_calls(
        [{"id": "c1", "function": {"name": "a", "arguments": '{"x": "1"}'}}], "m"
    )
    assert calls == [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": {"x": "1"}}}
    ]
    with pytest.raises(InvalidRequest):
        template_calls([{"function": {"name": "a", "arguments": "{"}}], "m")


def test_openai_call_shape():
    out = openai_call(ToolCall("a", {"x": "1"}, id="call_1"), 0)
    assert out == {"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "a", "arguments": '{"x": "1"}'}}  # fmt: skip
