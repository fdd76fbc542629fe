"""Anthropic's Messages API over HTTP plumbing: Flask's test client, a real library, a fake engine.

Prompts, options, tool grammars and retries are the real ones; the engine is faked (plumbing
only). tests/integration/test_anthropic_server.py runs real models under the `anthropic` SDK.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortserve.api import create_app
from ortserve.config import Settings
from ortserve.errors import OrtServeError
from tests.support.fakes import RoomyToolRuntime, add_model
from tests.support.http import anthropic_error
from tests.support.tools import CALL, SCRIPT

ASK = {"model": "tiny", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]}
TOOL = {
    "name": "get_time",
    "description": "The time in a time zone",
    "input_schema": {
        "type": "object",
        "properties": {"tz": {"type": "string"}},
        "required": ["tz"],
    },
}
QWEN3 = (Path(__file__).parents[1] / "data" / "qwen3_chat_template.jinja").read_text()


@pytest.fixture
def runtime(library):
    add_model(library, "tiny", capabilities=["completion", "tools"])
    add_model(library, "thinker", capabilities=["completion", "tools", "thinking"],
              template=QWEN3)  # fmt: skip
    add_model(library, "minilm", capabilities=["embedding"], template=None)
    return RoomyToolRuntime(library)


def events(response) -> list[tuple[str, dict]]:
    """(event name, data) of every SSE event; each data's type is its event's name."""
    assert response.mimetype == "text/event-stream"
    out = []
    for block in response.get_data(as_text=True).split("\n\n")[:-1]:
        name, data = block.split("\n")
        name, data = name.removeprefix("event: "), json.loads(data.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


def prompt_of(runtime, turn: int = 0) -> str:
    return "".join(chr(t) for t in runtime.generated[turn][0])  # the fake encodes characters


# ---- messages ------------------------------------------------------------------------------


def test_message_shape_and_usage(client, runtime):
    r = client.post("/v1/messages", json=ASK, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.get_json()
    assert body["id"].startswith("msg_") and len(body["id"]) > 10
    assert {k: body[k] for k in ("type", "role", "model", "stop_reason", "stop_sequence")} == {
        "type": "message", "role": "assistant", "model": "tiny", "stop_reason": "end_turn",
        "stop_sequence": None}  # fmt: skip
    assert body["content"] == [{"type": "text", "text": "Hello world"}]
    assert body["usage"] == {"input_tokens": len(runtime.generated[0][0]), "output_tokens": 3}
    assert runtime.released == [("tiny:latest", None)]


def test_blocks_and_tool_results_reach_the_template(client, runtime):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "T"}, {"type": "text", "text": "U"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use the tool", "signature": "x"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"tz": "UTC"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "1"}]},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x", "is_error": True},
            {"type": "text", "text": "OK"}]},
    ]  # fmt: skip
    r = client.post("/v1/messages", json={**ASK, "messages": messages,
                                          "metadata": {"user_id": "u"}, "unknown": 1})  # fmt: skip
    assert r.status_code == 200, r.get_json()
    assert prompt_of(runtime) == "<user>T\nU<assistant><tool>1<tool>Error: x<user>OK<assistant>"


def test_sampling_fields_become_options(client, runtime):
    body = {**ASK, "temperature": 0.2, "top_p": 0.5, "top_k": 7, "stop_sequences": ["\n\n"]}
    greedy = {**ASK, "temperature": 0, "top_k": 0}
    assert client.post("/v1/messages", json=greedy).status_code == 200
    assert (runtime.generated[-1][1].temperature, runtime.generated[-1][1].top_k) == (0, 0)
    runtime.generated.clear()
    assert client.post("/v1/messages", json=body).status_code == 200
    options = runtime.generated[0][1]
    assert (options.num_predict, options.temperature, options.top_p, options.top_k,
            options.stop) == (20, 0.2, 0.5, 7, ("\n\n",))  # fmt: skip
    client.post("/v1/messages", json={**ASK, "stop_sequences": []})
    assert runtime.generated[1][1].stop == ("<end>", "<eot>")  # the model's own stops stay


def test_max_tokens_reached_is_stop_reason_max_tokens(client, runtime):
    runtime.script = [(["a", "b"], "length")]
    r = client.post("/v1/messages", json=ASK)
    assert r.get_json()["stop_reason"] == "max_tokens"


def test_stream_events_in_order(client, runtime):
    r = client.post("/v1/messages", json={**ASK, "stream": True})
    assert r.status_code == 200
    got = events(r)
    assert [name for name, _ in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    prompt = len(runtime.generated[0][0])
    assert start["usage"] == {"input_tokens": prompt, "output_tokens": 0}
    assert got[1][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}  # fmt: skip
    texts = [d["delta"]["text"] for n, d in got if n == "content_block_delta"]
    assert "".join(texts) == "Hello world"
    assert got[6][1] == {"type": "message_delta",
                         "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"input_tokens": prompt, "output_tokens": 3}}  # fmt: skip


def test_thinking_is_its_own_block(client, runtime):
    runtime.script = [(["<think>\nhm", "m</think>", "\n\n", "Hi"],)]
    body = {**ASK, "model": "thinker", "thinking": {"type": "enabled", "budget_tokens": 1024}}
    whole = client.post("/v1/messages", json=body).get_json()
    assert whole["content"] == [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                {"type": "text", "text": "Hi"}]  # fmt: skip
    runtime.script = [(["<think>\nhm", "m</think>", "\n\n", "Hi"],)]
    got = events(client.post("/v1/messages", json={**body, "stream": True}))
    blocks = [d["content_block"]["type"] for n, d in got if n == "content_block_start"]
    deltas = [(d["index"], d["delta"]) for n, d in got if n == "content_block_delta"]
    assert blocks == ["thinking", "text"]
    assert deltas[-1] == (1, {"type": "text_delta", "text": "Hi"})
    assert "".join(d.get("thinking", "") for _, d in deltas) == "hmm"


def test_thinking_disabled_and_refusals(client, runtime):
    off = {**ASK, "model": "thinker", "thinking": {"type": "disabled"}}
    assert client.post("/v1/messages", json=off).status_code == 200
    assert "<think>\n\n</think>" in prompt_of(runtime)  # Qwen3's way of not thinking
    on = {**ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert "thinking" in anthropic_error(client.post("/v1/messages", json=on), 400,
                                  "invalid_request_error")  # fmt: skip
    both = {**on, "model": "thinker", "tools": [TOOL]}
    message = anthropic_error(client.post("/v1/messages", json=both), 400, "invalid_request_error")
    assert message.startswith("thinking cannot be combined with tools")
    runtime.script = [(["<think>hm</think>", "Hi"],)]  # tool_choice none: a plain turn thinks
    none = client.post("/v1/messages", json={**both, "tool_choice": {"type": "none"}})
    assert [b["type"] for b in none.get_json()["content"]] == ["thinking", "text"]


# ---- tools ---------------------------------------------------------------------------------


def test_forced_tool_becomes_a_tool_use_block(client, runtime):
    runtime.script = [([CALL[:30], CALL[30:]], "stop")]
    body = {**ASK, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_time"}}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.get_json()
    out = r.get_json()
    (block,) = out["content"]
    assert block["type"] == "tool_use" and block["name"] == "get_time"
    assert block["input"] == {"tz": "UTC"} and block["id"]
    assert out["stop_reason"] == "tool_use"
    assert "get_time" in runtime.generated[0][1].guidance.data  # the grammar forces the tool


@pytest.mark.parametrize(
    ("choice", "start"),
    [({"type": "auto"}, "start: calls | TEXT"), ({"type": "any"}, "start: calls"),
     ({"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}, "start: calls")],
)  # fmt: skip
def test_tool_choice_sets_the_grammar(client, runtime, choice, start):
    runtime.script = [([CALL], "stop")]
    r = client.post("/v1/messages", json={**ASK, "tools": [TOOL], "tool_choice": choice})
    assert r.status_code == 200, r.get_json()
    grammar = runtime.generated[0][1].guidance.data
    assert grammar.splitlines()[0] == start


def test_tool_choice_none_answers_in_text(client, runtime):
    body = {**ASK, "tools": [TOOL], "tool_choice": {"type": "none"}}
    out = client.post("/v1/messages", json=body).get_json()
    assert out["content"] == [{"type": "text", "text": "Hello world"}]
    assert runtime.generated[0][1].guidance is None


def test_streamed_tool_use_after_an_invisible_retry(client, runtime):
    runtime.script = list(SCRIPT)  # a truncated call, then a valid one: nothing shown before
    body = {**ASK, "tools": [TOOL], "tool_choice": {"type": "any"}, "stream": True}
    got = events(client.post("/v1/messages", json=body))
    assert [n for n, _ in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]  # fmt: skip
    block = got[1][1]["content_block"]
    assert block == {"type": "tool_use", "id": block["id"], "name": "get_time", "input": {}}
    assert json.loads(got[2][1]["delta"]["partial_json"]) == {"tz": "UTC"}
    assert got[4][1]["delta"]["stop_reason"] == "tool_use"
    assert got[4][1]["usage"]["input_tokens"] == 2 * got[0][1]["message"]["usage"]["input_tokens"]


def test_whitespace_before_calls_makes_no_text_block(client, runtime):
    body = {**ASK, "tools": [TOOL]}
    runtime.script = [(["\n", CALL], "stop")]
    whole = client.post("/v1/messages", json=body).get_json()
    assert [block["type"] for block in whole["content"]] == ["tool_use"]
    runtime.script = [(["\n", CALL], "stop")]
    got = events(client.post("/v1/messages", json={**body, "stream": True}))
    starts = [d["content_block"]["type"] for n, d in got if n == "content_block_start"]
    assert starts == ["tool_use"]
    runtime.script = [([" ", "\n", "Hi"], "stop")]  # held whitespace goes out with the text
    got = events(client.post("/v1/messages", json={**body, "stream": True}))
    deltas = [d["delta"] for n, d in got if n == "content_block_delta"]
    assert deltas == [{"type": "text_delta", "text": " \nHi"}]


def test_a_retry_after_streamed_text_ends_with_an_error_event(client, runtime):
    runtime.script = [(["Let me see. ", "<tool_call>\n{", '"oops'], "stop"), ([CALL], "stop")]
    body = {**ASK, "tools": [TOOL], "stream": True}
    got = events(client.post("/v1/messages", json=body))
    assert got[2][1]["delta"] == {"type": "text_delta", "text": "Let me see. "}
    name, data = got[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "failed validation after its text was streamed" in data["error"]["message"]


# ---- errors in Anthropic's shape -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [({"max_tokens": None}, "max_tokens"), ({"temperature": 1.5}, "temperature"),
     ({"messages": []}, "messages"), ({"messages": [{"role": "system", "content": "x"}]},
                                      "messages[0].role"),
     ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
     ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
     ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
      "messages[0].content")],
)  # fmt: skip
def test_schema_errors_name_the_field(client, change, param):
    body = {k: v for k, v in {**ASK, **change}.items() if v is not None}
    message = anthropic_error(client.post("/v1/messages", json=body), 400, "invalid_request_error")
    assert message.startswith(param), message


@pytest.mark.parametrize(
    ("content", "message"),
    [([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}],
      "messages[0].content[0].source.data: not base64"),
     ([{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
      "messages[0].content[0]: unsupported content block 'tool_use' in a user"),
     ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}],
      "messages[0].content[0].content[0]: image blocks")],
)  # fmt: skip
def test_unsupported_blocks_are_400(client, runtime, content, message):
    body = {**ASK, "messages": [{"role": "user", "content": content}]}
    got = anthropic_error(client.post("/v1/messages", json=body), 400, "invalid_request_error")
    assert got.startswith(message), got
    assert runtime.generated == []


def test_other_refusals(client, runtime):
    prefill = {**ASK, "messages": [*ASK["messages"], {"role": "assistant", "content": "Sure"}]}
    assert "prefill" in anthropic_error(client.post("/v1/messages", json=prefill), 400,
                                 "invalid_request_error")  # fmt: skip
    structured = {**ASK, "output_config": {"format": {"type": "json_schema", "schema": {}}}}
    assert "output_config.format" in anthropic_error(client.post("/v1/messages", json=structured), 400,
                                              "invalid_request_error")  # fmt: skip
    effort = {**ASK, "output_config": {"effort": "low"}, "cache_control": {"type": "ephemeral"}}
    assert client.post("/v1/messages", json=effort).status_code == 200  # ignored, as unknown
    runtime.generated.clear()
    any_ = {**ASK, "tool_choice": {"type": "any"}}
    assert "needs tools" in anthropic_error(client.post("/v1/messages", json=any_), 400,
                                     "invalid_request_error")  # fmt: skip
    unknown = {**ASK, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}
    assert "nope" in anthropic_error(client.post("/v1/messages", json=unknown), 400,
                              "invalid_request_error")  # fmt: skip
    embed = {**ASK, "model": "minilm"}
    anthropic_error(client.post("/v1/messages", json=embed), 400, "invalid_request_error")
    assert runtime.generated == []


def test_status_errors_take_anthropics_types(client, runtime):
    missing = anthropic_error(client.post("/v1/messages", json={**ASK, "model": "nope"}), 404,
                       "not_found_error")  # fmt: skip
    assert missing == 'model "nope:latest" not found, try pulling it first'
    anthropic_error(client.get("/v1/messages"), 405, "invalid_request_error")
    anthropic_error(client.post("/v1/messages/nope", json=ASK), 404, "not_found_error")
    anthropic_error(client.post("/v1/messages", data="{", content_type="application/json"), 400,
             "invalid_request_error")  # fmt: skip
    runtime.busy = True
    r = client.post("/v1/messages", json=ASK)
    anthropic_error(r, 503, "overloaded_error")
    assert r.headers["Retry-After"] == "1"
    openai = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert set(openai.get_json()["error"]) == {"message", "type", "param", "code"}


def test_oversized_body_is_request_too_large(client):
    body = b'{"model": "tiny", "max_tokens": 1, "system": "' + b"x" * (32 * 1024 * 1024) + b'"}'
    r = client.post("/v1/messages", data=body, content_type="application/json")
    assert "too large" in anthropic_error(r, 413, "request_too_large")


def test_mid_stream_error_is_an_error_event(client, runtime):
    runtime.script = [(["Hel", "lo"], "stop", OrtServeError("engine failed"), 1)]
    got = events(client.post("/v1/messages", json={**ASK, "stream": True}))
    error = {"type": "error", "error": {"type": "api_error", "message": "engine failed"}}
    assert got[-1] == ("error", error)
    assert runtime.released


def test_keys_are_taken_from_x_api_key_and_refusals_are_anthropics(library, runtime):
    app = create_app(Settings(models=library.root, api_keys=(("ci", "sk-test"),)),
                     runtime=runtime)  # fmt: skip
    client = app.test_client()
    anthropic_error(client.post("/v1/messages", json=ASK), 401, "authentication_error")
    anthropic_error(client.post("/v1/messages", json=ASK, headers={"x-api-key": "wrong"}), 401,
             "authentication_error")  # fmt: skip
    key = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}
    assert client.post("/v1/messages", json=ASK, headers=key).status_code == 200
    foreign = client.post("/v1/messages", json=ASK,
                          headers={**key, "Origin": "https://evil.example"})  # fmt: skip
    anthropic_error(foreign, 403, "permission_error")


# ---- count_tokens --------------------------------------------------------------------------


def test_count_tokens_renders_the_real_prompt_and_releases(client, runtime):
    system = [{"type": "text", "text": "Be", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "brief."}]  # fmt: skip
    body = {"model": "tiny", "system": system, "messages": ASK["messages"]}
    r = client.post("/v1/messages/count_tokens", json=body)
    assert r.status_code == 200
    assert r.get_json() == {"input_tokens": len("<system>Be\nbrief.<user>Hi<assistant>")}
    assert runtime.released == [("tiny:latest", None)] and runtime.generated == []
    with_tools = client.post("/v1/messages/count_tokens", json={**body, "tools": [TOOL]})
    assert with_tools.get_json()["input_tokens"] >= r.get_json()["input_tokens"]
    long = {**body, "messages": [{"role": "user", "content": "x" * 5000}]}  # past the context
    assert client.post("/v1/messages/count_tokens", json=long).get_json()["input_tokens"] > 5000


def test_count_tokens_errors(client, runtime):
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "nope", "messages":
                                                            ASK["messages"]}), 404,
             "not_found_error")  # fmt: skip
    message = anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "tiny"}), 400,
                       "invalid_request_error")  # fmt: skip
    assert message == "messages is required"
    assert runtime.acquired == []


def _branches(n: int) -> dict:
    return {"anyOf": [{"type": "object", "properties": {"k": {"const": i}}, "required": ["k"]}
                      for i in range(n)]}  # fmt: skip


@pytest.mark.parametrize(
    ("input_schema", "said"),
    [
        ({"type": "object", "properties": {"a": {"type": "nope"}}}, "is not a valid JSON Schema"),
        ({"type": "object", "properties": {"a": _branches(5000)}}, "is too large to enforce"),
    ],
)
def test_tool_schema_errors_name_input_schema(client, input_schema, said):
    """Anthropic's tools have input_schema: errors named tools[0].function.parameters."""
    body = {**ASK, "tools": [{**TOOL, "input_schema": input_schema}],
            "tool_choice": {"type": "tool", "name": "get_time"}}  # fmt: skip
    message = anthropic_error(client.post("/v1/messages", json=body), 400, "invalid_request_error")
    assert message.startswith(f"tools[0].input_schema {said}")


def test_many_tools_too_large_together_are_refused(client):
    """Each tool's schema fits, but a call may name any of them: their sum is the grammar."""
    tools = [{**TOOL, "name": f"t{i}", "input_schema": {"type": "object", **_branches(300)}}
             for i in range(5)]  # fmt: skip
    body = {**ASK, "tools": tools, "tool_choice": {"type": "any"}}
    message = anthropic_error(client.post("/v1/messages", json=body), 400, "invalid_request_error")
    assert message.startswith("tools is too large to enforce")
    body["tool_choice"] = {"type": "tool", "name": "t0"}  # one tool forced: it fits
    assert client.post("/v1/messages", json=body).status_code != 400
