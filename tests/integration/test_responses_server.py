"""OpenAI's Responses API against `ortserve serve`, through the official `openai` SDK unchanged.

tiny-chat is a random-weight qwen2 (int4) with a ChatML template that renders tools: these
tests check structure (items, events, ids, usage, the store), never what the text says.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.tools import WEATHER as CHAT_WEATHER
from tests.support.tools import responses_tool

pytestmark = pytest.mark.slow

MODEL = "tiny-chat"
WEATHER = responses_tool(CHAT_WEATHER)
ASK = {"role": "user", "content": "Weather in Paris?"}


class City(BaseModel):
    name: str = Field(max_length=16)
    population: int


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _message_text(response) -> str:
    (message,) = [item for item in response.output if item.type == "message"]
    assert message.role == "assistant" and message.id.startswith("msg_")
    return message.content[0].text


def _check_usage(response) -> None:
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_create_with_a_string_and_instructions(client):
    response = client.responses.create(model=MODEL, input="Hello!", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.instructions == "Be brief." and response.model == MODEL
    assert response.output_text == _message_text(response)
    _check_usage(response)


def test_create_with_items(client):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": "How are you?"},
    ]  # fmt: skip
    response = client.responses.create(model=MODEL, input=items, max_output_tokens=8)
    assert isinstance(response.output_text, str) and response.status in ("completed", "incomplete")
    _check_usage(response)


def test_previous_response_id_continues_a_stored_response(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8)
    second = client.responses.create(model=MODEL, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=8)  # fmt: skip
    assert second.previous_response_id == first.id and second.id != first.id
    # The stored conversation came first: the prompt holds both turns and the first answer.
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=8)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.input_tokens // 2
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    assert caught.value.body["param"] == "previous_response_id"


def test_retrieve_and_delete(client):
    created = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    assert fetched.usage == created.usage
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_store_false_is_not_kept(client):
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_stream_deltas_add_up_to_the_final_text(client):
    kinds, deltas, ids = [], [], []
    with client.responses.stream(model=MODEL, input="Tell me a story.",
                                 max_output_tokens=24) as stream:  # fmt: skip
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.created":
                ids.append(event.response.id)
    # The cap ends the stream with response.incomplete, which get_final_response refuses.
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    for kind in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.done", "response.output_item.done"):  # fmt: skip
        assert kind in kinds
    final = client.responses.retrieve(ids[0])  # stored when the stream ended
    assert "".join(deltas) == final.output_text


def test_stream_get_final_response(client):
    with client.responses.stream(model=MODEL, input="Hi", max_output_tokens=64,
                                 temperature=0) as stream:  # fmt: skip
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        try:
            final = stream.get_final_response()
        except RuntimeError:  # the model ran into the cap: response.incomplete came instead
            pytest.skip("the random model did not stop within 64 tokens")
    assert final.status == "completed" and "".join(deltas) == final.output_text
    _check_usage(final)


def test_a_forced_function_call_has_valid_arguments(client):
    for seed in range(5):
        response = client.responses.create(
            model=MODEL, input=f"Weather in Paris? ({seed})", tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=128,
        )  # fmt: skip
        calls = [item for item in response.output if item.type == "function_call"]
        assert len(calls) == 1 and response.status == "completed"
        call = calls[0]
        assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_a_function_call_output_gets_an_answer(client):
    first = client.responses.create(model=MODEL, input=[ASK], tools=[WEATHER],
                                    tool_choice="required", max_output_tokens=128)  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    results = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    # Sent back both ways: with the conversation as items, and by previous_response_id.
    whole = client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none",
                                    input=[ASK, *first.output, *results],
                                    max_output_tokens=8)  # fmt: skip
    by_id = client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none",
                                    input=results, previous_response_id=first.id,
                                    max_output_tokens=8)  # fmt: skip
    for answer in (whole, by_id):
        assert [item.type for item in answer.output] == ["message"]
        assert isinstance(answer.output_text, str)
    assert whole.usage.input_tokens == by_id.usage.input_tokens  # the same prompt both ways


def test_a_streamed_function_call(client):
    with client.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER],
                                 tool_choice="required", max_output_tokens=128) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    call = next(item for item in final.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


@pytest.mark.parametrize("seed", range(5))
def test_parse_with_a_pydantic_model(client, seed):
    """The parsed object, or the explicit 422 when every attempt failed (random weights)."""
    try:
        response = client.responses.parse(model=MODEL, input=f"A city, please ({seed}).",
                                          text_format=City, max_output_tokens=200)  # fmt: skip
    except openai.UnprocessableEntityError as exc:
        assert exc.body["type"] == "invalid_output"
        return
    assert isinstance(response.output_parsed, City)
    assert City.model_validate_json(response.output_text) == response.output_parsed


def test_max_output_tokens_makes_it_incomplete(client):
    response = client.responses.create(model=MODEL, input="Tell me a long story.",
                                       max_output_tokens=2)  # fmt: skip
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 2


def test_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert caught.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="x")
