"""Google's Gemini API over HTTP plumbing: Flask's test client, a real library, a fake engine.

Prompts, options, tool grammars and retries are the real ones; the engine is faked (plumbing
only). tests/integration/test_gemini_server.py runs real models under the google-genai SDK.
"""

from __future__ import annotations

import json

import pytest

from ortserve.config import Settings
from ortserve.errors import OrtServeError
from tests.support.fakes import RoomyToolRuntime, add_model
from tests.support.tools import CALL

GEN = "/v1beta/models/tiny:generateContent"
ASK = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
TIME = {"name": "get_time", "description": "The time in a time zone",
        "parameters": {"type": "OBJECT", "properties": {"tz": {"type": "STRING"}},
                       "required": ["tz"]}}  # fmt: skip


@pytest.fixture
def runtime(library):
    add_model(library, "tiny", capabilities=["completion", "tools"])
    return RoomyToolRuntime(library)


def prompt_of(runtime, turn: int = 0) -> str:
    return "".join(chr(t) for t in runtime.generated[turn][0])


def chunks(response) -> list[dict]:
    assert response.mimetype == "text/event-stream"
    blocks = response.get_data(as_text=True).split("\n\n")[:-1]
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


def google_error(response, status: int, name: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert (error["code"], error["status"]) == (status, name)
    return error["message"]


def test_generate_content_shape_and_usage(client, runtime):
    r = client.post(GEN, json={**ASK, "systemInstruction": {"parts": [{"text": "Be brief"}]}})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["candidates"] == [{"content": {"role": "model", "parts": [{"text": "Hello world"}]},
                                   "index": 0, "finishReason": "STOP"}]  # fmt: skip
    prompt = len(runtime.generated[0][0])
    assert body["usageMetadata"] == {"promptTokenCount": prompt, "candidatesTokenCount": 3,
                                     "totalTokenCount": prompt + 3}  # fmt: skip
    assert prompt_of(runtime) == "<system>Be brief<user>Hi<assistant>"


def test_the_method_is_after_the_last_colon_and_v1_works_too(client, runtime):
    for path in ("/v1beta/models/tiny:latest:generateContent", "/v1/models/tiny:generateContent",
                 "/v1beta/models/models/tiny:generateContent"):  # fmt: skip
        assert client.post(path, json=ASK).status_code == 200, path


def test_generation_config_becomes_options(client, runtime):
    config = {"temperature": 0.2, "topP": 0.5, "topK": 7.0, "maxOutputTokens": 9,
              "stopSequences": ["\n\n"], "seed": 3}  # fmt: skip
    assert client.post(GEN, json={**ASK, "generationConfig": config}).status_code == 200
    o = runtime.generated[0][1]
    assert (o.temperature, o.top_p, o.top_k, o.num_predict, o.stop, o.seed) == (
        0.2, 0.5, 7, 9, ("\n\n",), 3)  # fmt: skip


def test_max_tokens_is_finish_reason_max_tokens(client, runtime):
    runtime.script = [(["a", "b"], "length")]
    assert client.post(GEN, json=ASK).get_json()["candidates"][0]["finishReason"] == "MAX_TOKENS"


def test_stream_is_sse_chunks_then_finish_and_usage(client, runtime):
    r = client.post("/v1beta/models/tiny:streamGenerateContent?alt=sse", json=ASK)
    got = chunks(r)
    texts = [c["candidates"][0]["content"]["parts"][0]["text"] for c in got[:-1]]
    assert texts == ["Hel", "lo", " world"]
    assert got[-1]["candidates"][0]["finishReason"] == "STOP"
    assert got[-1]["usageMetadata"]["candidatesTokenCount"] == 3


def test_mid_stream_error_is_the_last_chunk(client, runtime):
    runtime.script = [(["Hel", "lo"], "stop", OrtServeError("engine failed"), 1)]
    got = chunks(client.post("/v1beta/models/tiny:streamGenerateContent?alt=sse", json=ASK))
    assert got[-1] == {"error": {"code": 500, "message": "engine failed", "status": "INTERNAL"}}


def test_function_call_and_response_round_trip(client, runtime):
    runtime.script = [([CALL], "stop")]
    r = client.post(GEN, json={**ASK, "tools": [{"functionDeclarations": [TIME]}]})
    assert r.status_code == 200, r.get_json()
    part = r.get_json()["candidates"][0]["content"]["parts"][0]["functionCall"]
    assert (part["name"], part["args"]) == ("get_time", {"tz": "UTC"})
    contents = [*ASK["contents"], {"role": "model", "parts": [{"functionCall": part}]},
                {"role": "user", "parts": [{"functionResponse": {
                    "name": "get_time", "response": {"time": "12:00"}}}]}]  # fmt: skip
    r = client.post(GEN, json={"contents": contents, "tools": [{"functionDeclarations": [TIME]}]})
    assert r.status_code == 200, r.get_json()
    assert '<tool>{"time": "12:00"}<assistant>' in prompt_of(runtime, 1)


def test_response_schema_guides_and_validates(client, runtime):
    runtime.script = [(['{"a": 1}'], "stop")]
    schema = {"type": "OBJECT", "properties": {"a": {"type": "INTEGER", "nullable": True}},
              "required": ["a"]}  # fmt: skip
    config = {"responseMimeType": "application/json", "responseSchema": schema}
    r = client.post(GEN, json={**ASK, "generationConfig": config})
    assert r.status_code == 200, r.get_json()
    assert json.loads(r.get_json()["candidates"][0]["content"]["parts"][0]["text"]) == {"a": 1}
    guidance = runtime.generated[0][1].guidance
    assert guidance is not None and '"null"' in str(guidance)


def test_errors_are_googles_shape_and_name_the_field(client, runtime):
    bad = {**ASK, "generationConfig": {"temperature": 3}}
    assert "temperature" in google_error(client.post(GEN, json=bad), 400, "INVALID_ARGUMENT")
    r = client.post("/v1beta/models/nope:generateContent", json=ASK)
    google_error(r, 404, "NOT_FOUND")
    part = {"inlineData": {"mimeType": "image/png", "data": "AA=="}}
    r = client.post(GEN, json={"contents": [{"role": "user", "parts": [part]}]})
    assert "inlineData" in google_error(r, 400, "INVALID_ARGUMENT")
    config = {"responseMimeType": "application/json", "responseJsonSchema": {"type": "object"}}
    r = client.post(GEN, json={**ASK, "tools": [{"functionDeclarations": [TIME]}],
                               "generationConfig": config})  # fmt: skip
    google_error(r, 400, "INVALID_ARGUMENT")
    r = client.post(GEN, json={**ASK, "generationConfig": {"responseSchema": {"type": "OBJECT"}}})
    assert "responseMimeType" in google_error(r, 400, "INVALID_ARGUMENT")
    r = client.post(GEN, json={**ASK, "tools": [{"googleSearch": {}}]})
    assert "googleSearch" in google_error(r, 400, "INVALID_ARGUMENT")
    google_error(client.post(GEN, data="{", content_type="application/json"), 400,
                 "INVALID_ARGUMENT")  # fmt: skip


def test_openais_model_route_keeps_its_own_errors(client, runtime):
    r = client.get("/v1/models/nope:latest")
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found_error"


def test_count_tokens_and_models(client, runtime):
    r = client.post("/v1beta/models/tiny:countTokens", json=ASK)
    assert r.get_json() == {"totalTokens": len("<user>Hi<assistant>")}
    names = [m["name"] for m in client.get("/v1beta/models").get_json()["models"]]
    assert names == ["models/tiny:latest"]
    assert client.get("/v1beta/models/tiny").get_json()["name"] == "models/tiny:latest"


@pytest.mark.parametrize("how", ["header", "query"])
def test_goog_api_key_is_an_api_key(library, runtime, how):
    from ortserve.api import create_app

    app = create_app(Settings(models=library.root, api_keys=(("k", "secret"),)), runtime=runtime)
    client = app.test_client()
    google_error(client.post(GEN, json=ASK), 401, "UNAUTHENTICATED")
    if how == "header":
        r = client.post(GEN, json=ASK, headers={"x-goog-api-key": "secret"})
    else:
        r = client.post(GEN + "?key=secret", json=ASK)
    assert r.status_code == 200
    # ?key= is Google's: other protocols' paths do not read keys from URLs
    assert client.get("/api/tags?key=secret").status_code == 401
