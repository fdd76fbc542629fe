"""Thinking: templates that have it, prompts that switch it, and the streamed split of answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.tiny import CHAT_TEMPLATE
from ortserve.engine.prompts import ChatTemplate, build_chat_prompt, build_generate_prompt
from ortserve.errors import InvalidRequest
from ortserve.library.bundle import capabilities, template_capabilities, template_thinks
from ortserve.serving.thinking import (
    AnswerStops,
    ThinkingSplitter,
    prompt_opens_thinking,
    split_whole,
    thinking_tags,
)

QWEN3 = (Path(__file__).parents[1] / "data" / "qwen3_chat_template.jinja").read_text()
# DeepSeek-R1's layout, shortened: the generation prompt opens the thinking section, and
# earlier answers lose theirs; there is no switch.
DEEPSEEK_R1 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}{{ '<｜User｜>' + message.content }}"
    "{% elif message.role == 'assistant' %}{% set content = message.content %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
MAGISTRAL_STYLE = "{% for m in messages %}{{ m.content }}{% endfor %}[THINK]"
ANSWER = "<think>\nThe user greets.\nGreet back.\n</think>\n\nHello there!"


def _count(text: str) -> int:
    return len(text.split())


def _chat(template: str, messages: list[dict], **kw) -> str:
    prompt, _ = build_chat_prompt(
        ChatTemplate(template), messages, system=None, tools=None, count_tokens=_count,
        num_ctx=10_000, **kw,
    )  # fmt: skip
    return prompt


def _pieces(chunks: list[str], **kw) -> list[tuple[str, str]]:
    splitter = ThinkingSplitter(**kw)
    pieces = [p for chunk in chunks for p in splitter.feed(chunk)] + splitter.finish()
    return pieces


def _joined(pieces: list[tuple[str, str]]) -> tuple[str, str]:
    text = {"thinking": "", "content": ""}
    for kind, piece in pieces:
        text[kind] += piece
    return text["thinking"], text["content"]


# --- which templates think


def test_qwen3_thinks_and_can_stop():
    template = ChatTemplate(QWEN3)
    assert template.thinking and template.can_disable_thinking
    assert template_thinks(QWEN3)


def test_deepseek_r1_thinks_but_cannot_stop():
    template = ChatTemplate(DEEPSEEK_R1)
    assert template.thinking and not template.can_disable_thinking


@pytest.mark.parametrize(
    "source",
    [
        "{{ '</think>' }}",  # DeepSeek-R1's first templates: only the closing tag
        "{{ message.reasoning_content }}",
        "{% if enable_thinking %}x{% endif %}",
        MAGISTRAL_STYLE,
        "{{ '<seed:think>' }}",
    ],
)
def test_a_tag_or_a_thinking_variable_makes_a_thinking_template(source):
    assert template_thinks(source)


@pytest.mark.parametrize("source", [CHAT_TEMPLATE, "", "{{ '<thinking>' }}", "{{ thinking }}"])
def test_templates_without_a_thinking_section_do_not_think(source):
    assert not template_thinks(source)
    assert not ChatTemplate(source or "x").thinking


def test_template_capabilities():
    assert template_capabilities(CHAT_TEMPLATE) == ["completion", "tools"]
    assert template_capabilities(QWEN3) == ["completion", "tools", "thinking"]
    assert template_capabilities(DEEPSEEK_R1) == ["completion", "thinking"]
    assert template_capabilities("") == ["completion"]


@pytest.mark.parametrize(
    ("template", "expected"),
    [(QWEN3, ["completion", "tools", "thinking"]), (CHAT_TEMPLATE, ["completion", "tools"])],
)
def test_a_bundles_capabilities_follow_its_template(tmp_path, template, expected):
    (tmp_path / "genai_config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert capabilities(tmp_path) == expected


def test_thinking_tags_of_a_template():
    assert thinking_tags(QWEN3) == ("<think>", "</think>")
    assert thinking_tags(MAGISTRAL_STYLE) == ("[THINK]", "[/THINK]")
    assert thinking_tags(CHAT_TEMPLATE) == ("<think>", "</think>")  # the default


# --- prompts with Qwen3's own template

ASK = [{"role": "user", "content": "Hi"}]
GENERATION = "<|im_start|>assistant\n"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


def test_think_false_renders_qwen3s_empty_thinking_block():
    assert _chat(QWEN3, ASK, think=False).endswith(GENERATION + EMPTY_THOUGHT)


@pytest.mark.parametrize("think", [True, None])
def test_think_true_or_absent_leaves_the_model_to_think(think):
    prompt = _chat(QWEN3, ASK, think=think)
    assert prompt.endswith(GENERATION) and "<think>" not in prompt


def test_think_reaches_the_generate_prompt_too():
    def generate(think):
        text, _ = build_generate_prompt(
            ChatTemplate(QWEN3), "Hi", system=None, raw=False, count_tokens=_count,
            num_ctx=1000, think=think,
        )  # fmt: skip
        return text

    assert generate(False).endswith(GENERATION + EMPTY_THOUGHT)
    assert generate(None).endswith(GENERATION)


def test_thinking_in_the_current_turn_is_rendered_where_qwen3_was_trained_to_see_it():
    # A tool call and its result after the last question: the answer is still in progress.
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "thinking": "I should call the tool.",
         "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]  # fmt: skip
    prompt = _chat(QWEN3, messages)
    assert "<|im_start|>assistant\n<think>\nI should call the tool.\n</think>\n\n<tool_call>" in (
        prompt
    )


def test_thinking_of_an_earlier_question_is_dropped_as_qwen3_does():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "thinking": "A greeting."},
        {"role": "user", "content": "Bye"},
    ]
    prompt = _chat(QWEN3, messages)
    assert "A greeting." not in prompt
    assert "<|im_start|>assistant\nHello!<|im_end|>" in prompt


def test_an_explicit_reasoning_content_is_kept():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "mine",
         "thinking": "theirs"},
    ]  # fmt: skip
    prompt = _chat(QWEN3, messages)
    assert "<think>\nmine\n</think>" in prompt and "theirs" not in prompt


def test_thinking_must_be_a_string():
    messages = [{"role": "assistant", "content": "x", "thinking": 3}]
    with pytest.raises(InvalidRequest) as e:
        _chat(QWEN3, messages)
    assert e.value.param == "messages[0].thinking"


def test_think_true_is_refused_by_a_template_without_thinking():
    with pytest.raises(InvalidRequest) as e:
        _chat(CHAT_TEMPLATE, ASK, think=True)
    assert e.value.param == "think" and "does not support thinking" in e.value.message


def test_think_false_is_harmless_without_thinking():
    assert _chat(CHAT_TEMPLATE, ASK, think=False) == _chat(CHAT_TEMPLATE, ASK)


def test_a_prompt_that_opens_thinking():
    assert prompt_opens_thinking(_chat(DEEPSEEK_R1, ASK))
    assert not prompt_opens_thinking(_chat(QWEN3, ASK))
    assert not prompt_opens_thinking(_chat(QWEN3, ASK, think=False))
    assert prompt_opens_thinking("x[THINK]\n", "[THINK]", "[/THINK]")


def test_a_user_writing_the_tag_opens_nothing():
    messages = [{"role": "user", "content": "What does <think> mean?"}]
    assert not prompt_opens_thinking(_chat(QWEN3, messages))


# --- the split of answers


def test_a_whole_answer():
    assert split_whole(ANSWER) == ("The user greets.\nGreet back.", "Hello there!")


@pytest.mark.parametrize("cut", range(len(ANSWER) + 1))
def test_every_split_point_gives_the_same_pieces(cut):
    pieces = _pieces([ANSWER[:cut], ANSWER[cut:]])
    assert _joined(pieces) == ("The user greets.\nGreet back.", "Hello there!")
    kinds = [kind for kind, _ in pieces]
    assert kinds == sorted(kinds, key=["thinking", "content"].index)  # thinking, then content


def test_one_character_at_a_time():
    assert _joined(_pieces(list(ANSWER))) == split_whole(ANSWER)


def test_text_is_given_out_as_soon_as_it_cannot_be_a_tag():
    splitter = ThinkingSplitter()
    assert splitter.feed("<think>") == []
    assert splitter.feed("Let me see <") == [("thinking", "Let me see")]  # ' <' may be '</think>'
    assert splitter.feed("b>") == [("thinking", " <b>")]
    assert splitter.feed("</think>") == []
    assert splitter.feed(" Yes") == [("content", "Yes")]
    assert splitter.feed(" <think>") == [("content", " <think>")]
    assert splitter.finish() == []


def test_no_tags_is_all_content():
    assert split_whole("Just an answer.\n") == ("", "Just an answer.\n")
    assert _pieces(["Just ", "an answer."]) == [("content", "Just "), ("content", "an answer.")]


def test_no_tags_after_an_opening_prompt_is_all_thinking():
    assert split_whole("still thinking", opened=True) == ("still thinking", "")


def test_opened_by_the_prompt():
    assert split_whole("\nHmm.\n</think>\n\nYes.", opened=True) == ("Hmm.", "Yes.")


def test_an_opening_tag_the_prompt_already_wrote_is_dropped():
    assert split_whole("<think>\nHmm.</think>Yes.", opened=True) == ("Hmm.", "Yes.")


def test_a_tag_after_the_start_is_the_answers_own_text():
    text = "Use <think> tags like <think>this</think>."
    assert split_whole(text) == ("", text)


def test_leading_whitespace_before_the_tag():
    assert split_whole("\n <think>a</think>b") == ("a", "b")


def test_nested_opening_tag_is_thinking_text_and_the_first_closing_tag_ends_it():
    assert split_whole("<think>a<think>b</think>c</think>d") == ("a<think>b", "c</think>d")


def test_an_unclosed_section_is_all_thinking():
    assert split_whole("<think>\nstill going  \n") == ("still going", "")
    assert split_whole("<think>almost</thi") == ("almost</thi", "")


def test_a_cut_off_opening_tag_is_content():
    assert split_whole("<thi") == ("", "<thi")
    assert split_whole("  ") == ("", "  ")


def test_an_empty_thought():
    assert split_whole("<think>\n\n</think>\n\nOK") == ("", "OK")
    assert _pieces(["<think>\n\n</think>\n\nOK"]) == [("content", "OK")]


def test_other_tags():
    text = "[THINK]plan[/THINK]\nanswer"
    assert split_whole(text, "[THINK]", "[/THINK]") == ("plan", "answer")
    assert split_whole(text) == ("", text)


# ---- stop strings on the answer only ----------------------------------------------------------


@pytest.mark.parametrize("cut", range(1, 12))
def test_answer_stops_cut_at_the_first_stop_wherever_the_chunks_split(cut):
    text = "It is Paris. Then more"
    stops = AnswerStops(("Paris", "more"))
    shown = stops.feed(text[:cut]) + stops.feed(text[cut:]) + stops.flush()
    assert shown == "It is " and stops.stopped
    assert stops.feed("after") == ""


def test_answer_stops_hold_back_only_what_may_start_a_stop():
    stops = AnswerStops(("Paris",))
    assert stops.feed("It is Pa") == "It is "  # "Pa" may begin "Paris"
    assert stops.feed("rma") == "Parma"
    assert stops.feed(" Pa") == " "
    assert stops.flush() == "Pa" and not stops.stopped  # no stop came: the held text is out


def test_answer_stops_ignore_an_empty_stop():
    stops = AnswerStops(("",))
    assert stops.feed("text") == "text" and not stops.stopped
