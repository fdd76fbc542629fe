"""The official `openai` client against `ortserve serve` (real gunicorn, real port, real models)."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def sdk(server) -> openai.OpenAI:
    # No retries: a 503 must reach the test, not be retried away by the SDK.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(server):
    return sdk(server)


def _counts(usage) -> tuple[int, int, int]:
    """Token counts; prompt_tokens_details.cached_tokens depends on what the engine kept."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_chat_completion_streamed_and_not_agree(client):
    whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, **GREEDY)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.model == "tiny-chat" and whole.system_fingerprint.startswith("fp_ortserve_")
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert _counts(chunks[-1].usage) == _counts(whole.usage)  # a kept prefix may be reused


def test_chat_stop_string(client):
    full = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, **GREEDY)
    text = full.choices[0].message.content
    cut_at = text[len(text) // 2 :][:3]
    stopped = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, stop=[cut_at], **GREEDY
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(cut_at)]


def test_n_gives_several_choices(client):
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, n=2, **GREEDY)
    assert [c.index for c in reply.choices] == [0, 1]
    # greedy: both choices are the same answer, each generated in full
    assert reply.choices[0].message.content == reply.choices[1].message.content
    single = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, **GREEDY)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    assert reply.usage.completion_tokens == 24

    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, n=2, stream=True, **GREEDY
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: single.choices[0].message.content, 1: single.choices[0].message.content}


def test_completions_string_and_list_prompts(client):
    one = client.completions.create(model="tiny-llama", prompt="Once upon", **GREEDY)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert len(one.choices) == 1 and one.choices[0].text
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 12

    two = client.completions.create(model="tiny-llama", prompt=["Once upon", "The end"], **GREEDY)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    assert two.usage.completion_tokens == 24
    assert two.usage.prompt_tokens > one.usage.prompt_tokens

    echoed = client.completions.create(model="tiny-llama", prompt="Once upon", echo=True, **GREEDY)
    assert echoed.choices[0].text == "Once upon" + one.choices[0].text

    streamed = client.completions.create(
        model="tiny-llama", prompt="Once upon", stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == one.choices[0].text
    assert _counts(chunks[-1].usage) == _counts(one.usage)


def test_models_list_and_retrieve(client, served_library):
    ids = {m.id: m for m in client.models.list()}
    assert {"tiny-chat:latest", "tiny-llama:latest", "all-minilm:latest"} <= set(ids)
    model = client.models.retrieve("tiny-chat")
    assert model.id == "tiny-chat:latest" and model.owned_by == "library"
    assert model.created == int(served_library.get("tiny-chat").modified.timestamp())
    assert ids["tiny-chat:latest"].created == model.created
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.type == "not_found_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 9}, "n"),
            ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         "messages[0].content[0].image_url.url"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": "tiny-chat", "messages": MESSAGES, **extra})
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_completion_suffix_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llama", prompt="a", suffix="b", max_tokens=2)
    assert info.value.param == "suffix"


def test_malformed_json_is_400_in_openais_shape(server):
    # The SDK cannot send broken JSON: a plain request does.
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", data=b'{"model": "tiny-chat", "messages": [',
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert error["type"] == "invalid_request_error" and "invalid JSON" in error["message"]


def test_embedding_model_cannot_chat(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="all-minilm", messages=MESSAGES, max_tokens=2)
    assert "does not support chat" in info.value.message
    assert info.value.param == "model"


def test_context_length_exceeded(client):
    long = "hello " * 50_000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": long}], max_tokens=2
        )
    assert info.value.code == "context_length_exceeded"


def test_full_queue_is_503(make_server):
    busy = make_server(ORTSERVE_MAX_QUEUE="1", ORTSERVE_NUM_PARALLEL="1", ORTSERVE_ENGINE_LANES="1")
    client = sdk(busy)
    client.completions.create(model="tiny-chat", prompt="a", max_tokens=1)  # load it first

    def long_request():
        try:
            client.completions.create(model="tiny-chat", prompt="Go on", max_tokens=900)
            return 200
        except openai.APIStatusError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: long_request(), range(8)))
    assert 200 in results
    errors = [r for r in results if r != 200]
    assert errors and all(e.status_code == 503 for e in errors)
    assert all(e.type == "server_busy" for e in errors)


def test_a_kept_prefix_is_reported_as_cached_tokens(client):
    """The engine keeps finished turns: the same long prompt again reuses its keys and values."""
    story = " ".join(f"Line {i} of a long story about the sea." for i in range(12))
    messages = [{"role": "user", "content": story}]
    first = client.chat.completions.create(model="tiny-chat", messages=messages, **GREEDY)
    again = client.chat.completions.create(model="tiny-chat", messages=messages, **GREEDY)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens > 64
    assert again.usage.prompt_tokens_details.cached_tokens >= 32
    assert again.choices[0].message.content == first.choices[0].message.content
