"""Tool-call parsing for each model family's format, whole and streamed."""

from __future__ import annotations

import re

import pytest

from ortserve.engine.toolcalls import (
    ParsedMessage,
    StreamingToolCallParser,
    ToolCall,
    ToolCallError,
    detect_format,
    parse,
    validate_arguments,
)

WEATHER = ("get_weather", {"city": "Paris", "unit": "c"})
TIME = ("get_time", {"tz": "Europe/Paris"})

# format -> case -> generated text; every "ok" case holds the calls in EXPECTED[case].
OK_CASES = {
    "hermes": {
        "single": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}\n</tool_call>',
        "several": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"tz": "Europe/Paris"}}\n</tool_call>',
        "text_before": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "c"}}\n</tool_call>',
        "string_args": '<tool_call>{"name": "get_weather", "arguments": '
        '"{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}</tool_call>',
    },
    "llama3": {
        "single": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        "several": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
        '"unit": "c"}}; {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}',
        "text_before": 'Let me check.<|python_tag|>{"name": "get_weather", "parameters": '
        '{"city": "Paris", "unit": "c"}}',
        "string_args": '{"name": "get_weather", "parameters": '
        '"{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}',
    },
    "mistral": {
        "single": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}]',
        "several": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}'
        '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "Europe/Paris"}',
        "text_before": 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "c"}}]',
        "string_args": '[TOOL_CALLS][{"name": "get_weather", "arguments": '
        '"{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}]',
    },
    "phi4": {
        "single": '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}<|/tool_call|>',
        "several": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]'
        "<|/tool_call|>",
        "text_before": 'Let me check.\n<|tool_call|>[{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "c"}}]<|/tool_call|>',
        "string_args": '<|tool_call|>[{"name": "get_weather", "arguments": '
        '"{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}]<|/tool_call|>',
    },
}
EXPECTED = {
    "single": ("", [WEATHER]),
    "several": ("", [WEATHER, TIME]),
    "text_before": ("Let me check.", [WEATHER]),
    "string_args": ("", [WEATHER]),
}

BAD_CASES = {
    "hermes": {
        "bad_json": '<tool_call>{"name": "get_weather", "arguments": {city: 1}}</tool_call>',
        "no_name": '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',
        "args_not_object": '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "partial": '<tool_call>{"name": "get_weather", "argu',
    },
    "llama3": {
        "bad_json": '{"name": "get_weather", "parameters": {city: 1}}',
        "no_name": '{"parameters": {"city": "Paris"}}',
        "args_not_object": '{"name": "f", "parameters": "[1]"}',
        "partial": '<|python_tag|>{"name": "get_weather", "parame',
    },
    "mistral": {
        "bad_json": '[TOOL_CALLS][{"name": "get_weather", "arguments": {city: 1}}]',
        "no_name": '[TOOL_CALLS][{"arguments": {"city": "Paris"}}]',
        "args_not_object": "[TOOL_CALLS]f[ARGS][1]",
        "partial": '[TOOL_CALLS][{"name": "get_weather", "argu',
    },
    "phi4": {
        "bad_json": '<|tool_call|>[{"name": "get_weather", "arguments": {city: 1}}]<|/tool_call|>',
        "no_name": '<|tool_call|>[{"arguments": {"city": "Paris"}}]<|/tool_call|>',
        "args_not_object": '<|tool_call|>[{"name": "f", "arguments": 3}]<|/tool_call|>',
        "partial": '<|tool_call|>[{"name": "get_weather", "argu',
    },
}
BAD_MESSAGE = {
    "bad_json": "invalid JSON",
    "no_name": "missing function name",
    "args_not_object": "not a JSON object",
    "partial": "unterminated",
}

PLAIN = [
    "The weather in Paris is mild.",
    "Use a <b>tag</b> or a [link] or { braces } here.",
    "x < y and a [ b",
    "",
]

FORMATS = list(OK_CASES)


def summary(message: ParsedMessage) -> tuple[str, list[tuple[str, dict]]]:
    return message.content, [(c.name, c.arguments) for c in message.tool_calls]


def stream(text: str, fmt: str, step: int = 1) -> list[ToolCall | str]:
    """Every item the streaming parser gives when text arrives step characters at a time."""
    parser = StreamingToolCallParser(fmt)
    items: list[ToolCall | str] = []
    for i in range(0, len(text), step):
        items += parser.feed(text[i : i + step])
    return items + parser.finish()


def stream_summary(text: str, fmt: str, step: int = 1) -> tuple[str, list[tuple[str, dict]]]:
    items = stream(text, fmt, step)
    content = "".join(i for i in items if isinstance(i, str)).strip()
    return content, [(i.name, i.arguments) for i in items if isinstance(i, ToolCall)]


OK_PARAMS = [(fmt, case) for fmt in FORMATS for case in OK_CASES[fmt]]
BAD_PARAMS = [(fmt, case) for fmt in FORMATS for case in BAD_CASES[fmt]]


@pytest.mark.parametrize(("fmt", "case"), OK_PARAMS)
def test_parse_calls(fmt, case):
    assert summary(parse(OK_CASES[fmt][case], fmt)) == EXPECTED[case]


@pytest.mark.parametrize(("fmt", "case"), OK_PARAMS)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streaming_matches_parse(fmt, case, step):
    text = OK_CASES[fmt][case]
    assert stream_summary(text, fmt, step) == summary(parse(text, fmt))


@pytest.mark.parametrize(("fmt", "case"), BAD_PARAMS)
def test_parse_malformed_raises(fmt, case):
    with pytest.raises(ToolCallError, match=BAD_MESSAGE[case]) as info:
        parse(BAD_CASES[fmt][case], fmt)
    assert info.value.status == 422
    assert info.value.type == "invalid_output"
    assert '"' in info.value.message  # the offending text is quoted


@pytest.mark.parametrize(("fmt", "case"), BAD_PARAMS)
def test_streaming_malformed_raises(fmt, case):
    with pytest.raises(ToolCallError, match=BAD_MESSAGE[case]):
        stream(BAD_CASES[fmt][case], fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_partial_call_raises_only_at_finish(fmt):
    parser = StreamingToolCallParser(fmt)
    items = [piece for ch in BAD_CASES[fmt]["partial"] for piece in parser.feed(ch)]
    assert not any(isinstance(i, ToolCall) for i in items)
    with pytest.raises(ToolCallError, match="unterminated"):
        parser.finish()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_has_no_calls(fmt, text):
    assert summary(parse(text, fmt)) == (text.strip(), [])
    assert "".join(stream(text, fmt)) == text


def test_long_offending_text_is_truncated():
    with pytest.raises(ToolCallError) as info:
        parse("<tool_call>{" + "x" * 5000 + "</tool_call>", "hermes")
    assert len(info.value.message) < 400


def test_ids_are_openai_style_and_unique():
    calls = parse(OK_CASES["hermes"]["several"], "hermes").tool_calls
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 2


def test_content_around_calls_is_kept():
    text = 'Before <tool_call>{"name": "f", "arguments": {}}</tool_call> after.'
    assert summary(parse(text, "hermes")) == ("Before  after.", [("f", {})])


def test_missing_arguments_are_empty():
    assert summary(parse('<tool_call>{"name": "f"}</tool_call>', "hermes")) == ("", [("f", {})])


def test_arguments_with_markers_and_braces_inside_strings():
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"s": "}]\\" [TOOL_CALLS] {"}}]'
    assert summary(parse(text, "mistral")) == ("", [("f", {"s": '}]" [TOOL_CALLS] {'})])


def test_llama3_trailing_separator_is_accepted():
    text = '{"name": "f", "parameters": {"a": 1}};'
    assert summary(parse(text, "llama3")) == ("", [("f", {"a": 1})])


def test_llama3_text_not_starting_with_brace_is_content():
    text = 'Answer: {"name": "f"} is just an example.'
    assert summary(parse(text, "llama3")) == (text, [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_before_call_is_released_early(fmt):
    text = OK_CASES[fmt]["text_before"]
    parser = StreamingToolCallParser(fmt)
    released = ""
    for i, ch in enumerate(text):
        for item in parser.feed(ch):
            assert isinstance(item, str), "no call before its end"
            released += item
        if released.strip() == "Let me check.":
            assert i < len(text) - 5  # released well before the call completes
            break
    else:
        pytest.fail("text before the call was held back")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_call_is_emitted_as_soon_as_it_ends(fmt):
    text = OK_CASES[fmt]["several"]
    parser = StreamingToolCallParser(fmt)
    seen_calls_at = []
    for i, ch in enumerate(text):
        if any(isinstance(item, ToolCall) for item in parser.feed(ch)):
            seen_calls_at.append(i)
    assert seen_calls_at, "calls were only emitted at finish()"
    assert seen_calls_at[-1] == len(text) - 1


def test_lone_angle_bracket_is_released():
    parser = StreamingToolCallParser("hermes")
    assert parser.feed("a <") == ["a "]  # "<" may begin <tool_call>
    assert parser.feed("<") == ["<"]  # "<<" cannot, the first "<" goes out
    assert parser.feed(" b") == ["< b"]
    assert parser.finish() == []


def test_marker_prefix_held_back_then_released_at_finish():
    parser = StreamingToolCallParser("phi4")
    assert parser.feed("x <|tool") == ["x "]
    assert parser.finish() == ["<|tool"]


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        StreamingToolCallParser("nope")


@pytest.mark.parametrize(
    ("template", "family", "expected"),
    [
        ("{% if tools %}<tool_call>{{ t }}</tool_call>{% endif %}", "llama", "hermes"),
        ("{{ '[TOOL_CALLS]' }}", None, "mistral"),
        ("{{ '<|python_tag|>' }}", None, "llama3"),
        ("{% if m.role == 'ipython' %}", None, "llama3"),
        ("<|tool_call|>{{ x }}<|/tool_call|>", None, "phi4"),
        ("{{ '<|tool|>' + tools | tojson + '<|/tool|>' }}", "llama", "phi4"),
        ("{{ '[TOOL_CALLS] [' }}", "qwen2", "mistral"),  # the template wins over the family
        ("{{ messages }}", "qwen2", "hermes"),
        (None, "qwen3", "hermes"),
        (None, "llama", "llama3"),
        (None, "mistral", "mistral"),
        (None, "phi3", "phi4"),
        (None, None, "hermes"),
        ("", "gpt2", "hermes"),
    ],
)
def test_detect_format(template, family, expected):
    assert detect_format(template, family) == expected


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["c", "f"]},
                    "days": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_validate_arguments_ok():
    validate_arguments(ToolCall("get_weather", {"city": "Paris", "days": [1, 2]}), TOOLS)
    validate_arguments(ToolCall("now", {}), TOOLS)


def test_validate_arguments_unknown_function():
    with pytest.raises(ToolCallError, match='unknown function "get_time"') as info:
        validate_arguments(ToolCall("get_time", {}), TOOLS)
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ({"city": 3}, "/city"),
        ({"city": "Paris", "days": [1, "two"]}, "/days/1"),
        ({}, "/"),
        ({"city": "Paris", "unit": "k"}, "/unit"),
    ],
)
def test_validate_arguments_schema_violation(arguments, path):
    with pytest.raises(ToolCallError, match='"get_weather"') as info:
        validate_arguments(ToolCall("get_weather", arguments), TOOLS)
    assert f"at {path}:" in info.value.message
    assert info.value.param == path


def test_validate_arguments_invalid_schema():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]
    with pytest.raises(ToolCallError, match="schema"):
        validate_arguments(ToolCall("f", {}), tools)


def test_a_function_without_parameters_takes_no_arguments():
    from ortserve.engine.toolcalls import ToolCall, ToolCallError, validate_arguments

    tools = [{"type": "function", "function": {"name": "now"}}]
    validate_arguments(ToolCall("now", {}), tools)
    with pytest.raises(ToolCallError, match="do not match its parameters schema"):
        validate_arguments(ToolCall("now", {"tz": "UTC"}), tools)
