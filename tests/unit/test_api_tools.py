"""Tool calls over the HTTP plumbing: retries, attempts and usage on both APIs; generate refuses.

The engine is faked (HTTP plumbing only); the grammar, parser, validation and retry policy
are the real ones. tests/integration/test_tool_call_families.py runs the real models.
"""

from __future__ import annotations

import json

import pytest

from tests.support.fakes import FakeTurn, ToolRuntime, add_model
from tests.support.http import lines
from tests.support.tools import CALL, SCRIPT

TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string"}},
            "required": ["tz"],
        },  # fmt: skip
    },
}
ASK = [{"role": "user", "content": "Time?"}]


@pytest.fixture
def runtime(library):
    add_model(library, "tiny", capabilities=["completion", "tools"])
    return ToolRuntime(library)


def test_generate_refuses_tools_naming_the_field(client, runtime):
    r = client.post("/api/generate", json={"model": "tiny", "prompt": "hi", "tools": [TOOL]})
    assert r.status_code == 400
    assert r.get_json() == {"error": "tools is not supported on /api/generate; use /api/chat"}
    assert runtime.generated == []
    ok = client.post("/api/generate", json={"model": "tiny", "prompt": "hi", "tools": [],
                                            "stream": False})  # fmt: skip
    assert ok.status_code == 200  # an empty value asks for nothing


def test_native_chat_retries_a_truncated_call_and_counts_every_attempt(client, runtime):
    runtime.script = list(SCRIPT)
    r = client.post("/api/chat", json={"model": "tiny", "messages": ASK, "tools": [TOOL],
                                       "tool_choice": "required", "stream": False,
                                       "options": {"num_predict": 5}})  # fmt: skip
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert r.headers["X-Ortserve-Attempts"] == "2" and body["attempts"] == 2
    assert body["message"]["tool_calls"][0]["function"] == {"name": "get_time",
                                                            "arguments": {"tz": "UTC"}}  # fmt: skip
    prompt = len(runtime.generated[0][0])
    assert body["prompt_eval_count"] == 2 * prompt and body["eval_count"] == 4
    assert body["eval_duration"] == 2 * 2500
    assert [options.num_predict for _, options in runtime.generated] == [5, 10]


def test_native_stream_signals_the_retry_and_reports_attempts(client, runtime):
    runtime.script = list(SCRIPT)
    r = client.post("/api/chat", json={"model": "tiny", "messages": ASK, "tools": [TOOL],
                                       "tool_choice": "required"})  # fmt: skip
    objects = lines(r)
    assert objects[0]["retry"]["attempt"] == 2
    assert objects[1]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert objects[-1]["done"] is True and objects[-1]["attempts"] == 2


def test_native_chat_fails_explicitly_after_every_attempt(client, runtime):
    runtime.script = [(["<tool_call>"], "length")] * 3
    r = client.post("/api/chat", json={"model": "tiny", "messages": ASK, "tools": [TOOL],
                                       "tool_choice": "required", "stream": False})  # fmt: skip
    assert r.status_code == 422
    assert r.get_json()["error"].startswith("tool call failed validation after 3 attempts")


def test_openai_usage_and_attempts_count_every_attempt(client, runtime):
    runtime.script = list(SCRIPT)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK,
                                                  "tools": [TOOL], "tool_choice": "required",
                                                  "max_tokens": 5})  # fmt: skip
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert r.headers["X-Ortserve-Attempts"] == "2"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"tz": "UTC"}
    prompt = len(runtime.generated[0][0])
    assert body["usage"] == {"prompt_tokens": 2 * prompt, "completion_tokens": 4,
                             "total_tokens": 2 * prompt + 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_openai_n_choices_share_the_prompt_but_count_retries(client, runtime):
    one = ([CALL], "stop")
    runtime.script = [one, SCRIPT[0], SCRIPT[1]]  # choice 0 at once, choice 1 retried
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "n": 2,
                                                  "tools": [TOOL], "tool_choice": "required",
                                                  "max_tokens": 5})  # fmt: skip
    assert r.status_code == 200, r.get_json()
    prompt = len(runtime.generated[0][0])
    usage = r.get_json()["usage"]
    assert usage["prompt_tokens"] == 2 * prompt  # once for both choices, once for the retry
    assert usage["completion_tokens"] == 1 + 2 + 2


def test_openai_stream_reports_the_retry_and_attempts(client, runtime):
    runtime.script = list(SCRIPT)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK,
                                                  "tools": [TOOL], "tool_choice": "required",
                                                  "stream": True})  # fmt: skip
    chunks = [json.loads(line[6:]) for line in r.get_data(as_text=True).splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert [c["ortserve_retry"]["attempt"] for c in chunks if "ortserve_retry" in c] == [2]
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert last["choices"][0]["finish_reason"] == "tool_calls" and last["ortserve_attempts"] == 2


def test_text_of_an_auto_answer_streams_as_text(client, runtime):
    runtime.next_turn = FakeTurn(["It is ", "noon."])
    r = client.post("/api/chat", json={"model": "tiny", "messages": ASK, "tools": [TOOL]})
    objects = lines(r)
    assert "".join(o["message"]["content"] for o in objects) == "It is noon."
    assert objects[-1]["attempts"] == 1


def test_complete_calls_cut_off_after_them_finish_as_tool_calls(client, runtime):
    # the cap can only have cut what came after the validated calls (never shown with calls)
    runtime.script = [([CALL, "\n"], "length")]
    body = {"model": "tiny", "messages": ASK, "tools": [TOOL], "tool_choice": "required"}
    reply = client.post("/v1/chat/completions", json=body).get_json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
