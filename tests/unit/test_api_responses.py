"""OpenAI's Responses API (/v1/responses) over HTTP plumbing: a real library, a fake engine.

Prompts go through the real template renderer, tools through the real grammar, parser and
validation, structured output through the real retries; only the engine is faked. The
official `openai` SDK is run against the Flask app (httpx's WSGI transport) to check that
it parses our objects and events unchanged. tests/integration/test_responses_server.py runs
a real model behind a real server.
"""

from __future__ import annotations

import contextlib
import json
import threading

import httpx
import openai
import pytest
from openai.types.responses import Response as SDKResponse
from pydantic import BaseModel

from ortserve.errors import OrtServeError
from ortserve.serving.store import (
    ResponseNotFound,
    ResponseStore,
    StoredResponse,
    item_messages,
)
from tests.support.fakes import (
    RENDER_ALL_TEMPLATE,
    ManyTurnsRuntime,
    add_model,
    prompt_text,
)
from tests.support.http import openai_error

TEMPLATE = RENDER_ALL_TEMPLATE
TOOL = {
    "type": "function",
    "name": "get_time",
    "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
}
CALL = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
CACHE = {"cached_tokens": 0, "cache_write_tokens": 0}  # no prompt cache
NAME_FORMAT = {
    "type": "json_schema",
    "name": "person",
    "schema": {"type": "object", "properties": {"name": {"type": "string"}},
               "required": ["name"], "additionalProperties": False},
    "strict": True,
}  # fmt: skip


@pytest.fixture
def runtime(library):
    add_model(library, "tiny", template=TEMPLATE, capabilities=["completion", "tools"])
    add_model(library, "plain")  # test_api_native's template: no thinking section
    add_model(library, "minilm", capabilities=["embedding"], template=None)
    return ManyTurnsRuntime(library)


@pytest.fixture
def sdk(app):
    """The official client, talking to the Flask app in-process."""
    http = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://localhost")
    return openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http,
                         max_retries=0)  # fmt: skip


def post(client, **body):
    return client.post("/v1/responses", json={"model": "tiny", **body})


def events_of(response) -> list[dict]:
    """Every SSE event's data, checked: named as its type, numbered from 0 without a gap."""
    text = response.get_data(as_text=True)
    events = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        assert event["sequence_number"] == len(events)
        events.append(event)
    assert "[DONE]" not in text  # the Responses API ends with its last event, not [DONE]
    return events


# ---- create: shapes ------------------------------------------------------------------------


def test_string_input_gives_a_completed_response_in_openais_shape(client, runtime):
    response = post(client, input="Hi")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert body["id"].startswith("resp_") and len(body["id"]) > 40
    assert (body["object"], body["status"], body["model"]) == ("response", "completed", "tiny")
    assert body["error"] is None and body["incomplete_details"] is None
    (message,) = body["output"]
    assert message["id"].startswith("msg_")
    assert {k: v for k, v in message.items() if k != "id"} == {
        "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello world", "annotations": []}]}  # fmt: skip
    prompt = "<user>Hi<assistant>"  # one token per character
    assert prompt_text(runtime) == prompt
    assert body["usage"] == {"input_tokens": len(prompt), "input_tokens_details": CACHE,
                             "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": len(prompt) + 3}  # fmt: skip
    assert body["store"] is True and body["tools"] == [] and body["tool_choice"] == "auto"
    assert body["text"] == {"format": {"type": "text"}}
    parsed = SDKResponse.model_validate(body)  # the SDK's own model, validated strictly
    assert parsed.output_text == "Hello world"
    assert runtime.released == [("tiny:latest", None)]


def test_items_instructions_and_roles_reach_the_template(client, runtime):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "c", "annotations": []}]},
        {"role": "user", "content": "d"},
    ]  # fmt: skip
    assert post(client, input=items, instructions="Answer in French.").status_code == 200
    assert prompt_text(runtime) == (
        "<system>Answer in French.<system>Be brief.<user>a\nb<assistant>c<user>d<assistant>"
    )


def test_function_calls_and_their_outputs_become_tool_turns(client, runtime):
    items = [
        {"role": "user", "content": "Time?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "need the tool"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_time",
         "arguments": '{"tz": "UTC"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": ""},
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "13:00"}]},
    ]  # fmt: skip
    assert post(client, input=items, tools=[TOOL], tool_choice="none").status_code == 200
    assert prompt_text(runtime) == (
        '<user>Time?<assistant>(think:need the tool)[call_1:get_time{"tz": "UTC"}]'
        "[call_2:get_time{}]<tool>12:00(get_time#call_1)<tool>13:00(get_time#call_2)"
        "{tools:get_time;}<assistant>"
    )


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([{"type": "function_call_output", "call_id": "nope", "output": "x"}], "input[0].call_id"),
        (
            [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}],
            "input[0].arguments",
        ),
        (
            [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}],
            "input[0].arguments",
        ),
        ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
        ([{"type": "function_call_output", "call_id": "c"}], "input[0].output"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
            "input[0].content[0].image_url",
        ),
        ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text"),
        ([{"role": "user"}], "input[0].content"),
        ([{"role": "robot", "content": "x"}], "input[0].role"),
        ([{"type": "web_search_call", "id": "x"}], "input[0].type"),
        ([], "input"),
    ],
)
def test_bad_input_items_are_400_naming_the_field(client, runtime, items, param):
    assert openai_error(post(client, input=items), 400)["param"] == param
    assert runtime.generated == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"model": ""}, "model"),
        ({"input": None}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
        (
            {"text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "nope"}}}},
            "text.format.schema",
        ),
        ({"tools": [TOOL], "text": {"format": NAME_FORMAT}}, "tools"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"background": True}, "background"),
        ({"truncation": "sometimes"}, "truncation"),
    ],
)
def test_bad_fields_are_400_naming_the_field(client, runtime, extra, param):
    body = {"model": "tiny", "input": "Hi", **extra}
    if body["input"] is None:
        del body["input"]
    assert openai_error(client.post("/v1/responses", json=body), 400)["param"] == param
    assert runtime.generated == []


def test_unknown_fields_are_ignored_and_known_ones_echoed(client, runtime):
    body = {"input": "Hi", "temperature": 0.2, "top_p": 0.5, "max_output_tokens": 9,
            "metadata": {"k": "v"}, "user": "u", "include": ["x"], "service_tier": "auto",
            "truncation": "auto", "parallel_tool_calls": False}  # fmt: skip
    reply = post(client, **body).get_json()
    options = runtime.generated[0][1]
    assert (options.temperature, options.top_p, options.num_predict) == (0.2, 0.5, 9)
    for field in ("temperature", "top_p", "max_output_tokens", "metadata", "user", "truncation",
                  "parallel_tool_calls"):  # fmt: skip
        assert reply[field] == body[field]


def test_unknown_model_and_embedding_model(client, runtime):
    assert openai_error(post(client, model="nope", input="x"), 404)["code"] == "model_not_found"
    assert openai_error(post(client, model="minilm", input="x"), 400)["param"] == "model"


def test_max_output_tokens_reached_is_incomplete(client, runtime, sdk):
    runtime.script = [(["Hel", "lo"], "length")]
    body = post(client, input="Hi", max_output_tokens=2).get_json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    assert SDKResponse.model_validate(body).incomplete_details.reason == "max_output_tokens"


# ---- tools and structured output -----------------------------------------------------------


def test_a_forced_call_is_a_function_call_item(client, runtime):
    runtime.script = [([CALL[:20], CALL[20:]],)]
    response = post(client, input="Time?", tools=[TOOL], tool_choice={"type": "function",
                                                                      "name": "get_time"})  # fmt: skip
    body = response.get_json()
    (call,) = body["output"]  # only the call: no empty message beside it
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert call["call_id"].startswith("call_") and call["status"] == "completed"
    assert (call["name"], json.loads(call["arguments"])) == ("get_time", {"tz": "UTC"})
    assert body["tools"] == [TOOL] and body["tool_choice"]["name"] == "get_time"
    assert response.headers["X-Ortserve-Attempts"] == "1"
    SDKResponse.model_validate(body)


def test_json_schema_format_is_guided_and_parsed_by_the_sdk(sdk, runtime):
    class Person(BaseModel):
        name: str

    runtime.script = [(['{"name":', '"Ada"}'],)]
    parsed = sdk.responses.parse(model="tiny", input="Who?", text_format=Person)
    assert parsed.output_parsed == Person(name="Ada")
    assert runtime.generated[0][1].guidance.kind == "json_schema"


def test_every_attempt_failing_is_422(client, runtime):
    runtime.script = [(["nope"],)] * 3
    error = openai_error(post(client, input="Hi", text={"format": NAME_FORMAT}), 422)
    assert error["type"] == "invalid_output"


# ---- reasoning -----------------------------------------------------------------------------


def test_thinking_is_a_reasoning_item_before_the_message(client, runtime):
    runtime.script = [(["<think>", "hmm", "</think>", "Hello"],)]
    body = post(client, input="Hi").get_json()
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [] and reasoning["content"] == [{"type": "reasoning_text",
                                                                    "text": "hmm"}]  # fmt: skip
    assert message["content"][0]["text"] == "Hello"
    SDKResponse.model_validate(body)


def test_reasoning_effort_switches_thinking(client, runtime):
    post(client, input="Hi", reasoning={"effort": "none"})
    assert prompt_text(runtime).endswith("<assistant><think></think>")
    post(client, input="Hi", reasoning={"effort": "high"})
    assert prompt_text(runtime).endswith("<assistant>")
    error = openai_error(post(client, model="plain", input="Hi", reasoning={"effort": "low"}), 400)
    assert error["param"] == "reasoning.effort" and "thinking" in error["message"]
    assert (
        post(client, model="plain", input="Hi", reasoning={"effort": "minimal"}).status_code == 200
    )


# ---- the store: previous_response_id, GET, DELETE ------------------------------------------


def test_previous_response_id_continues_the_stored_conversation(client, runtime):
    first = post(client, input="Hi", instructions="Be brief.").get_json()
    second = post(client, input="And?", previous_response_id=first["id"]).get_json()
    assert second["previous_response_id"] == first["id"]
    # The instructions are not carried over (as OpenAI): only input and output items are.
    assert prompt_text(runtime) == "<user>Hi<assistant>Hello world<user>And?<assistant>"
    post(client, input="More?", previous_response_id=second["id"], instructions="Be kind.")
    assert prompt_text(runtime) == ("<system>Be kind.<user>Hi<assistant>Hello world<user>And?"
                                    "<assistant>Hello world<user>More?<assistant>")  # fmt: skip


def test_a_stored_call_can_be_answered_by_id(client, runtime):
    runtime.script = [([CALL],)]
    first = post(client, input="Time?", tools=[TOOL], tool_choice="required").get_json()
    call = first["output"][0]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "12:00"}
    second = post(client, input=[output], previous_response_id=first["id"], tools=[TOOL])
    assert second.status_code == 200, second.get_json()
    assert f"<tool>12:00(get_time#{call['call_id']})" in prompt_text(runtime)


def test_unknown_previous_response_id_is_404(client, runtime):
    error = openai_error(post(client, input="Hi", previous_response_id="resp_nope"), 404)
    assert error["param"] == "previous_response_id"
    assert error["message"] == "Previous response with id 'resp_nope' not found."
    assert runtime.acquired == []


def test_retrieve_and_delete(client, runtime):
    body = post(client, input="Hi").get_json()
    assert client.get(f"/v1/responses/{body['id']}").get_json() == body
    deleted = client.delete(f"/v1/responses/{body['id']}")
    assert deleted.get_json() == {"id": body["id"], "object": "response.deleted", "deleted": True}
    for response in (client.get(f"/v1/responses/{body['id']}"),
                     client.delete(f"/v1/responses/{body['id']}")):  # fmt: skip
        assert (
            openai_error(response, 404)["message"] == f"Response with id '{body['id']}' not found."
        )


def test_store_false_keeps_nothing(client, runtime):
    body = post(client, input="Hi", store=False).get_json()
    assert body["store"] is False
    openai_error(client.get(f"/v1/responses/{body['id']}"), 404)
    openai_error(post(client, input="x", previous_response_id=body["id"]), 404)


def test_the_store_keeps_the_most_recently_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(StoredResponse({"id": name}, []))
    store.get("a")  # now "b" is the least recently used
    store.put(StoredResponse({"id": "c"}, []))
    assert len(store) == 2 and store.get("a") and store.get("c")
    with pytest.raises(ResponseNotFound):
        store.get("b")


def test_the_store_is_safe_across_threads():
    store = ResponseStore(capacity=50)

    def work(n: int) -> None:
        for i in range(200):
            store.put(StoredResponse({"id": f"{n}-{i}"}, []))
            with contextlib.suppress(ResponseNotFound):  # dropped by other threads' puts
                store.get(f"{n}-{i - 1}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) == 50


def test_the_store_is_bounded_in_the_app(app, client, runtime):
    app.extensions["ortserve"]._responses = ResponseStore(capacity=1)
    first = post(client, input="Hi").get_json()
    post(client, input="Hi")
    openai_error(client.get(f"/v1/responses/{first['id']}"), 404)


def test_ids_are_unique_and_unguessable(client, runtime):
    ids = {post(client, input="Hi").get_json()["id"] for _ in range(5)}
    assert len(ids) == 5 and all(len(i) >= 48 for i in ids)


def test_item_messages_joins_a_text_turn_and_its_calls():
    items = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "Let me look."},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]  # fmt: skip
    messages = item_messages(items)
    assert messages[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]}  # fmt: skip


# ---- streaming -----------------------------------------------------------------------------


def test_stream_events_in_order_and_deltas_add_up(client, runtime):
    events = events_of(post(client, input="Hi", stream=True))
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 3,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]  # fmt: skip
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    added = events[2]
    assert added["item"]["status"] == "in_progress" and added["item"]["content"] == []
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(d["item_id"] == added["item"]["id"] and d["output_index"] == 0 for d in deltas)
    final = events[-1]["response"]
    assert "".join(d["delta"] for d in deltas) == final["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] == 3
    assert client.get(f"/v1/responses/{final['id']}").get_json() == final


def test_sdk_stream_gives_the_final_response(sdk, runtime):
    with sdk.responses.stream(model="tiny", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello world"
    assert final.status == "completed"


def test_stream_sends_a_call_whole(client, runtime):
    runtime.script = [([CALL],)]
    events = events_of(post(client, input="Time?", tools=[TOOL], tool_choice="required",
                            stream=True))  # fmt: skip
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]  # fmt: skip
    assert events[2]["item"]["arguments"] == "" and events[2]["item"]["type"] == "function_call"
    assert json.loads(events[3]["delta"]) == {"tz": "UTC"} == json.loads(events[4]["arguments"])
    assert events[5]["item"]["status"] == "completed"
    assert events[-1]["response"]["output"] == [events[5]["item"]]


def test_whitespace_beside_calls_opens_no_message(client, runtime):
    runtime.script = [(["\n", CALL, "\n"],)] * 2
    body = {"input": "Time?", "tools": [TOOL]}
    assert [item["type"] for item in post(client, **body).get_json()["output"]] == ["function_call"]
    events = events_of(post(client, **body, stream=True))
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"] == [
        "function_call"
    ]
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["function_call"]


def test_an_empty_answer_still_has_its_message(client, runtime):
    runtime.script = [([],)] * 2
    whole = post(client, input="Hi").get_json()
    events = events_of(post(client, input="Hi", stream=True))
    for output in (whole["output"], events[-1]["response"]["output"]):
        assert [(i["type"], i["content"][0]["text"]) for i in output] == [("message", "")]


def test_sdk_stream_of_a_call(sdk, runtime):
    runtime.script = [([CALL],)]
    with sdk.responses.stream(model="tiny", input="Time?", tools=[TOOL],
                              tool_choice="required") as stream:  # fmt: skip
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"tz": "UTC"}


def test_a_retry_ends_the_item_and_drops_it_from_the_output(client, runtime, sdk):
    runtime.script = [(["{"], "length"), (['{"name":"y"}'],)]
    events = events_of(post(client, input="Hi", text={"format": NAME_FORMAT}, stream=True))
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert done[0]["item"]["status"] == "incomplete" and done[0]["ortserve_retry"]["attempt"] == 2
    assert [e["text"] for e in events if e["type"] == "response.output_text.done"] == [
        '{"name":"y"}'
    ]  # the discarded text is never "done": a client parsing done texts never sees it
    assert done[1]["output_index"] == 1
    assert events[-1]["response"]["output"] == [done[1]["item"]]

    class Person(BaseModel):
        name: str

    runtime.script = [(["{"], "length"), (['{"name":"z"}'],)]
    with sdk.responses.stream(model="tiny", input="Hi", text_format=Person) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == Person(name="z")


def test_stream_of_thinking_uses_reasoning_events(client, runtime):
    runtime.script = [(["<think>hm", "m</think>", "Hello"],)]
    events = events_of(post(client, input="Hi", stream=True))
    kinds = [e["type"] for e in events]
    assert kinds[2:8] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta", "response.reasoning_text.delta",
                          "response.reasoning_text.done", "response.content_part.done"]  # fmt: skip
    assert events[6]["text"] == "hmm"
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert events[-1]["type"] == "response.completed"


def test_stream_that_hits_the_cap_ends_incomplete(client, runtime, sdk):
    runtime.script = [(["Hel", "lo"], "length")]
    events = events_of(post(client, input="Hi", max_output_tokens=2, stream=True))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_error_mid_stream_is_an_error_event(client, runtime):
    runtime.script = [(["a", "b"], "stop", OrtServeError("the engine failed"), 1)]
    events = events_of(post(client, input="Hi", stream=True))
    assert events[-1]["type"] == "error" and events[-1]["message"] == "the engine failed"
    assert events[-1]["code"] == "server_error"
    assert runtime.released  # the lease is returned however the stream ends


def test_an_error_before_any_output_keeps_its_status(client, runtime):
    runtime.script = [([], "stop", OrtServeError("the engine failed"), 0)]
    openai_error(post(client, input="Hi", stream=True), 500)
