"""Tool calling in the Llama 3.1, Mistral and Phi-4 formats, end to end through a real server.

The models are the tiny qwen2 bundle under a manifest whose template (a Modelfile TEMPLATE)
is in each family's layout: the tool-call format must follow the template, not the qwen2
architecture. The markers are plain text to the tiny tokenizer, so the grammar writes them
as text and the parser finds them as text.
"""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import pytest

from ortserve.library import Library
from tests.integration.conftest import Server
from tests.integration.family_templates import TEMPLATES
from tests.support.tools import TIME, parameters_by_name, weather_tool

pytestmark = pytest.mark.slow

FAMILIES = sorted(TEMPLATES)
SEEDS = range(20)
RETRIES = 5  # attempts with a cap of 4 tokens: 4, 8, 16, 32, 64, 128
WEATHER = weather_tool(city_max_length=12)
TOOLS = [WEATHER, TIME]
PARAMS = parameters_by_name(TOOLS)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def family_library(tmp_path_factory, served_library) -> Library:
    """A copy of tiny-chat's bundle, and one manifest per family with that family's template."""
    library = Library(tmp_path_factory.mktemp("families") / "models")
    source = served_library.get("tiny-chat")
    with library.staging("families") as staged:
        bundle = staged / "bundle"
        shutil.copytree(source.path, bundle)
        library.add("tiny-hermes", bundle, dict(source.manifest))
    base = library.get("tiny-hermes").manifest
    for family, template in TEMPLATES.items():
        library.save(f"tiny-{family}", {**base, "template": template})
    return library


@pytest.fixture(scope="module")
def family_server(family_library):
    running = Server(family_library, ORTSERVE_FORMAT_RETRIES=str(RETRIES))
    yield running
    running.stop()


def _openai(server, family: str, **body) -> httpx.Response:
    body = {"model": f"tiny-{family}", "messages": ASK, "tools": TOOLS, "max_tokens": 160, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def _native(server, family: str, options: dict, **body) -> httpx.Response:
    body = {"model": f"tiny-{family}", "messages": ASK, "tools": TOOLS, "stream": False,
            "options": {"num_predict": 160, **options}, **body}  # fmt: skip
    return httpx.post(f"{server.url}/api/chat", json=body, timeout=120)


def _check_openai_message(reply: dict) -> list[dict]:
    """The calls of a chat.completion holding tool calls, its shape checked on the way."""
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None, message
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for call in message["tool_calls"]:
        assert set(call) == {"id", "type", "function"} and call["type"] == "function"
        assert call["id"].startswith("call_") and set(call["function"]) == {"name", "arguments"}
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            PARAMS[call["function"]["name"]])  # fmt: skip
    return message["tool_calls"]


@pytest.mark.parametrize("family", FAMILIES)
def test_required_always_gives_valid_calls(family_server, family):
    for seed in SEEDS:
        r = _openai(family_server, family, tool_choice="required", seed=seed)
        assert r.status_code == 200, r.text
        calls = _check_openai_message(r.json())
        assert 1 <= len(calls) <= 4


@pytest.mark.parametrize("family", FAMILIES)
def test_named_function_always_gives_one_valid_call(family_server, family):
    for seed in SEEDS:
        r = _openai(family_server, family, tool_choice=NAMED, seed=seed)
        assert r.status_code == 200, r.text
        calls = _check_openai_message(r.json())
        assert [c["function"]["name"] for c in calls] == ["get_time"]


@pytest.mark.parametrize("family", FAMILIES)
def test_none_never_calls(family_server, family):
    for seed in SEEDS:
        r = _openai(family_server, family, tool_choice="none", seed=seed, max_tokens=12)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] != "tool_calls"
        assert isinstance(choice["message"]["content"], str)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_named_and_parallel_false(family_server, family):
    for seed in range(5):
        r = _native(family_server, family, {"seed": seed}, tool_choice=NAMED)
        assert r.status_code == 200, r.text
        calls = r.json()["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_time"]
        assert calls[0]["function"]["arguments"]["tz"] in ("UTC", "CET")
        r = _native(family_server, family, {"seed": seed}, tool_choice="required",
                    parallel_tool_calls=False)  # fmt: skip
        assert r.status_code == 200, r.text
        (call,) = r.json()["message"]["tool_calls"]
        jsonschema.validate(call["function"]["arguments"], PARAMS[call["function"]["name"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_gives_text_or_valid_calls(family_server, family):
    for seed in range(5):
        r = _openai(family_server, family, seed=seed, max_tokens=48)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        for call in message.get("tool_calls") or []:
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                PARAMS[call["function"]["name"]])  # fmt: skip
        if not message.get("tool_calls"):
            assert isinstance(message["content"], str)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_calls_are_whole_and_valid(family_server, family):
    r = _openai(family_server, family, tool_choice="required", stream=True, seed=4,
                stream_options={"include_usage": True})  # fmt: skip
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    retries = [c for c in chunks if "ortserve_retry" in c]
    calls = [call for c in chunks for choice in c["choices"]
             for call in choice["delta"].get("tool_calls") or []]  # fmt: skip
    assert calls and [c["index"] for c in calls] == list(range(len(calls)))
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            PARAMS[call["function"]["name"]])  # fmt: skip
    closing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert closing[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert closing[-1]["ortserve_attempts"] == len(retries) + 1
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def _prompt_tokens(server, family: str) -> int:
    """The prompt's token count, from a one-attempt answer (tool_choice "none" has no retry)."""
    r = _openai(server, family, tool_choice="none", max_tokens=1)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def _failed_caps(attempts: int) -> int:
    """Tokens of the attempts before the last: each ran to its cap, 4 doubling each time."""
    return sum(4 * 2**k for k in range(attempts - 1))


@pytest.mark.parametrize("family", ["hermes", *FAMILIES])
def test_truncated_call_is_retried_and_every_attempt_counted(family_server, family):
    prompt = _prompt_tokens(family_server, family)
    r = _native(family_server, family, {"seed": 1, "num_predict": 4}, tool_choice=NAMED)
    assert r.status_code == 200, r.text
    body, attempts = r.json(), int(r.headers["X-Ortserve-Attempts"])
    assert body["attempts"] == attempts > 1
    assert body["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert body["prompt_eval_count"] == attempts * prompt  # every attempt prefilled it
    failed = _failed_caps(attempts)
    assert failed < body["eval_count"] <= failed + 4 * 2 ** (attempts - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_usage_counts_every_attempt(family_server, family):
    prompt = _prompt_tokens(family_server, family)
    r = _openai(family_server, family, tool_choice=NAMED, seed=2, max_tokens=4)
    assert r.status_code == 200, r.text
    attempts, usage = int(r.headers["X-Ortserve-Attempts"]), r.json()["usage"]
    assert attempts > 1 and usage["prompt_tokens"] == attempts * prompt
    assert usage["completion_tokens"] > _failed_caps(attempts)


IMPOSSIBLE = {
    "type": "function",
    "function": {
        "name": "write",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 200}},
            "required": ["text"],
        },
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_impossible_call_is_an_explicit_error(family_server, family):
    forced = {"type": "function", "function": {"name": "write"}}
    r = _openai(family_server, family, tools=[IMPOSSIBLE], tool_choice=forced, max_tokens=2)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_output"
    assert f"after {RETRIES + 1} attempts (truncated at the token limit" in error["message"]
    r = _native(family_server, family, {"num_predict": 2}, tools=[IMPOSSIBLE], tool_choice=forced)
    assert r.status_code == 422 and "tool call failed validation" in r.json()["error"]


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_client_round_trip(family_server, family):
    import openai

    client = openai.OpenAI(base_url=f"{family_server.url}/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model=f"tiny-{family}", messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=160, seed=1)  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    # The call and its result render in the family's template for the next turn.
    messages = [*ASK, message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]  # fmt: skip
    final = client.chat.completions.create(model=f"tiny-{family}", messages=messages,
                                           tools=TOOLS, tool_choice="none", max_tokens=8)  # fmt: skip
    assert final.choices[0].message.tool_calls is None
