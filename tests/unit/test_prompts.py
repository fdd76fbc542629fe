"""Chat templates rendered like transformers' apply_chat_template; truncation to num_ctx."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest

from converters.tiny import CHAT_TEMPLATE, build_tokenizer
from ortserve.engine.prompts import (
    ChatTemplate,
    build_chat_prompt,
    build_generate_prompt,
    special_tokens,
)
from ortserve.errors import InvalidRequest

LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if tools is not none %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception("Unexpected role: " + message.role) }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + call.name + '", "parameters": ' }}
        {{- call.arguments | tojson }}
        {{- "}<|eot_id|>" }}
    {%- elif message.role == "tool" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# Whitespace control by trim_blocks/lstrip_blocks (no "-"), loop controls, tojson options.
PLAIN_BLOCKS = """{% for message in messages %}
    {% if loop.index0 > 5 %}{% break %}{% endif %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
<{{ message.role }}>{{ message.content }}</s>
{% endfor %}
{% if tools %}
TOOLS {{ tools | tojson(separators=(',', ':'), sort_keys=True) }}
{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city (°C, <b>live</b>)",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "Name, e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]
CHAT = [{"role": "user", "content": "Hello there"}]
WITH_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Wie geht's? 世界 🙂"},
]
TOOL_CALLS = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A directory with the tiny model's tokenizer files and ChatML template."""
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def bos_bundle(bundle, tmp_path_factory):
    """The same tokenizer with a bos_token saved as an AddedToken dict."""
    out = tmp_path_factory.mktemp("bos")
    shutil.copytree(bundle, out, dirs_exist_ok=True)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["bos_token"] = {
        "__type": "AddedToken",
        "content": "<|endoftext|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    path.write_text(json.dumps(config))
    return out


def hf_render(directory, messages, *, tools=None, template=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    if template is not None:
        tok.chat_template = template
    return tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize(
    ("messages", "tools"),
    [(CHAT, None), (WITH_SYSTEM, None), (CHAT, TOOLS), (WITH_SYSTEM, TOOLS), (TOOL_CALLS, TOOLS)],
    ids=["chat", "system", "tools", "system-tools", "tool-calls-and-results"],
)
def test_bundle_template_matches_transformers(bundle, messages, tools):
    template = ChatTemplate.from_bundle(bundle)
    assert template is not None and template.source == CHAT_TEMPLATE
    ours = template.render(messages, tools=tools)
    assert ours == hf_render(bundle, messages, tools=tools)
    if tools:  # the OpenAI function object as given, not ORT GenAI's reshaped one
        assert json.dumps(TOOLS[0], ensure_ascii=False) in ours
        assert "°C, <b>live</b>" in ours


@pytest.mark.parametrize("source", [LLAMA3_STYLE, MISTRAL_STYLE, PLAIN_BLOCKS])
@pytest.mark.parametrize(
    ("messages", "tools"),
    [(CHAT, None), (WITH_SYSTEM, None), (WITH_SYSTEM, TOOLS)],
    ids=["chat", "system", "tools"],
)
def test_other_templates_match_transformers(bos_bundle, source, messages, tools):
    template = ChatTemplate(source, special_tokens(bos_bundle))
    ours = template.render(messages, tools=tools)
    assert ours == hf_render(bos_bundle, messages, tools=tools, template=source)
    if source != PLAIN_BLOCKS:
        assert ours.startswith("<|endoftext|>")  # bos_token read from the AddedToken dict


def test_llama3_tool_calls_match_transformers(bos_bundle):
    template = ChatTemplate(LLAMA3_STYLE, special_tokens(bos_bundle))
    messages = TOOL_CALLS[1:]
    ours = template.render(messages, tools=TOOLS)
    assert ours == hf_render(bos_bundle, messages, tools=TOOLS, template=LLAMA3_STYLE)
    assert '"parameters": {"city": "Paris", "days": 2}}' in ours


def test_add_generation_prompt_false_and_extra_variables(bundle):
    template = ChatTemplate(
        "{{ greeting }} {{ eos_token }}{% if add_generation_prompt %}!{% endif %}"
    )
    with_tokens = ChatTemplate(template.source, special_tokens(bundle))
    assert with_tokens.render(CHAT, add_generation_prompt=False, greeting="hi") == "hi <|im_end|>"
    assert with_tokens.render(CHAT, eos_token="</s>", greeting="x") == "x </s>!"


def test_strftime_now(bundle):
    template = ChatTemplate("{{ strftime_now('%Y') }}")
    assert template.render(CHAT) == datetime.now().strftime("%Y")


def test_special_tokens_read_from_files(bundle, bos_bundle, tmp_path):
    assert special_tokens(bundle) == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert special_tokens(bos_bundle)["bos_token"] == "<|endoftext|>"
    # An older checkpoint: no added_tokens_decoder, special_tokens_map.json wins.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<old>"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": None})
    )
    assert special_tokens(tmp_path) == {"bos_token": "<s>", "eos_token": "</s>"}


def test_from_bundle_without_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.from_bundle(tmp_path) is None


def test_raise_exception_is_a_400_with_the_templates_message(bos_bundle):
    template = ChatTemplate(LLAMA3_STYLE, special_tokens(bos_bundle))
    messages = [*CHAT, {"role": "system", "content": "late system"}, *CHAT]
    with pytest.raises(InvalidRequest) as info:
        build_chat_prompt(
            template, messages, system=None, tools=None, count_tokens=len, num_ctx=10**6
        )
    assert str(info.value) == "Unexpected role: system"
    assert info.value.param == "messages" and info.value.status == 400


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}{{ m.content }}",  # syntax error
        "{{ messages[0].content + 1 }}",  # TypeError while rendering
        "{{ messages.append(1) }}",  # the sandbox forbids changing the messages
    ],
)
def test_broken_templates_are_400(source):
    with pytest.raises(InvalidRequest) as info:
        ChatTemplate(source).render(CHAT)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "critic", "content": "hi"}], "messages[0].role"),
        ([{"role": 1, "content": "hi"}], "messages[0].role"),
        (
            [*CHAT, {"role": "assistant", "content": "a"}, {"role": "user", "content": 3}],
            "messages[2].content",
        ),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "assistant", "content": None, "tool_calls": "x"}], "messages[0].tool_calls"),
    ],
)
def test_invalid_messages_are_400(bundle, messages, param):
    with pytest.raises(InvalidRequest) as info:
        build_chat_prompt(
            ChatTemplate.from_bundle(bundle),
            messages,
            system=None,
            tools=None,
            count_tokens=len,
            num_ctx=10**6,
        )
    assert info.value.param == param


def test_invalid_tools_are_400(bundle):
    with pytest.raises(InvalidRequest) as info:
        build_chat_prompt(
            ChatTemplate.from_bundle(bundle),
            CHAT,
            system=None,
            tools=["get_weather"],
            count_tokens=len,
            num_ctx=10**6,
        )
    assert info.value.param == "tools"


def test_assistant_tool_call_without_content_is_valid(bundle):
    template = ChatTemplate.from_bundle(bundle)
    prompt, _ = build_chat_prompt(
        template, TOOL_CALLS, system=None, tools=TOOLS, count_tokens=len, num_ctx=10**6
    )
    assert prompt == hf_render(bundle, TOOL_CALLS, tools=TOOLS)


# --- system prompt and truncation (a whitespace token counter) ---

SIMPLE = ChatTemplate(
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def words(text: str) -> int:
    return len(text.split())


def chat(prompt_messages, num_ctx=10**6, system=None, truncate=True, template=SIMPLE):
    return build_chat_prompt(
        template,
        prompt_messages,
        system=system,
        tools=None,
        count_tokens=words,
        num_ctx=num_ctx,
        truncate=truncate,
    )


def conversation(turns: int) -> list[dict]:
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} " + "w " * 8})
        messages.append({"role": "assistant", "content": f"answer {i} " + "w " * 8})
    messages.append({"role": "user", "content": "final question"})
    return messages


def test_prompt_and_token_count():
    prompt, tokens = chat(CHAT)
    assert prompt == "user: Hello there\nassistant:"
    assert tokens == 4


def test_system_prepended_when_messages_have_none():
    prompt, _ = chat(CHAT, system="Be brief.")
    assert prompt == "system: Be brief.\nuser: Hello there\nassistant:"
    prompt, _ = chat([{"role": "system", "content": "Mine."}, *CHAT], system="Be brief.")
    assert prompt == "system: Mine.\nuser: Hello there\nassistant:"


def test_fits_untouched():
    messages = conversation(3)
    prompt, tokens = chat(messages)
    assert tokens == words(prompt) and "question 0" in prompt


def test_truncation_drops_the_oldest_and_keeps_system():
    messages = [{"role": "system", "content": "Stay on topic."}, *conversation(4)]
    full = words(chat(messages)[0])
    prompt, tokens = chat(messages, num_ctx=full - 1)
    assert tokens <= full - 1
    assert prompt.startswith("system: Stay on topic.\nuser: question 1 ")
    assert "question 0" not in prompt and "answer 0" not in prompt
    assert prompt.endswith("user: final question\nassistant:")


def test_truncation_keeps_as_much_history_as_fits():
    messages = conversation(4)
    tokens_per_turn = 2 * (2 + 1 + 8)  # role, label, number, 8 words, for question and answer
    full = words(chat(messages)[0])
    prompt, _ = chat(messages, num_ctx=full - tokens_per_turn)
    assert prompt.startswith("user: question 1 ")
    prompt, _ = chat(messages, num_ctx=full - tokens_per_turn - 1)
    assert prompt.startswith("user: question 2 ")


def test_truncation_keeps_system_messages_anywhere():
    messages = conversation(3)
    messages.insert(3, {"role": "system", "content": "Midway note."})
    prompt, _ = chat(messages, num_ctx=20)
    assert prompt == "system: Midway note.\nuser: final question\nassistant:"


def test_truncation_starts_on_a_user_turn(bos_bundle):
    """Mistral-style templates refuse a history that starts with the assistant."""
    template = ChatTemplate(MISTRAL_STYLE, special_tokens(bos_bundle))
    messages = conversation(4)
    full = words(chat(messages, template=template)[0])
    prompt, _ = chat(messages, num_ctx=full - 5, template=template)
    assert prompt.startswith("<|endoftext|> [INST] question 1 ")


def test_too_long_even_after_truncation():
    messages = [{"role": "system", "content": "s " * 10}, *conversation(2)]
    with pytest.raises(InvalidRequest) as info:
        chat(messages, num_ctx=12)
    error = info.value
    assert str(error) == "prompt is too long: 15 tokens exceed the context length of 12"
    assert (error.param, error.code, error.status) == ("messages", "context_length_exceeded", 400)


def test_truncate_false_refuses_at_once():
    messages = conversation(3)
    full = words(chat(messages)[0])
    with pytest.raises(InvalidRequest) as info:
        chat(messages, num_ctx=full - 1, truncate=False)
    assert str(info.value) == (
        f"prompt is too long: {full} tokens exceed the context length of {full - 1}"
    )
    assert info.value.code == "context_length_exceeded"


def test_single_message_too_long():
    with pytest.raises(InvalidRequest):
        chat([{"role": "user", "content": "w " * 50}], num_ctx=10)


def test_no_template_is_400():
    with pytest.raises(InvalidRequest):
        build_chat_prompt(None, CHAT, system=None, tools=None, count_tokens=len, num_ctx=100)


# --- /api/generate ---


def generate(template, prompt, *, system=None, raw=False, num_ctx=10**6):
    return build_generate_prompt(
        template, prompt, system=system, raw=raw, count_tokens=words, num_ctx=num_ctx
    )


def test_generate_templated(bundle):
    template = ChatTemplate.from_bundle(bundle)
    prompt, tokens = generate(template, "Why is the sky blue?", system="Be brief.")
    expected = hf_render(
        bundle,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    )
    assert prompt == expected and tokens == words(expected)


def test_generate_raw_is_unchanged(bundle):
    template = ChatTemplate.from_bundle(bundle)
    assert generate(template, "<|im_start|>x", system="ignored", raw=True)[0] == "<|im_start|>x"


def test_generate_without_template():
    assert generate(None, "Once upon")[0] == "Once upon"
    assert generate(None, "Once upon", system="Tell a story.")[0] == "Tell a story.\n\nOnce upon"


def test_generate_too_long_and_bad_prompt():
    with pytest.raises(InvalidRequest) as info:
        generate(None, "a b c d", num_ctx=3)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(InvalidRequest) as info:
        generate(None, ["a"])
    assert info.value.param == "prompt"
