"""The tool-call grammar builder and request checks (ortserve.serving.tools)."""

from __future__ import annotations

import json

import pytest

from ortserve.engine.guided import InvalidOutput, Retry
from ortserve.engine.prompts import ChatTemplate, template_of
from ortserve.engine.toolcalls import ToolCall, ToolCallError
from ortserve.engine.types import Finished, GenerationOptions, TextChunk, Usage
from ortserve.errors import InvalidRequest
from ortserve.serving.tools import (
    MAX_PARALLEL_CALLS,
    ToolCallEvent,
    ToolSpec,
    ToolTurn,
    call_schema,
    check_calls,
    model_format,
    start_tool_turn,
    template_calls,
    tool_grammar,
    tool_spec,
)


def spec_of(body):
    """The ToolSpec of a request body's tools, tool_choice and parallel_tool_calls."""
    return tool_spec(
        body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls", True)
    )


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
    assert spec_of({}) is None
    assert spec_of({"tools": []}) is None


def test_auto_allows_text_or_calls():
    grammar = tool_grammar(spec_of({"tools": TOOLS}))
    assert grammar.startswith("start: calls | TEXT")
    assert '"<tool_call>"' in grammar and '"</tool_call>"' in grammar
    assert len(_payload(grammar)["anyOf"]) == 2


def test_required_needs_a_call_and_caps_parallel_calls():
    grammar = tool_grammar(spec_of({"tools": TOOLS, "tool_choice": "required"}))
    assert grammar.splitlines()[0] == "start: calls"
    calls_line = next(ln for ln in grammar.splitlines() if ln.startswith("calls:"))
    assert calls_line.split(":", 1)[1].count("call") == MAX_PARALLEL_CALLS


def test_parallel_false_allows_one_call():
    spec = spec_of({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert "calls: call\n" in tool_grammar(spec)


def test_named_function_is_the_only_option():
    spec = spec_of({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "b"}}})
    payload = _payload(tool_grammar(spec))
    assert payload["properties"]["name"] == {"const": "b"}
    assert payload["properties"]["arguments"]["additionalProperties"] is False
    assert "calls: call\n" in tool_grammar(spec)


def test_none_has_no_grammar():
    assert tool_grammar(spec_of({"tools": TOOLS, "tool_choice": "none"})) is None


def test_special_token_markers_by_id():
    grammar = tool_grammar(spec_of({"tools": TOOLS}), _Tokenizer())
    assert "<[7]>" in grammar and "<[8]>" in grammar


def test_formats_without_closing_marker_take_an_array():
    spec = spec_of({"tools": TOOLS, "tool_choice": "required"})
    spec.fmt = "mistral"
    grammar = tool_grammar(spec)
    assert '"[TOOL_CALLS]"' in grammar and _payload(grammar)["type"] == "array"


def test_call_schema_is_bounded():
    schema = call_schema(spec_of({"tools": TOOLS[:1]}))
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
        spec_of(body)


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
    from ortserve.api.openai import openai_call

    out = openai_call(ToolCall("a", {"x": "1"}, id="call_1"), 0)
    assert out == {"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "a", "arguments": '{"x": "1"}'}}  # fmt: skip


def _spec(fmt: str, **body) -> ToolSpec:
    spec = spec_of({"tools": TOOLS, **body})
    spec.fmt = fmt
    return spec


def test_llama3_calls_are_bare_json_with_parameters():
    grammar = tool_grammar(_spec("llama3", tool_choice="required"))
    assert "<|python_tag|>" not in grammar and "call: payload" in grammar
    assert grammar.count('";"') == MAX_PARALLEL_CALLS - 1
    option = _payload(grammar)["anyOf"][0]
    assert option["required"] == ["name", "parameters"]
    # An "auto" text answer cannot open like a call.
    auto = tool_grammar(_spec("llama3"))
    assert "TEXT: /[^{\\s](.|\\n)*/" in auto


@pytest.mark.parametrize(("fmt", "opener"), [("mistral", "[TOOL_CALLS]"),
                                             ("phi4", "<|tool_call|>")])  # fmt: skip
def test_array_formats_cap_the_calls_and_allow_no_free_whitespace(fmt, opener):
    many = _payload(tool_grammar(_spec(fmt, tool_choice="required")))
    assert (many["type"], many["minItems"], many["maxItems"]) == ("array", 1, MAX_PARALLEL_CALLS)
    assert many["x-guidance"]["whitespace_flexible"] is False
    one = _payload(tool_grammar(_spec(fmt, tool_choice="required", parallel_tool_calls=False)))
    assert one["maxItems"] == 1
    assert json.dumps(opener) in tool_grammar(_spec(fmt))


class _Info:
    def __init__(self, template, family="qwen2"):
        self.manifest = {"template": template}
        self.details = {"family": family}


class _Loaded:
    def __init__(self, bundled, manifest_template, family="qwen2"):
        self.template = ChatTemplate(bundled, {"eos_token": "</s>"}) if bundled else None
        self.info = _Info(manifest_template, family)


def test_the_format_follows_the_manifest_template_over_bundle_and_family():
    chatml = "<tool_call>{{ messages }}"
    assert model_format(_Loaded(chatml, chatml)) == "hermes"
    assert model_format(_Loaded(chatml, "[TOOL_CALLS]{{ messages }}")) == "mistral"
    assert model_format(_Loaded(None, None, family="llama")) == "llama3"
    loaded = _Loaded(chatml, "{{ eos_token }}<|tool_call|>")
    assert template_of(loaded).render([]) == "</s><|tool_call|>"  # bundle tokens kept


class _Turn:
    """A scripted engine turn: TextChunks of `pieces`, then Finished."""

    def __init__(self, pieces, reason, prompt=10):
        self.pieces, self.reason, self.prompt = pieces, reason, prompt
        self.cancelled = False

    def __iter__(self):
        yield from (TextChunk(p) for p in self.pieces)
        usage = Usage(prompt_tokens=self.prompt, generated_tokens=len(self.pieces))
        yield Finished(self.reason, usage, prompt_eval_duration_ns=3, eval_duration_ns=5)

    def cancel(self):
        self.cancelled = True


class _Engine:
    """A loaded model that replays one scripted turn per generate() and records the options."""

    tokenizer = None

    def __init__(self, *turns):
        self.turns, self.options, self.special = list(turns), [], []

    def generate(self, tokens, options, skip_special_tokens=True):
        self.options.append(options)
        self.special.append(skip_special_tokens)
        return self.turns.pop(0)


CALL = '<tool_call>\n{"name": "b", "arguments": {"n": 3}}\n</tool_call>'
OPTIONS = GenerationOptions(num_predict=6, num_ctx=512)


def test_tool_turn_retries_a_truncated_call_then_sends_the_calls():
    engine = _Engine(_Turn(["<tool_call>", '{"name": "b"'], "length"),
                     _Turn([CALL[:20], CALL[20:]], "stop"))  # fmt: skip
    turn = ToolTurn(engine, [1, 2], OPTIONS, _spec("hermes", tool_choice="required"), retries=2)
    events = list(turn)
    retry, call, finished = events
    assert isinstance(retry, Retry) and retry.attempt == 2
    assert "unterminated tool call" in retry.reason
    assert isinstance(call, ToolCallEvent) and call.call.arguments == {"n": 3}
    assert finished.usage == Usage(prompt_tokens=20, generated_tokens=4)
    assert finished.eval_duration_ns == 10 and turn.attempts == 2
    assert [o.num_predict for o in engine.options] == [6, 12]  # the cap grew
    assert engine.special == [False, False]  # markers must reach the parser
    assert engine.options[0].guidance.kind == "lark_grammar"


def test_tool_turn_streams_text_and_retries_malformed_markup_with_the_same_cap():
    engine = _Engine(_Turn(["Hi <tool_call>", "{oops}</tool_call>"], "stop"),
                     _Turn(["Sunny", " today."], "stop"))  # fmt: skip
    turn = ToolTurn(engine, [1], OPTIONS, _spec("hermes"), retries=1)
    events = list(turn)
    texts = [e.text for e in events if isinstance(e, TextChunk)]
    assert texts == ["Hi ", "Sunny", " today."]  # the first attempt's text, then the retry's
    assert isinstance(events[1], Retry) and "invalid JSON" in events[1].reason
    assert turn.calls == [] and [o.num_predict for o in engine.options] == [6, 6]


def test_tool_turn_gives_an_explicit_error_when_every_attempt_fails():
    engine = _Engine(*[_Turn(["Just text."], "stop") for _ in range(3)])
    turn = ToolTurn(engine, [1], OPTIONS, _spec("hermes", tool_choice="required"), retries=2)
    with pytest.raises(InvalidOutput) as info:
        list(turn)
    assert info.value.status == 422 and info.value.type == "invalid_output"
    assert info.value.message.startswith("tool call failed validation after 3 attempts")
    assert "tool_choice requires" in info.value.message


def test_check_calls_enforces_tool_choice():
    ok = ToolCall("b", {"n": 1})
    check_calls([ok, ok], _spec("hermes"))
    with pytest.raises(ToolCallError, match="parallel_tool_calls"):
        check_calls([ok, ok], _spec("hermes", parallel_tool_calls=False))
    with pytest.raises(ToolCallError, match='not "a"'):
        check_calls([ok], _spec("hermes", tool_choice={"function": {"name": "a"}}))
    with pytest.raises(ToolCallError, match="parameters schema"):
        check_calls([ToolCall("b", {"n": "x"})], _spec("hermes"))


def test_tool_choice_none_is_a_plain_turn():
    engine = _Engine(_Turn(["text"], "stop"))
    turn = start_tool_turn(engine, [1], OPTIONS, _spec("hermes", tool_choice="none"), 2)
    assert isinstance(turn, _Turn) and engine.special == [True]
    assert engine.options[0].guidance is None


@pytest.mark.parametrize("parameters", [{"type": 5}, {"properties": 3}, "object", [1]])
def test_a_parameters_schema_that_is_not_a_json_schema_is_400(parameters):
    tools = [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": parameters}}]
    with pytest.raises(InvalidRequest) as info:
        spec_of({"tools": tools})
    assert info.value.param == "tools[1].function.parameters"
