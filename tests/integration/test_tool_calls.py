"""Tool calling end to end: grammar-forced calls, tool results, and the official clients."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.support.tools import TIME, WEATHER, parameters_by_name

pytestmark = pytest.mark.slow

TOOLS = [WEATHER, TIME]
PARAMS = parameters_by_name(TOOLS)
SEEDS = range(20)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check(name: str, arguments: dict) -> None:
    jsonschema.validate(arguments, PARAMS[name])


def _openai(server, **body):
    body = {"model": "tiny-chat", "messages": ASK, "tools": TOOLS, "max_tokens": 256, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def _native(server, **body):
    body = {"model": "tiny-chat", "messages": ASK, "tools": TOOLS, "stream": False, **body}
    body.setdefault("options", {})["num_predict"] = 256
    return httpx.post(f"{server.url}/api/chat", json=body, timeout=120)


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_openai_forced_calls_are_valid(server, choice):
    tool_choice = (
        choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    )
    for seed in SEEDS:
        r = _openai(server, tool_choice=tool_choice, seed=seed)
        assert r.status_code == 200, r.text
        choice_ = r.json()["choices"][0]
        assert choice_["finish_reason"] == "tool_calls", choice_
        calls = choice_["message"]["tool_calls"]
        assert calls and all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
        for call in calls:
            _check(call["function"]["name"], json.loads(call["function"]["arguments"]))
            if choice != "required":
                assert call["function"]["name"] == choice
        if choice != "required":
            assert len(calls) == 1


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_native_forced_calls_are_valid(server, choice):
    tool_choice = (
        choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    )
    for seed in SEEDS:
        r = _native(server, tool_choice=tool_choice, options={"seed": seed})
        assert r.status_code == 200, r.text
        calls = r.json()["message"]["tool_calls"]
        assert calls
        for call in calls:
            assert isinstance(call["function"]["arguments"], dict)
            _check(call["function"]["name"], call["function"]["arguments"])


def test_none_never_calls(server):
    for seed in SEEDS:
        r = _openai(server, tool_choice="none", seed=seed, max_tokens=24)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert "tool_calls" not in choice["message"]
        assert choice["finish_reason"] != "tool_calls"


def test_auto_gives_text_or_valid_calls(server):
    for seed in range(5):
        r = _native(server, options={"seed": seed, "num_predict": 48})
        assert r.status_code == 200, r.text
        for call in r.json()["message"].get("tool_calls") or []:
            _check(call["function"]["name"], call["function"]["arguments"])


def test_parallel_false_gives_one_call(server):
    for seed in range(5):
        r = _openai(server, tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


def test_openai_stream_sends_whole_calls(server):
    r = _openai(server, tool_choice="required", stream=True, seed=3)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    calls = [c for ch in chunks for choice in ch["choices"]
             for c in choice["delta"].get("tool_calls") or []]  # fmt: skip
    assert calls
    for call in calls:
        _check(call["function"]["name"], json.loads(call["function"]["arguments"]))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_native_stream_sends_whole_calls(server):
    r = _native(server, tool_choice="required", stream=True, options={"seed": 5})
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    calls = [c for line in lines for c in (line.get("message") or {}).get("tool_calls") or []]
    assert calls and lines[-1]["done"]


def test_unknown_forced_function_is_refused(server):
    r = _openai(server, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert r.status_code == 400


def test_openai_client_round_trip(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    first = client.chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=256, seed=1)  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    _check(call.function.name, json.loads(call.function.arguments))
    messages = [*ASK, message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]  # fmt: skip
    final = client.chat.completions.create(model="tiny-chat", messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=16, seed=1)  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None


def get_weather(city: str, days: int = 1) -> str:
    """The weather in a city.

    Args:
        city: The city.
        days: How many days.
    """
    return "sunny"


def test_ollama_client_tools(server):
    import ollama

    client = ollama.Client(host=server.url)
    response = client.chat(model="tiny-chat", messages=ASK, tools=[get_weather],
                           options={"num_predict": 64, "seed": 2})  # fmt: skip
    for call in response.message.tool_calls or []:
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments["city"], str)
    # A tool result message in the next turn renders and answers.
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]  # fmt: skip
    final = client.chat(model="tiny-chat", messages=messages, tools=[get_weather],
                        options={"num_predict": 8})  # fmt: skip
    assert final.done


def test_a_tool_without_parameters_is_called_with_no_arguments(server):
    """OpenAI's meaning: no `parameters` means the function takes none."""
    now = {"type": "function", "function": {"name": "get_now", "description": "The time."}}
    for seed in range(5):
        response = _openai(server, tools=[now], tool_choice="required", seed=seed)
        assert response.status_code == 200, response.text
        calls = response.json()["choices"][0]["message"]["tool_calls"]
        assert calls  # "required": at least one (parallel calls allowed)
        for call in calls:
            assert call["function"]["name"] == "get_now"
            assert json.loads(call["function"]["arguments"]) == {}
