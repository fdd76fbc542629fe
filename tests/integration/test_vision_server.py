"""Pictures through `ortserve serve` under each API's official client: the tiny random
Qwen2.5-VL (fp32), converted with the real converter, served by the real server.

The same picture and question through Ollama's chat and generate, OpenAI's chat completions
and Responses, Anthropic's messages and Gemini's generateContent must give the same greedy
answer and count the same prompt tokens, image tokens included; `ortserve run` attaches the
picture a prompt names; a model without vision refuses pictures. Random weights: the tests
compare answers with each other, never with a meaning.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import types

from converters import convert, vision
from ortserve.library import Library
from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "tiny-vl:fp32"
QUESTION = "What is in the picture?"
TOKENS = 12
# A 112x84 picture is 8x6 patches of 14 pixels, merged 2x2: 12 image tokens, which replace
# the placeholder's one <|image_pad|> (its <|vision_start|> and <|vision_end|> stay).
IMAGE_TOKENS = (112 // 14) * (84 // 14) // 4


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_vl, tiny_checkpoint) -> Library:
    """tiny-vl:fp32 and a text model (tiny qwen2, fp32)."""
    library = Library(tmp_path_factory.mktemp("vision-server") / "models")
    convert(tiny_vl, MODEL, "fp32", library=library, progress=False)
    convert(tiny_checkpoint("qwen2"), "text", "fp32", library=library, progress=False)
    return library


@pytest.fixture(scope="module")
def server(library):
    running = Server(library)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = vision.make_image(tmp_path_factory.mktemp("picture") / "cat.png")
    assert vision.SAMPLE_SIZE == (112, 84)
    return path


def ask_ollama_chat(server, png: bytes, question: str = QUESTION) -> tuple[str, int]:
    reply = ollama.Client(host=server.url).chat(
        model=MODEL, messages=[{"role": "user", "content": question, "images": [png]}],
        options={"temperature": 0, "num_predict": TOKENS})  # fmt: skip
    return reply.message.content, reply.prompt_eval_count


def ask_ollama_generate(server, png: bytes) -> tuple[str, int]:
    reply = ollama.Client(host=server.url).generate(
        model=MODEL, prompt=QUESTION, images=[png],
        options={"temperature": 0, "num_predict": TOKENS})  # fmt: skip
    return reply.response, reply.prompt_eval_count


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask_openai(server, png: bytes) -> tuple[str, int]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}},
               {"type": "text", "text": QUESTION}]  # fmt: skip
    reply = _openai(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=TOKENS)  # fmt: skip
    return reply.choices[0].message.content, reply.usage.prompt_tokens


def ask_responses(server, png: bytes) -> tuple[str, int]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "input_image", "image_url": url},
               {"type": "input_text", "text": QUESTION}]  # fmt: skip
    reply = _openai(server).responses.create(
        model=MODEL, input=[{"role": "user", "content": content}], temperature=0,
        max_output_tokens=TOKENS)  # fmt: skip
    return reply.output_text, reply.usage.input_tokens


def ask_anthropic(server, png: bytes) -> tuple[str, int]:
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()}
    content = [{"type": "image", "source": source}, {"type": "text", "text": QUESTION}]
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    reply = client.messages.create(model=MODEL, max_tokens=TOKENS, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": content}])  # fmt: skip
    return "".join(b.text for b in reply.content if b.type == "text"), reply.usage.input_tokens


def ask_gemini(server, png: bytes) -> tuple[str, int]:
    client = genai.Client(api_key="unused",
                          http_options=types.HttpOptions(base_url=server.url))  # fmt: skip
    config = types.GenerateContentConfig(temperature=0, max_output_tokens=TOKENS)
    reply = client.models.generate_content(
        model=MODEL, contents=[types.Part.from_bytes(data=png, mime_type="image/png"), QUESTION],
        config=config)  # fmt: skip
    return reply.text, reply.usage_metadata.prompt_token_count


ASKS = {"ollama chat": ask_ollama_chat, "ollama generate": ask_ollama_generate,
        "openai": ask_openai, "responses": ask_responses, "anthropic": ask_anthropic,
        "gemini": ask_gemini}  # fmt: skip


def test_every_api_gives_the_same_greedy_answer_for_the_same_picture(server, picture):
    png = picture.read_bytes()
    answers = {name: ask(server, png) for name, ask in ASKS.items()}
    texts = {text for text, _ in answers.values()}
    counts = {count for _, count in answers.values()}
    assert len(texts) == 1 and next(iter(texts)), answers
    assert len(counts) == 1, answers


def test_usage_counts_the_image_tokens(server, picture):
    with_picture = ask_ollama_chat(server, picture.read_bytes())[1]
    reply = ollama.Client(host=server.url).chat(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}],
        options={"temperature": 0, "num_predict": 1})  # fmt: skip
    # the placeholder's <|image_pad|> became the picture's IMAGE_TOKENS tokens, and its
    # <|vision_start|> and <|vision_end|> came along
    assert with_picture - reply.prompt_eval_count == IMAGE_TOKENS + 2


def test_counts_before_generating_include_the_image_tokens(server, picture):
    """Anthropic's message_start and count_tokens, Gemini's countTokens: what usage says after
    the turn (og's processor counts the picture's tokens; nothing is generated to count)."""
    png = picture.read_bytes()
    _, used = ask_anthropic(server, png)
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()}
    messages = [{"role": "user", "content": [{"type": "image", "source": source},
                                             {"type": "text", "text": QUESTION}]}]  # fmt: skip
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    assert client.messages.count_tokens(model=MODEL, messages=messages).input_tokens == used
    with client.messages.stream(model=MODEL, max_tokens=2, messages=messages) as stream:
        started = next(e for e in stream if e.type == "message_start")
        assert started.message.usage.input_tokens == used
        assert stream.get_final_message().usage.input_tokens == used
    gemini = genai.Client(api_key="unused", http_options=types.HttpOptions(base_url=server.url))
    contents = [types.Part.from_bytes(data=png, mime_type="image/png"), QUESTION]
    assert gemini.models.count_tokens(model=MODEL, contents=contents).total_tokens == used


def test_two_pictures_are_both_read(server, picture, tmp_path):
    other = vision.make_image(tmp_path / "tall.png", (56, 140)).read_bytes()
    png = picture.read_bytes()
    reply = ollama.Client(host=server.url).chat(
        model=MODEL, messages=[{"role": "user", "content": QUESTION, "images": [png, other]}],
        options={"temperature": 0, "num_predict": 1})  # fmt: skip
    one = ask_ollama_chat(server, png)[1]
    assert reply.prompt_eval_count == one + (56 // 14) * (140 // 14) // 4 + 2


def test_show_lists_vision(server):
    shown = ollama.Client(host=server.url).show(MODEL)
    assert "vision" in shown.capabilities
    assert "vision" not in ollama.Client(host=server.url).show("text").capabilities


def test_a_text_model_refuses_pictures_naming_the_field(server, picture):
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.url).chat(model="text", messages=[
            {"role": "user", "content": "hi", "images": [picture.read_bytes()]}])  # fmt: skip
    assert refused.value.status_code == 400
    assert refused.value.error == ('messages[0].images[0]: "text:latest" does not support '
                                   "images (it has no vision capability)")  # fmt: skip
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    with pytest.raises(openai.BadRequestError) as bad:
        _openai(server).chat.completions.create(model="text", messages=[{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}]}])  # fmt: skip
    assert bad.value.param == "messages[0].content[0].image_url.url"


def test_a_broken_picture_is_a_400_and_the_server_keeps_serving(server, picture):
    png = picture.read_bytes()
    for broken in (b"GIF89a not really", png[: len(png) // 2]):
        with pytest.raises(ollama.ResponseError) as refused:
            ask_ollama_chat(server, broken)
        assert refused.value.status_code == 400
        assert refused.value.error.startswith("messages[0].images[0]: ")
    assert ask_ollama_chat(server, png)[0]


def test_run_attaches_the_picture_the_prompt_names(server, library, picture):
    env = {**os.environ, "ORTSERVE_MODELS": str(library.root),
           "ORTSERVE_HOST": f"127.0.0.1:{server.port}"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "ortserve", "run", MODEL, f"{QUESTION} {picture}", "--verbose"],
        capture_output=True, text=True, env=env, timeout=120, cwd=picture.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Added image '{picture}'" in result.stderr
    _, expected = ask_ollama_chat(server, picture.read_bytes())
    # the path left the text (the question alone remains) and the picture's tokens came in
    assert f"prompt eval count:    {expected} token(s)" in result.stderr + result.stdout
