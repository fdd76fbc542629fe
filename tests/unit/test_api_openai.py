"""OpenAI's API (/v1) over HTTP plumbing: Flask's test client, a real library, a fake engine.

Prompts and options go through the real prompt builder and option resolver; the engine is
faked (allowed for plumbing). tests/integration/test_openai_server.py runs real models.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from werkzeug.test import EnvironBuilder

from ortserve.api.openai import SYSTEM_FINGERPRINT
from ortserve.errors import OrtServeError
from tests.support.fakes import ManyTurnsRuntime, add_model
from tests.support.http import openai_error

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "tiny", "prompt": "Once"}


@pytest.fixture
def runtime(library):
    add_model(library, "tiny")
    add_model(library, "team/other:v1")
    add_model(library, "minilm", capabilities=["embedding"], template=None)
    runtime = ManyTurnsRuntime(library)
    runtime.context_length = 64  # the fake's own: a short context to overflow
    return runtime


def sse(response) -> list:
    """The data of every SSE event; the final [DONE] stays a string."""
    text = response.get_data(as_text=True)
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ")
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- chat completions ----------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client, runtime):
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > 12
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "tiny"
    assert body["system_fingerprint"] == SYSTEM_FINGERPRINT
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello world"},
         "logprobs": None, "finish_reason": "stop"}
    ]  # fmt: skip
    prompt = "<user>Hi<assistant>"  # the model's template, one token per character
    assert runtime.generated[0][0] == [ord(c) for c in prompt]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 3,
                             "total_tokens": len(prompt) + 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    assert runtime.released == [("tiny:latest", None)]


def test_chat_messages_roles_and_parts(client, runtime):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "c", "name": "bob"},
    ]
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert response.status_code == 200
    text = "".join(chr(t) for t in runtime.generated[0][0])
    assert text == "<system>Be brief.<user>a\nb<assistant><user>c<assistant>"


def test_omitted_fields_keep_the_models_parameters(client, runtime):
    client.post("/v1/chat/completions", json=CHAT)
    options = runtime.generated[0][1]
    assert options.temperature == 0.5 and options.stop == ("<end>", "<eot>")
    assert options.num_predict == -1
    body = {**CHAT, "temperature": 0, "top_p": 0.5, "max_tokens": 7, "stop": "x", "seed": 3,
            "presence_penalty": 1, "frequency_penalty": -1, "user": "someone"}  # fmt: skip
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    options = runtime.generated[1][1]
    assert (options.temperature, options.top_p, options.num_predict) == (0, 0.5, 7)
    assert (options.stop, options.seed) == (("x",), 3)
    body = {**CHAT, "max_tokens": 7, "max_completion_tokens": 9}
    client.post("/v1/chat/completions", json=body)
    assert runtime.generated[2][1].num_predict == 9


def test_chat_stream_framing(client, runtime):
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["system_fingerprint"] == SYSTEM_FINGERPRINT for c in chunks)
    assert all("usage" not in c for c in chunks)
    choices = [c["choices"] for c in chunks]
    assert choices == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " world"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    ]  # fmt: skip
    assert runtime.released == [("tiny:latest", None)]
    assert runtime.turns[0].cancelled == 0


def test_chat_stream_include_usage(client, runtime):
    runtime.script = [(["a", "b"], "length")]
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse(client.post("/v1/chat/completions", json=body))[:-1]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    last = chunks[-1]
    assert last["choices"] == []
    prompt = len("<user>Hi<assistant>")
    assert last["usage"] == {"prompt_tokens": prompt, "completion_tokens": 2,
                             "total_tokens": prompt + 2,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_n_runs_parallel_turns_and_counts_the_prompt_once(client, runtime):
    runtime.script = [(["one"], "stop"), (["two", "!"], "length")]
    body = client.post("/v1/chat/completions", json={**CHAT, "n": 2}).get_json()
    assert len(runtime.turns) == 2 and runtime.acquired == [("tiny:latest", None)]
    assert [c["message"]["content"] for c in body["choices"]] == ["one", "two!"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    prompt = len("<user>Hi<assistant>")
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 3,
                             "total_tokens": prompt + 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    assert runtime.released == [("tiny:latest", None)]


def test_n_streamed_gives_every_choice_its_role_deltas_and_finish(client, runtime):
    runtime.script = [(["one"], "stop"), (["two", "!"], "length")]
    body = {**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse(client.post("/v1/chat/completions", json=body))[:-1]
    by_index: dict[int, list] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    assert [c["delta"] for c in by_index[0]] == [
        {"role": "assistant", "content": ""}, {"content": "one"}, {}]  # fmt: skip
    assert [c["delta"] for c in by_index[1]] == [
        {"role": "assistant", "content": ""}, {"content": "two"}, {"content": "!"}, {}]  # fmt: skip
    assert by_index[1][-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_n_over_the_limit_is_400_naming_n(client, runtime):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "n": 9}), 400)
    assert error["param"] == "n" and error["type"] == "invalid_request_error"
    assert runtime.acquired == []


def test_a_failing_choice_cancels_the_others(client, runtime):
    runtime.script = [(["slow"] * 3, "stop"), (["x"], "stop", OrtServeError("engine broke"))]
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "n": 2}), 500)
    assert error["message"] == "engine broke"
    assert runtime.released == [("tiny:latest", None)]


def test_busy_on_a_later_choice_cancels_the_submitted_ones(client, runtime, monkeypatch):
    calls = []
    original = runtime.acquire

    def acquire(name, keep_alive=None):
        loaded = original(name, keep_alive)
        generate = loaded.generate

        def busy_second(tokens, options):
            calls.append(1)
            runtime.busy = len(calls) > 1
            return generate(tokens, options)

        loaded.generate = busy_second
        return loaded

    monkeypatch.setattr(runtime, "acquire", acquire)
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "n": 2}), 503)
    assert error["type"] == "server_busy"
    assert runtime.turns[0].cancelled == 1
    assert runtime.released == [("tiny:latest", None)]


# ---- errors ----------------------------------------------------------------------------------


def test_top_logprobs_without_logprobs_is_400(client, runtime):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400)
    assert error["param"] == "top_logprobs" and "requires logprobs" in error["message"]
    assert runtime.acquired == []


@pytest.mark.parametrize(
    ("route", "extra", "asked"),
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3}, 3),
        ("/v1/chat/completions", {"logprobs": True}, 0),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, None),
        ("/v1/completions", {"logprobs": 2}, 2),
    ],
)
def test_logprobs_reach_the_engine(client, runtime, route, extra, asked):
    body = CHAT if route == "/v1/chat/completions" else COMPLETION
    assert client.post(route, json={**body, **extra}).status_code == 200
    (_, options), *_ = runtime.generated
    assert options.logprobs == asked


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_legacy_function_fields_are_not_supported_yet(client, runtime, extra, param):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400)
    assert error["param"] == param and "not supported yet" in error["message"]
    assert runtime.acquired == []


def test_harmless_defaults_of_refused_fields_are_fine(client):
    body = {**CHAT, "logprobs": False, "response_format": {"type": "text"}, "tool_choice": "none"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT["messages"]}, "model"),
        ({"model": "tiny"}, "messages"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "stop": 5}, "stop"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text"),
    ],
)  # fmt: skip
def test_schema_errors_name_the_param(client, body, param):
    error = openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_broken_image_parts_are_refused(client):
    """(tests/unit/test_image_requests.py: images on every protocol)"""
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    error = openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert "not an image" in error["message"]


def test_malformed_assistant_tool_calls_are_400(client):
    messages = [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}]
    body = {"model": "tiny", "messages": messages}
    error = openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"].startswith("messages[0].tool_calls")


def test_malformed_json_is_400_in_openais_shape(client):
    for data in (b"{not json", b"", b"[1, 2]"):
        response = client.post("/v1/chat/completions", data=data, content_type="application/json")
        assert openai_error(response, 400)["type"] == "invalid_request_error"


def test_unknown_model_is_404_model_not_found(client):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404)
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found"
    assert "nope" in error["message"]


def test_invalid_model_name_is_400(client):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "../x"}), 400)
    assert error["param"] == "model"


def test_embedding_model_cannot_chat(client, runtime):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "minilm"}), 400)
    assert "does not support chat" in error["message"] and error["param"] == "model"
    assert runtime.acquired == []


def test_prompt_over_the_context_is_context_length_exceeded(client, runtime):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 200}]}
    error = openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert runtime.generated == []  # refused, not truncated
    assert runtime.released == [("tiny:latest", None)]


def test_busy_server_is_503(client, runtime):
    runtime.busy = True
    error = openai_error(client.post("/v1/chat/completions", json=CHAT), 503)
    assert error["type"] == "server_busy"
    assert runtime.released == [("tiny:latest", None)]


def test_error_before_any_output_keeps_its_status_when_streaming(client, runtime):
    runtime.script = [([], "stop", OrtServeError("engine broke"))]
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert openai_error(response, 500)["message"] == "engine broke"
    assert runtime.released == [("tiny:latest", None)]


def test_mid_stream_error_is_an_sse_error_event_then_done(client, runtime):
    runtime.script = [(["a", "b"], "stop", OrtServeError("engine broke"), 1)]
    events = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "engine broke", "type": "server_error",
                                    "param": None, "code": None}}  # fmt: skip
    assert events[1]["choices"][0]["delta"] == {"content": "a"}
    assert runtime.released == [("tiny:latest", None)]


def test_mid_stream_bug_is_internal_error_without_details(client, runtime):
    runtime.script = [(["a"], "stop", RuntimeError("secret detail"), 1)]
    events = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert events[-2]["error"]["message"] == "internal error"
    assert "secret" not in json.dumps(events)


def test_cancelled_turn_is_an_error(client, runtime):
    runtime.script = [(["a"], "cancelled")]
    events = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert "cancelled" in events[-2]["error"]["message"]
    runtime.script = [(["a"], "cancelled")]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 503


def test_client_leaving_mid_stream_cancels_every_turn(client, runtime):
    body = {**CHAT, "stream": True, "n": 2}
    response = client.post("/v1/chat/completions", json=body, buffered=False)
    chunks = iter(response.response)
    assert next(chunks).startswith(b"data: ")
    response.close()  # what the WSGI server does when the client goes away
    assert all(turn.cancelled == 1 for turn in runtime.turns) and len(runtime.turns) == 2
    assert runtime.released == [("tiny:latest", None)]


def test_client_leaving_before_the_stream_starts_still_releases(app, runtime):
    environ = EnvironBuilder(
        method="POST", path="/v1/chat/completions", json={**CHAT, "stream": True}
    ).get_environ()
    statuses = []
    body = app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"]
    body.close()
    assert runtime.turns[0].cancelled == 1
    assert runtime.released == [("tiny:latest", None)]


# ---- completions -----------------------------------------------------------------------------


def test_completion_shape_raw_prompt_and_default_max_tokens(client, runtime):
    body = client.post("/v1/completions", json=COMPLETION).get_json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["system_fingerprint"] == SYSTEM_FINGERPRINT
    assert body["choices"] == [
        {"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "stop"}
    ]
    tokens, options = runtime.generated[0]
    assert tokens == [ord(c) for c in "Once"]  # no chat template
    assert options.num_predict == 16  # OpenAI's default for completions
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_completion_list_prompt_n_and_echo(client, runtime):
    body = {"model": "tiny", "prompt": ["ab", "cde"], "n": 2, "echo": True, "max_tokens": 5}
    reply = client.post("/v1/completions", json=body).get_json()
    assert [c["text"] for c in reply["choices"]] == [
        "abHello world", "abHello world", "cdeHello world", "cdeHello world"]  # fmt: skip
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert [t for t, _ in runtime.generated] == [[97, 98]] * 2 + [[99, 100, 101]] * 2
    assert runtime.generated[0][1].num_predict == 5
    # each prompt counted once, every choice's output counted
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                              "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_completion_stream_with_echo_and_usage(client):
    body = {**COMPLETION, "stream": True, "echo": True, "stream_options": {"include_usage": True}}
    events = sse(client.post("/v1/completions", json=body))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["Once", "Hel", "lo", " world", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**COMPLETION, "suffix": "end"}, "suffix"),
        ({**COMPLETION, "logprobs": 6}, "logprobs"),
        ({**COMPLETION, "best_of": 3}, "best_of"),
        ({**COMPLETION, "prompt": [1, 2, 3]}, "prompt[0]"),  # token arrays
        ({**COMPLETION, "prompt": ""}, "prompt"),
        ({**COMPLETION, "prompt": ["a", ""]}, "prompt[1]"),
        ({**COMPLETION, "prompt": ["a"] * 3, "n": 3}, "prompt"),
        ({"model": "tiny"}, "prompt"),
    ],
)
def test_completion_errors_name_the_param(client, body, param):
    error = openai_error(client.post("/v1/completions", json=body), 400)
    assert error["param"] == param


def test_completion_prompt_over_the_context(client):
    error = openai_error(
        client.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 100}), 400
    )
    assert error["code"] == "context_length_exceeded"


def test_embedding_model_cannot_complete(client):
    error = openai_error(
        client.post("/v1/completions", json={**COMPLETION, "model": "minilm"}), 400
    )
    assert "does not support completions" in error["message"]


# ---- models ----------------------------------------------------------------------------------


def test_models_list_and_retrieve(client, library):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {"tiny:latest", "team/other:v1", "minilm:latest"}
    modified = library.get("tiny").modified
    assert models["tiny:latest"] == {"id": "tiny:latest", "object": "model",
                                     "created": int(modified.timestamp()), "owned_by": "library"}  # fmt: skip
    assert models["team/other:v1"]["owned_by"] == "team"
    assert abs(models["tiny:latest"]["created"] - datetime.now(UTC).timestamp()) < 60
    assert client.get("/v1/models/tiny").get_json() == models["tiny:latest"]
    assert client.get("/v1/models/team/other:v1").get_json() == models["team/other:v1"]


def test_unknown_model_retrieve_is_404(client):
    error = openai_error(client.get("/v1/models/nope"), 404)
    assert error["code"] == "model_not_found" and error["type"] == "not_found_error"


def test_wrong_method_is_405_in_openais_shape(client):
    response = client.get("/v1/chat/completions")
    assert openai_error(response, 405)["message"].startswith("405 method not allowed")


# ---- structured output (response_format) ---------------------------------------------------

NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "n", "schema": NAME_SCHEMA,
                                                      "strict": True}}  # fmt: skip


def test_response_format_json_schema_answers_valid_json(client, runtime):
    runtime.script = [(['{"name":"x"}'],)]
    response = client.post("/v1/chat/completions", json={**CHAT, "response_format": JSON_SCHEMA})
    assert response.status_code == 200
    content = response.get_json()["choices"][0]["message"]["content"]
    assert json.loads(content) == {"name": "x"}
    assert response.headers["X-Ortserve-Attempts"] == "1"
    assert runtime.generated[0][1].guidance.kind == "json_schema"


def test_response_format_json_object(client, runtime):
    runtime.script = [(['{"a":1}'],)]
    body = {**CHAT, "response_format": {"type": "json_object"}}
    content = client.post("/v1/chat/completions", json=body).get_json()["choices"][0]
    assert json.loads(content["message"]["content"]) == {"a": 1}


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "yaml"}, "response_format.type"),
        (
            {"type": "json_schema", "json_schema": {"name": "n"}},
            "response_format.json_schema.schema",
        ),  # fmt: skip
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nope"}}},
            "response_format.json_schema.schema",
        ),  # fmt: skip
    ],
)
def test_bad_response_format_is_400(client, runtime, fmt, param):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "response_format": fmt}),
                     400)  # fmt: skip
    assert error["param"] == param
    assert runtime.acquired == []


def test_retry_is_a_stream_chunk_and_final_chunk_counts_attempts(client, runtime):
    runtime.script = [(["{"], "length"), (['{"name":"y"}'],)]
    body = {**CHAT, "response_format": JSON_SCHEMA, "stream": True}
    events = sse(client.post("/v1/chat/completions", json=body))[:-1]
    retry = [e for e in events if "ortserve_retry" in e]
    assert len(retry) == 1 and retry[0]["ortserve_retry"]["attempt"] == 2
    assert retry[0]["choices"][0]["delta"] == {}
    after = events[events.index(retry[0]) + 1 :]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in after)
    assert json.loads(text) == {"name": "y"}
    assert events[-1]["ortserve_attempts"] == 2


def test_every_attempt_failing_is_422_invalid_output(client, runtime):
    runtime.script = [(["nope"],)] * 3
    response = client.post("/v1/chat/completions", json={**CHAT, "response_format": JSON_SCHEMA})
    error = openai_error(response, 422)
    assert error["type"] == "invalid_output"


def test_every_attempt_failing_mid_stream_is_an_error_event(client, runtime):
    runtime.script = [(["nope"],)] * 3
    body = {**CHAT, "response_format": JSON_SCHEMA, "stream": True}
    events = sse(client.post("/v1/chat/completions", json=body))
    assert events[-2]["error"]["type"] == "invalid_output"
