"""Structured output (format / response_format) against `ortserve serve` and tiny models."""

from __future__ import annotations

import enum
import json
import urllib.error
import urllib.request
from typing import Annotated

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

SEEDS = range(20)


class Colour(str, enum.Enum):  # noqa: UP042 (the str mixin is what is tested)
    red = "red"
    green = "green"
    blue = "blue"


class Pet(BaseModel):
    name: str = Field(max_length=24)
    age: int
    tags: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)
    colour: Colour


SCHEMA = Pet.model_json_schema()


def post(server, path: str, body: dict) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a raw POST."""
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.mark.parametrize("seed", SEEDS)
def test_ollama_client_format_schema_always_validates(server, seed):
    """Valid JSON of the schema, or an explicit 422: never invalid JSON labelled valid.

    The random-weight model samples afresh each time (og's static engine ignores seeds),
    and now and then every attempt runs into the token cap: that must be the explicit error.
    """
    client = ollama.Client(host=server.url)
    messages = [{"role": "user", "content": f"Describe pet number {seed}."}]
    options = {"seed": seed, "temperature": 0.9, "num_predict": 200}
    try:
        reply = client.chat(model="tiny-chat", messages=messages, format=SCHEMA, options=options)
    except ollama.ResponseError as exc:
        assert exc.status_code == 422 and exc.error.startswith("output failed its schema after")
        return
    value = json.loads(reply.message.content)
    jsonschema.validate(value, SCHEMA)
    Pet.model_validate(value)


@pytest.mark.parametrize("seed", SEEDS)
def test_format_json_always_an_object(server, seed):
    body = {"model": "tiny-llama", "prompt": f"Write JSON {seed}", "format": "json",
            "stream": False, "options": {"seed": seed, "num_predict": 64}}  # fmt: skip
    status, headers, reply = post(server, "/api/generate", body)
    if status == 422:  # an explicit failure is allowed; invalid JSON never is
        assert "attempts" in reply["error"]
        return
    assert status == 200 and isinstance(json.loads(reply["response"]), dict)
    assert int(headers["X-Ortserve-Attempts"]) == reply["attempts"] >= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_openai_parse_always_gives_the_object(server, seed):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    completion = client.chat.completions.parse(
        model="tiny-chat",
        messages=[{"role": "user", "content": f"Pet {seed}, please."}],
        response_format=Pet,
        seed=seed,
        max_tokens=200,
    )
    parsed = completion.choices[0].message.parsed
    assert parsed is not None and isinstance(parsed, Pet)


LONG = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 40}},
    "required": ["story"],
}


def test_too_small_cap_is_retried_then_an_explicit_422(server):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell a story"}],
            "format": LONG, "stream": False, "options": {"num_predict": 3}}  # fmt: skip
    status, headers, reply = post(server, "/api/chat", body)
    if status == 200:  # the retries' growing cap made it fit
        assert int(headers["X-Ortserve-Attempts"]) > 1
        jsonschema.validate(json.loads(reply["message"]["content"]), LONG)
    else:
        assert status == 422 and "after 3 attempts" in reply["error"]


def test_too_small_cap_streamed_signals_retries(server):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell a story"}],
            "format": LONG, "options": {"num_predict": 3}}  # fmt: skip
    request = urllib.request.Request(server.url + "/api/chat", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        objects = [json.loads(line) for line in response.read().splitlines()]
    assert any("retry" in o for o in objects)
    last = objects[-1]
    assert "error" in last or last["attempts"] > 1


def test_openai_too_small_cap_is_422_invalid_output(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": LONG}}
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Story"}],
            "response_format": fmt, "max_tokens": 1}  # fmt: skip
    status, headers, reply = post(server, "/v1/chat/completions", body)
    if status == 200:
        assert int(headers["X-Ortserve-Attempts"]) > 1
    else:
        assert status == 422 and reply["error"]["type"] == "invalid_output"


def test_invalid_schema_is_400_naming_the_problem(server):
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": 3}}}
    status, _, reply = post(server, "/api/generate", {"model": "tiny-llama", "prompt": "x",
                                                       "format": bad})  # fmt: skip
    assert status == 400 and "format is not a valid JSON Schema" in reply["error"]
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"not": {}}}}
    status, _, reply = post(server, "/v1/chat/completions", {
        "model": "tiny-chat", "messages": [{"role": "user", "content": "x"}],
        "response_format": fmt})  # fmt: skip
    assert status == 400 and reply["error"]["param"] == "response_format.json_schema.schema"
    assert "'not'" in reply["error"]["message"]


FIXED = {  # one possible answer: its token count is bounded, so a growing cap must fit it
    "type": "object",
    "properties": {"word": {"const": "abcdefghijklmnop"}},
    "required": ["word"],
    "additionalProperties": False,
}


def _failed_caps(attempts: int, cap: int) -> int:
    """Tokens of the attempts before the last: each ran to its cap, doubling each time."""
    return sum(cap * 2**k for k in range(attempts - 1))


def test_usage_counts_every_attempt(make_server):
    running = make_server(ORTSERVE_FORMAT_RETRIES="5")
    ask = [{"role": "user", "content": "A word"}]
    chat = {"model": "tiny-chat", "messages": ask, "stream": False}
    _, _, plain = post(running, "/api/chat", {**chat, "options": {"num_predict": 1}})
    status, headers, reply = post(running, "/api/chat", {**chat, "format": FIXED,
                                                         "options": {"num_predict": 4}})  # fmt: skip
    assert status == 200, reply
    attempts = int(headers["X-Ortserve-Attempts"])
    assert reply["attempts"] == attempts > 1 and json.loads(reply["message"]["content"]) == {
        "word": "abcdefghijklmnop"
    }
    assert reply["prompt_eval_count"] == attempts * plain["prompt_eval_count"]
    failed = _failed_caps(attempts, 4)
    assert failed < reply["eval_count"] <= failed + 4 * 2 ** (attempts - 1)

    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": FIXED}}
    body = {"model": "tiny-chat", "messages": ask, "max_tokens": 4}
    _, _, one = post(running, "/v1/chat/completions", {**body, "max_tokens": 1})
    status, headers, reply = post(running, "/v1/chat/completions",
                                  {**body, "response_format": fmt})  # fmt: skip
    assert status == 200, reply
    attempts, usage = int(headers["X-Ortserve-Attempts"]), reply["usage"]
    assert attempts > 1 and usage["prompt_tokens"] == attempts * one["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] > _failed_caps(attempts, 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
