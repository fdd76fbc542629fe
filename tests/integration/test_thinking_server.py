"""Thinking through a real `ortserve serve`: each protocol returns it apart from the answer.

One conversion of the tiny qwen3 checkpoint, under Qwen3's own chat template (as a real Qwen3
checkpoint ships it), gives "qwen3-think"; two Modelfile TEMPLATEs over that bundle give
"r1-think" (a DeepSeek-R1-style template whose generation prompt opens the thinking section,
`<|im_start|>assistant\\n<think>\\n`) and "plain" (the fixtures' ChatML template: no thinking).

The weights are random, so under r1-think every generated token is inside the thinking
section the prompt opened. The oracle is the model's own output: the same prompt generated
raw (no template, no split) is what each protocol must split into thinking and content. The
tests check where each part goes, streamed and whole, never what the text says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest

from converters import convert
from ortserve.library import Library
from ortserve.library.modelfile import parse_modelfile
from ortserve.models.create import create_model
from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

QWEN3 = (Path(__file__).parents[1] / "data" / "qwen3_chat_template.jinja").read_text()
# DeepSeek-R1's layout in ChatML: earlier answers lose their thinking, and the generation
# prompt opens the section, so the model starts mid-thought (and nothing can turn it off).
R1 = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
TOKENS = 12
HI = [{"role": "user", "content": "Hi"}]
# What each template renders for HI: written out here, not rendered by the code under test.
R1_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
QWEN3_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
QWEN3_OFF_PROMPT = QWEN3_PROMPT + "<think>\n\n</think>\n\n"  # Qwen3's enable_thinking=false
GREEDY = {"temperature": 0, "num_predict": TOKENS}
ABSENT = object()  # a field left out of the request


@pytest.fixture(scope="module")
def think_library(tmp_path_factory, tiny_checkpoint) -> Library:
    scratch = tmp_path_factory.mktemp("thinking-server")
    checkpoint = scratch / "qwen3"
    shutil.copytree(tiny_checkpoint("qwen3"), checkpoint)
    chatml = (checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    (checkpoint / "chat_template.jinja").write_text(QWEN3, encoding="utf-8")
    library = Library(scratch / "models")
    convert(checkpoint, "qwen3-think", precision="fp32", library=library, progress=False)
    for name, template in (("r1-think", R1), ("plain", chatml)):
        assert '"""' not in template
        spec = parse_modelfile(f'FROM qwen3-think\nTEMPLATE """{template}"""\n', scratch)
        create_model(library, name, spec)
    return library


@pytest.fixture(scope="module")
def served(think_library):
    running = Server(think_library)
    yield running
    running.stop()


def _post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(served.url + path, json=body, timeout=120)


def _raw(served, model: str, prompt: str) -> dict:
    """The model's own output for `prompt`: no template, nothing split."""
    reply = _post(served, "/api/generate", {"model": model, "prompt": prompt, "raw": True,
                                            "stream": False, "options": GREEDY})  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert "thinking" not in reply.json()
    return reply.json()


@pytest.fixture(scope="module")
def r1(served) -> SimpleNamespace:
    """What r1-think writes after R1_PROMPT, split by hand: the section was opened by the
    prompt, so it is thinking up to a closing tag (if the model ever writes one)."""
    raw = _raw(served, "r1-think", R1_PROMPT)
    thinking, closed, content = raw["response"].partition("</think>")
    reference = SimpleNamespace(thinking=thinking.strip(), content=content.lstrip() if closed else "",
                                prompt_tokens=raw["prompt_eval_count"])  # fmt: skip
    # Without thinking to separate, every check below would pass vacuously.
    assert reference.thinking and raw["eval_count"] == TOKENS
    return reference


def _native(served, path: str, model: str, think=ABSENT, stream=False) -> list[dict]:
    """The objects of an /api/chat or /api/generate answer (one, or each streamed line)."""
    body = {"model": model, "stream": stream, "options": GREEDY}
    body.update({"messages": HI} if path == "/api/chat" else {"prompt": HI[0]["content"]})
    if think is not ABSENT:
        body["think"] = think
    if not stream:
        reply = _post(served, path, body)
        assert reply.status_code == 200, reply.text
        return [reply.json()]
    with httpx.stream("POST", served.url + path, json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        return [json.loads(line) for line in reply.iter_lines() if line]


def _parts(path: str, objects: list[dict]) -> tuple[list[str], list[str]]:
    """(thinking pieces, content pieces), where this endpoint puts each; a field absent or
    empty gives nothing, so a stray empty thinking field is caught by the key checks."""
    holders = [o["message"] for o in objects] if path == "/api/chat" else objects
    text = "content" if path == "/api/chat" else "response"
    return ([h["thinking"] for h in holders if "thinking" in h],
            [h[text] for h in holders if h[text]])  # fmt: skip


NATIVE = pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])


# ---- which models think -----------------------------------------------------------------------


def test_show_lists_thinking_for_the_thinking_templates(served):
    def capabilities(name):
        reply = _post(served, "/api/show", {"model": name})
        assert reply.status_code == 200, reply.text
        return reply.json()["capabilities"]

    assert "thinking" in capabilities("qwen3-think")
    assert "thinking" in capabilities("r1-think")
    assert "thinking" not in capabilities("plain")
    assert "completion" in capabilities("plain")


# ---- Ollama's API -----------------------------------------------------------------------------


@NATIVE
@pytest.mark.parametrize("think", [ABSENT, True, "high"], ids=["absent", "true", "high"])
def test_native_separates_the_opened_section(served, r1, path, think):
    (whole,) = _native(served, path, "r1-think", think)
    thinking, content = _parts(path, [whole])
    assert thinking == [r1.thinking]
    assert "".join(content) == r1.content and "<think>" not in "".join(content)
    assert whole["prompt_eval_count"] == r1.prompt_tokens  # the prompt R1_PROMPT spells out
    assert whole["eval_count"] == TOKENS and whole["done_reason"] == "length"

    lines = _native(served, path, "r1-think", think, stream=True)
    thinking, content = _parts(path, lines)
    assert len(thinking) > 1, "thinking must stream in pieces, not arrive whole at the end"
    assert all(thinking) and "".join(thinking) == r1.thinking
    assert "".join(content) == r1.content
    assert lines[-1]["done"] and [o["done"] for o in lines].count(True) == 1
    assert lines[-1]["eval_count"] == TOKENS


@NATIVE
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_native_think_false_hides_what_r1_cannot_stop(served, r1, path, stream):
    objects = _native(served, path, "r1-think", False, stream=stream)
    thinking, content = _parts(path, objects)
    assert thinking == []  # no thinking field at all, not even an empty one
    assert "".join(content) == r1.content  # the thinking did not turn into content
    assert objects[-1]["eval_count"] == TOKENS  # the hidden tokens still count


@NATIVE
def test_native_think_false_on_qwen3_renders_the_empty_section(served, path):
    """Qwen3 can turn thinking off: the prompt gets `<think>\\n\\n</think>\\n\\n` and the
    answer is all content; with thinking on, the prompt is the plain one."""
    off = _raw(served, "qwen3-think", QWEN3_OFF_PROMPT)
    on = _raw(served, "qwen3-think", QWEN3_PROMPT)
    for think, expected in ((False, off), (True, on)):
        (whole,) = _native(served, path, "qwen3-think", think)
        thinking, content = _parts(path, [whole])
        assert whole["prompt_eval_count"] == expected["prompt_eval_count"]
        assert thinking == [] and "".join(content) == expected["response"]
        assert expected["response"].strip(), "an answer to compare, or the check is vacuous"
    assert off["prompt_eval_count"] > on["prompt_eval_count"]


@NATIVE
def test_native_think_true_on_a_model_without_thinking_is_refused(served, path):
    body = {"model": "plain", "think": True, "stream": False, "options": GREEDY}
    body.update({"messages": HI} if path == "/api/chat" else {"prompt": "Hi"})
    refused = _post(served, path, body)
    assert refused.status_code == 400
    assert '"plain:latest" does not support thinking' in refused.json()["error"]

    (whole,) = _native(served, path, "plain", False)  # false changes nothing
    assert whole["prompt_eval_count"] == _native(served, path, "plain")[0]["prompt_eval_count"]
    assert _parts(path, [whole]) == _parts(path, _native(served, path, "plain"))
    assert _parts(path, [whole])[0] == []


def test_think_true_with_a_raw_prompt_is_refused(served):
    """No template renders a raw prompt, so nothing can open or separate a section."""
    refused = _post(served, "/api/generate", {"model": "r1-think", "prompt": R1_PROMPT,
                                              "raw": True, "think": True, "stream": False})  # fmt: skip
    assert refused.status_code == 400
    assert "does not support thinking" in refused.json()["error"]


# ---- OpenAI's chat completions ----------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def _completion(oai, model: str, effort=ABSENT, **kw):
    extra = {} if effort is ABSENT else {"reasoning_effort": effort}
    return oai.chat.completions.create(model=model, messages=HI, max_tokens=TOKENS,
                                       temperature=0, **extra, **kw)  # fmt: skip


@pytest.mark.parametrize("effort", [ABSENT, "high", "low"], ids=["absent", "high", "low"])
def test_chat_completions_reasoning_content(oai, r1, effort):
    whole = _completion(oai, "r1-think", effort)
    message = whole.choices[0].message
    assert message.model_extra.get("reasoning_content") == r1.thinking
    assert message.content == r1.content
    assert whole.usage.completion_tokens == TOKENS
    assert whole.usage.prompt_tokens == r1.prompt_tokens

    chunks = list(_completion(oai, "r1-think", effort, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thinking = [d.model_extra["reasoning_content"] for d in deltas
                if "reasoning_content" in (d.model_extra or {})]  # fmt: skip
    assert len(thinking) > 1 and "".join(thinking) == r1.thinking
    assert "".join(d.content or "" for d in deltas) == r1.content
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_written_while_thinking_does_not_end_the_turn(oai, r1, stream):
    """Stops apply to the answer (issue 20): one the thinking held cut the turn there, so the
    answer came back empty. r1-think writes only thinking: all of it comes back, to the end."""
    stop = r1.thinking.split()[len(r1.thinking.split()) // 2]  # a word from the middle
    assert stop not in r1.content
    if not stream:
        whole = _completion(oai, "r1-think", stop=[stop])
        assert whole.choices[0].message.model_extra.get("reasoning_content") == r1.thinking
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == TOKENS
        return
    chunks = list(_completion(oai, "r1-think", stop=[stop], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content", "") for d in deltas
                   if d.model_extra) == r1.thinking  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("effort", ["none", "minimal"])
def test_chat_completions_effort_off_hides_the_reasoning(oai, r1, effort):
    whole = _completion(oai, "r1-think", effort)
    message = whole.choices[0].message
    assert "reasoning_content" not in (message.model_extra or {})
    assert message.content == r1.content
    assert whole.usage.completion_tokens == TOKENS

    deltas = [c.choices[0].delta for c in _completion(oai, "r1-think", effort, stream=True)
              if c.choices]  # fmt: skip
    assert not any("reasoning_content" in (d.model_extra or {}) for d in deltas)
    assert "".join(d.content or "" for d in deltas) == r1.content


def test_chat_completions_refuses_reasoning_for_a_model_without_thinking(oai):
    with pytest.raises(openai.BadRequestError) as refused:
        _completion(oai, "plain", "high")
    # named as this API knows the field (the core's errors use each protocol's names)
    assert refused.value.param == "reasoning_effort"
    assert "does not support thinking" in str(refused.value)
    for off in ("none", "minimal"):  # accepted: they change nothing here
        message = _completion(oai, "plain", off).choices[0].message
        assert message.content and "reasoning_content" not in (message.model_extra or {})


# ---- OpenAI's Responses -----------------------------------------------------------------------


def _respond(oai, model: str, effort=ABSENT, **kw):
    extra = {} if effort is ABSENT else {"reasoning": {"effort": effort}}
    return oai.responses.create(model=model, input="Hi", max_output_tokens=TOKENS,
                                temperature=0, store=False, **extra, **kw)  # fmt: skip


def _reasoning_and_text(response) -> tuple[list[str], str]:
    kinds = [item.type for item in response.output]
    reasoning = [item for item in response.output if item.type == "reasoning"]
    (message,) = [item for item in response.output if item.type == "message"]
    assert kinds[-1] == "message" and kinds.count("reasoning") == len(reasoning) <= 1
    texts = []
    for item in reasoning:
        assert [part.type for part in item.content] == ["reasoning_text"]
        texts.append(item.content[0].text)
    return texts, "".join(part.text for part in message.content)


@pytest.mark.parametrize("effort", [ABSENT, "high"], ids=["absent", "high"])
def test_responses_reasoning_item(oai, r1, effort):
    whole = _respond(oai, "r1-think", effort)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert _reasoning_and_text(whole) == ([r1.thinking], r1.content)
    assert whole.usage.output_tokens == TOKENS

    events = list(_respond(oai, "r1-think", effort, stream=True))
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == r1.thinking
    (done,) = [e.text for e in events if e.type == "response.reasoning_text.done"]
    assert done == r1.thinking
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r1.content
    final = events[-1].response
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert _reasoning_and_text(final) == ([r1.thinking], r1.content)


@pytest.mark.parametrize("effort", ["none", "minimal"])
def test_responses_effort_off_hides_the_reasoning(oai, r1, effort):
    whole = _respond(oai, "r1-think", effort)
    assert [item.type for item in whole.output] == ["message"]
    assert _reasoning_and_text(whole) == ([], r1.content)
    assert whole.usage.output_tokens == TOKENS

    events = list(_respond(oai, "r1-think", effort, stream=True))
    assert not any(e.type.startswith("response.reasoning") for e in events)
    assert [item.type for item in events[-1].response.output] == ["message"]


def test_responses_refuse_reasoning_for_a_model_without_thinking(oai):
    with pytest.raises(openai.BadRequestError) as refused:
        _respond(oai, "plain", "high")
    assert refused.value.param == "reasoning.effort"
    assert "does not support thinking" in str(refused.value)


# ---- Anthropic's Messages ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude(served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0)


ENABLED = {"type": "enabled", "budget_tokens": 1024}


def _message(claude, model: str, thinking=ABSENT, **kw):
    extra = {} if thinking is ABSENT else {"thinking": thinking}
    return claude.messages.create(model=model, messages=HI, max_tokens=TOKENS,
                                  extra_body={"temperature": 0}, **extra, **kw)  # fmt: skip


def _blocks(content) -> tuple[list[str], str]:
    """(thinking blocks' text, the text blocks' text); thinking blocks must come first."""
    kinds = [block.type for block in content]
    assert kinds == sorted(kinds, key=lambda kind: kind != "thinking")
    thinking = [block.thinking for block in content if block.type == "thinking"]
    return thinking, "".join(block.text for block in content if block.type == "text")


@pytest.mark.parametrize("thinking", [ENABLED, ABSENT], ids=["enabled", "absent"])
def test_messages_thinking_block(claude, r1, thinking):
    whole = _message(claude, "r1-think", thinking)
    assert whole.content[0].type == "thinking"
    assert _blocks(whole.content) == ([r1.thinking], r1.content)
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == TOKENS

    kw = {} if thinking is ABSENT else {"thinking": thinking}
    with claude.messages.stream(model="r1-think", messages=HI, max_tokens=TOKENS,
                                extra_body={"temperature": 0}, **kw) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    pieces = [d.thinking for d in deltas if d.type == "thinking_delta"]
    assert len(pieces) > 1 and "".join(pieces) == r1.thinking
    assert "".join(d.text for d in deltas if d.type == "text_delta") == r1.content
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts[0] == "thinking" and starts.count("thinking") == 1
    assert _blocks(final.content) == ([r1.thinking], r1.content)


def test_messages_thinking_disabled_has_no_thinking_block(claude, r1):
    whole = _message(claude, "r1-think", {"type": "disabled"})
    assert _blocks(whole.content) == ([], r1.content)
    assert whole.usage.output_tokens == TOKENS

    events = list(_message(claude, "r1-think", {"type": "disabled"}, stream=True))
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert not any(d.type == "thinking_delta" for d in deltas)
    assert not any(e.content_block.type == "thinking" for e in events
                   if e.type == "content_block_start")  # fmt: skip
    assert "".join(d.text for d in deltas if d.type == "text_delta") == r1.content


def test_messages_refuse_thinking_for_a_model_without_it(claude):
    with pytest.raises(anthropic.BadRequestError) as refused:
        _message(claude, "plain", ENABLED)
    assert "does not support thinking" in str(refused.value)
    plain = _message(claude, "plain", {"type": "disabled"})
    assert [block.type for block in plain.content] == ["text"]
