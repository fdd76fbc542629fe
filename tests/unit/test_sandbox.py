"""Chat templates render within limits (engine/sandbox.py), and real templates render exactly
as transformers renders them."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from converters.tiny import CHAT_TEMPLATE
from ortserve.engine.prompts import ChatTemplate, build_chat_prompt, build_generate_prompt
from ortserve.engine.sandbox import (
    LOOP_ITERATIONS,
    MAX_SOURCE_CHARS,
    OUTPUT_SIZE,
    TEMPLATE_SIZE,
    TIME,
    TemplateLimitExceeded,
    TemplateLimits,
)
from ortserve.errors import InvalidRequest
from ortserve.serving import requests
from ortserve.serving.prompting import template_limits
from tests.integration.family_templates import TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "Tell me a story."},
]
SMALL = TemplateLimits(chars=10_000, iterations=1_000, seconds=1.0)

# Each one runs for hours or takes gigabytes unbounded; each names the limit it breaks.
HOSTILE = {
    "nested ranges": (
        "{% for i in range(100000) %}{% for k in range(100000) %}x{% endfor %}{% endfor %}",
        LOOP_ITERATIONS,
    ),
    "silent nested ranges": (
        "{% for i in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}",
        LOOP_ITERATIONS,
    ),
    "a range too long": ("{{ range(10**9)|list|length }}", LOOP_ITERATIONS),
    "string repetition": ('{{ "x" * 1000000000 }}', OUTPUT_SIZE),
    "list repetition": ("{{ ([1] * 10**9)|length }}", OUTPUT_SIZE),
    "a huge power": ("{{ 7 ** 1000000000 }}", OUTPUT_SIZE),
    "doubling with ~": (
        '{% set ns = namespace(s="x") %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}'
        "{% endfor %}{{ ns.s|length }}",
        OUTPUT_SIZE,
    ),
    "doubling with +": (
        '{% set ns = namespace(s="x") %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}'
        "{% endfor %}{{ ns.s|length }}",
        OUTPUT_SIZE,
    ),
    "padding filter": ('{{ "x"|center(10**9) }}', OUTPUT_SIZE),
    "padding method": ('{{ "x".ljust(10**9) }}', OUTPUT_SIZE),
    "format width": ('{{ "{:>999999999}".format(1) }}', OUTPUT_SIZE),
    "percent width": ('{{ "%999999999d" % 1 }}', OUTPUT_SIZE),
    "join amplifies": ('{{ range(1000)|map("string")|join("x" * 100000) }}', OUTPUT_SIZE),
    "replace amplifies": ('{{ ("ab" * 1000)|replace("", "x" * 10000) }}', OUTPUT_SIZE),
    "indent amplifies": ('{{ ("a\n" * 4000)|indent(5000) }}', OUTPUT_SIZE),
    "a block buffer": (
        '{% set x %}{% for i in range(900) %}{{ "y" * 999 }}{% endfor %}{% endset %}{{ x }}',
        OUTPUT_SIZE,
    ),
    "a macro buffer": (
        '{% macro m() %}{% for i in range(900) %}{{ "y" * 999 }}{% endfor %}{% endmacro %}'
        "{{ m() }}",
        OUTPUT_SIZE,
    ),
    "exponential macro calls": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        TIME,
    ),
}


@pytest.mark.parametrize("source, limit", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_template_past_its_limits_is_refused_naming_the_limit(source, limit):
    started = time.monotonic()
    with pytest.raises(TemplateLimitExceeded) as info:
        ChatTemplate(source).render(CHAT, limits=SMALL)
    assert info.value.limit == limit
    assert f"exceeded its {limit} limit" in info.value.message
    assert (info.value.status, info.value.param) == (400, "messages")
    assert time.monotonic() - started < SMALL.seconds + 5  # the time limit, and no more


def test_the_default_limits_refuse_the_issues_templates_quickly():
    for source, limit in (HOSTILE["nested ranges"], HOSTILE["string repetition"]):
        with pytest.raises(TemplateLimitExceeded) as info:
            ChatTemplate(source).render(CHAT)
        assert info.value.limit == limit


def test_a_template_too_long_to_compile_is_refused():
    with pytest.raises(TemplateLimitExceeded) as info:
        ChatTemplate("{{ x }}" * (MAX_SOURCE_CHARS // 7 + 1)).render(CHAT)
    assert info.value.limit == TEMPLATE_SIZE


def test_lipsum_is_not_offered():
    with pytest.raises(InvalidRequest, match="lipsum"):
        ChatTemplate("{{ lipsum(10**6) }}").render(CHAT)


def test_work_within_the_limits_renders():
    source = (
        '{% set ns = namespace(s="") %}{% for i in range(900) %}{% set ns.s = ns.s ~ "ab" %}'
        '{% endfor %}{{ ns.s|length }} {{ "x" * 9000 }}{{ "%s-%d" % ("a", 1) }}'
        '{{ "{}!".format("hi") }}{{ ", ".join(["a", "b"]) }}{{ [1, 2] + [3] }}'
    )
    assert ChatTemplate(source).render(CHAT, limits=SMALL) == (
        f"1800 {'x' * 9000}a-1hi!a, b[1, 2, 3]"
    )


# ---- parity with transformers ------------------------------------------------------------

# A transformers-style template with what real ones use: recursive macros, namespaces,
# reversed messages, loop.index/length/last, tojson with indent, set blocks, filters.
RICH = """{%- macro render_type(spec, depth=0) -%}
  {%- if spec.type == "object" and spec.properties -%}
    {{- "{\\n" }}
    {%- for name, sub in spec.properties.items() -%}
      {{- "  " * (depth + 1) ~ name }}{% if name not in (spec.required or []) %}?{% endif %}: \
{{ render_type(sub, depth + 1) }}{% if not loop.last %},{% endif %}{{ "\\n" }}
    {%- endfor -%}
    {{- "  " * depth + "}" }}
  {%- elif spec.enum -%}{{- '"' + spec.enum|join('" | "') + '"' -}}
  {%- else -%}{{ spec.type | default("any") }}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages[::-1] -%}
  {%- if ns.last_user < 0 and m.role == "user" %}\
{% set ns.last_user = messages|length - 1 - loop.index0 %}{% endif -%}
{%- endfor -%}
{%- set header %}{{ "%s messages, last user %d" % (messages|length, ns.last_user) }}{% endset -%}
{{ header|center(60) }}
{%- for t in tools or [] %}
{{ "// {}\\n".format(t.function.description) }}type {{ t.function.name }} = \
{{ render_type(t.function.parameters) }};
{{ t.function | tojson(indent=2) | indent(4) }}
{%- endfor %}
{%- for m in messages %}
<|{{ m.role }}|>{{ (m.content or "") | trim }}
{%- for c in m.tool_calls or [] %}[{{ loop.index }}/{{ loop.length }} \
{{ c.function.name ~ c.function.arguments|tojson }}]{% endfor %}
{%- endfor %}
{{ range(3)|map("string")|join(",") ~ "|" ~ ([1, 2] + [3])|sum }}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
        "when": {"type": "object", "properties": {"days": {"type": "integer"}}}}}}}]  # fmt: skip
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = [
    CHAT,
    [{"role": "system", "content": "Be brief."}, *CHAT],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "Thanks"},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def _sources() -> dict[str, str]:
    return {
        "qwen3": (ROOT / "tests/data/qwen3_chat_template.jinja").read_text(encoding="utf-8"),
        "demo-chat": (ROOT / "converters/data/demo-chat/chat_template.jinja").read_text(
            encoding="utf-8"
        ),
        "tiny": CHAT_TEMPLATE,
        "rich": RICH,
        **TEMPLATES,
    }


@pytest.mark.parametrize("name", list(_sources()))
def test_real_templates_render_as_transformers_renders_them(name):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    source, tokens = _sources()[name], {"bos_token": "<s>", "eos_token": "</s>"}
    compared = 0
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            for extra in ({}, {"enable_thinking": False}):
                try:
                    expected = chat_template_utils.render_jinja_template(
                        [messages], tools=tools, chat_template=source,
                        add_generation_prompt=True, **tokens, **extra,
                    )[0][0]  # fmt: skip
                except Exception:
                    continue  # a conversation this template refuses (alternation, roles)
                ours = ChatTemplate(source, tokens).render(
                    messages, tools=tools, add_generation_prompt=True, **extra
                )
                assert ours == expected, (name, messages, tools, extra)
                compared += 1
    assert compared >= 4, name


# ---- prompts under the limits ------------------------------------------------------------


def test_a_render_past_its_size_drops_old_turns_like_one_past_the_context():
    template = ChatTemplate(CHAT_TEMPLATE)
    huge = [{"role": "user", "content": "x" * 50_000}, {"role": "assistant", "content": "ok"}]
    messages = [*huge, {"role": "user", "content": "hi"}]
    prompt, _ = build_chat_prompt(template, messages, system=None, tools=None, count_tokens=len,
                                  num_ctx=10**9, limits=SMALL)  # fmt: skip
    assert "x" * 100 not in prompt and "hi" in prompt
    with pytest.raises(InvalidRequest) as info:
        build_chat_prompt(template, messages, system=None, tools=None, count_tokens=len,
                          num_ctx=10**9, truncate=False, limits=SMALL)  # fmt: skip
    assert info.value.code == "context_length_exceeded"
    assert "prompt is too long" in info.value.message and "output size" in info.value.message


def test_a_loop_limit_at_request_time_is_refused_not_truncated():
    # Fine for Modelfile's sample chat; quadratic in a message's length.
    quadratic = ChatTemplate(
        "{% for m in messages %}{% for i in range(m.content|length) %}"
        "{% for j in range(m.content|length) %}.{% endfor %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(TemplateLimitExceeded) as info:
        build_chat_prompt(quadratic, [{"role": "user", "content": "y" * 5000}], system=None,
                          tools=None, count_tokens=len, num_ctx=10**9, limits=SMALL)  # fmt: skip
    assert info.value.limit == LOOP_ITERATIONS


def test_a_generate_prompt_past_its_size_is_too_long():
    with pytest.raises(InvalidRequest) as info:
        build_generate_prompt(ChatTemplate('{{ "x" * 10**9 }}'), "hi", system=None, raw=False,
                              count_tokens=len, num_ctx=100, limits=SMALL)  # fmt: skip
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")


def test_request_limits_grow_with_the_context_and_the_messages():
    small = template_limits(SimpleNamespace(max_prompt_chars=1000), [{}], None)
    assert small.chars == requests.TEMPLATE_MIN_CHARS
    assert small.seconds == requests.TEMPLATE_SECONDS
    large = template_limits(SimpleNamespace(max_prompt_chars=10**7), [{}] * 10, [{}] * 2)
    assert large.chars == 2 * 10**7
    assert large.iterations == requests.TEMPLATE_ITERATIONS + 12 * (
        requests.TEMPLATE_ITERATIONS_PER_ITEM
    )


@pytest.mark.parametrize("name", ["nested ranges", "string repetition"])
def test_create_refuses_a_template_past_its_limits_naming_the_limit(name):
    from ortserve.library.modelfile import ModelSpec
    from ortserve.models.create import check_template

    source, limit = HOSTILE[name]
    with pytest.raises(InvalidRequest) as info:
        check_template(ModelSpec(template=source))
    assert (info.value.param, info.value.code) == ("template", "template_limit")
    assert info.value.message.startswith(f"template: chat template exceeded its {limit} limit")
