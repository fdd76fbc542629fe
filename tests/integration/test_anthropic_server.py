"""The official `anthropic` client, unchanged, against `ortserve serve` (real models, real port).

The tiny models have random weights: these tests check structure, never what the text says.
"""

from __future__ import annotations

import anthropic
import jsonschema
import pytest

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Hi!"}]
# The SDK's create() has no temperature argument any more: the API still takes the field.
GREEDY = {"model": "tiny-chat", "max_tokens": 12, "system": "Be brief.",
          "extra_body": {"temperature": 0}}  # fmt: skip
TIME = {
    "name": "get_time",
    "description": "The time in a timezone.",
    "input_schema": {
        "type": "object",
        "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["tz"],
    },
}
FORCE_TIME = {"type": "tool", "name": "get_time"}


def sdk(server, **kw) -> anthropic.Anthropic:
    # No retries: an error must reach the test, not be retried away by the SDK.
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, **kw)


@pytest.fixture
def client(server):
    return sdk(server)


def test_create_and_stream_agree(client):
    whole = client.messages.create(messages=ASK, **GREEDY)
    assert whole.id.startswith("msg_") and whole.type == "message" and whole.role == "assistant"
    assert whole.model == "tiny-chat"
    assert [block.type for block in whole.content] == ["text"] and whole.content[0].text
    assert whole.stop_reason == "max_tokens" and whole.stop_sequence is None
    assert whole.usage.output_tokens == 12 and whole.usage.input_tokens > 5

    with client.messages.stream(messages=ASK, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert [(b.type, b.text) for b in final.content] == [("text", text)]
    assert final.stop_reason == "max_tokens"
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == 12


def test_raw_stream_events_in_order(client):
    events = list(client.messages.create(messages=ASK, stream=True, **GREEDY))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert events[0].message.usage.input_tokens > 5


def test_tool_use_round_trip(client):
    first = client.messages.create(messages=[{"role": "user", "content": "Time in UTC?"}],
                                   tools=[TIME], tool_choice=FORCE_TIME, **{
                                       **GREEDY, "max_tokens": 256})  # fmt: skip
    assert first.stop_reason == "tool_use"
    calls = [block for block in first.content if block.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_time" and calls[0].id
    jsonschema.validate(calls[0].input, TIME["input_schema"])

    messages = [{"role": "user", "content": "Time in UTC?"},
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id,
                                              "content": "12:00"}]}]  # fmt: skip
    answer = client.messages.create(messages=messages, tools=[TIME], **GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert answer.content and answer.usage.input_tokens > first.usage.input_tokens


def test_streamed_tool_use_accumulates_its_input(client):
    with client.messages.stream(messages=ASK, tools=[TIME], tool_choice=FORCE_TIME,
                                **{**GREEDY, "max_tokens": 256}) as stream:  # fmt: skip
        final = stream.get_final_message()
    (call,) = final.content
    assert call.type == "tool_use" and final.stop_reason == "tool_use"
    jsonschema.validate(call.input, TIME["input_schema"])


def test_stop_sequences_cut_the_answer(client):
    text = client.messages.create(messages=ASK, **GREEDY).content[0].text
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), "the greedy answer has a visible middle to stop at"
    stopped = client.messages.create(messages=ASK, stop_sequences=[stop], **GREEDY)
    cut = stopped.content[0].text if stopped.content else ""
    assert cut == text[: text.index(stop)]
    # which stop string ended the turn is not known to the engine: end_turn (docs/anthropic.md)
    assert stopped.stop_reason == "end_turn" and stopped.stop_sequence is None


def test_count_tokens_is_the_prompt_the_model_reads(client):
    counted = client.messages.count_tokens(model="tiny-chat", system="Be brief.", messages=ASK)
    created = client.messages.create(messages=ASK, **GREEDY)
    assert counted.input_tokens == created.usage.input_tokens
    with_tools = client.messages.count_tokens(model="tiny-chat", system="Be brief.",
                                              messages=ASK, tools=[TIME])  # fmt: skip
    assert with_tools.input_tokens > counted.input_tokens  # the template renders the tools


def test_errors_are_the_sdks_exceptions(client):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(messages=ASK, **{**GREEDY, "extra_body": {"temperature": 1.5}})
    assert "temperature" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="all-minilm", max_tokens=4, messages=ASK)


def test_base_url_and_key_from_the_environment(make_server, monkeypatch):
    key = "sk-local-0123456789abcdef"
    server = make_server(ORTSERVE_API_KEYS=f"claude:{key}")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    reply = anthropic.Anthropic(max_retries=0).messages.create(messages=ASK, **GREEDY)
    assert reply.content[0].type == "text"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "wrong")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(max_retries=0).messages.create(messages=ASK, **GREEDY)
