"""The official `google-genai` client, unchanged, against `ortserve serve` (real models, port).

The SDK is pointed at the server with its base-URL option. The tiny models have random
weights: these tests check structure, never what the text says.
"""

from __future__ import annotations

import jsonschema
import pytest
from google import genai
from google.genai import errors, types

pytestmark = pytest.mark.slow

GREEDY = types.GenerateContentConfig(system_instruction="Be brief.", temperature=0,
                                     max_output_tokens=12)  # fmt: skip
TIME = types.FunctionDeclaration(
    name="get_time",
    description="The time in a timezone.",
    parameters=types.Schema(type="OBJECT", required=["tz"], properties={
        "tz": types.Schema(type="STRING", enum=["UTC", "CET"])}),
)  # fmt: skip
TIME_SCHEMA = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
               "required": ["tz"]}  # fmt: skip


def sdk(server, key: str = "unused", version: str = "v1beta") -> genai.Client:
    options = types.HttpOptions(base_url=server.url, api_version=version)
    return genai.Client(api_key=key, http_options=options)


@pytest.fixture
def client(server):
    return sdk(server)


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_generate_and_stream_agree(server, version):
    client = sdk(server, version=version)
    whole = client.models.generate_content(model="tiny-chat", contents="Hi!", config=GREEDY)
    assert isinstance(whole.text, str) and whole.text
    (candidate,) = whole.candidates
    assert candidate.finish_reason in (types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
    usage = whole.usage_metadata
    assert usage.prompt_token_count > 5 and 0 < usage.candidates_token_count <= 12
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    chunks = list(client.models.generate_content_stream(model="tiny-chat", contents="Hi!",
                                                        config=GREEDY))  # fmt: skip
    assert len(chunks) > 1
    assert "".join(c.text or "" for c in chunks) == whole.text
    assert chunks[-1].candidates[0].finish_reason == candidate.finish_reason
    assert chunks[-1].usage_metadata.prompt_token_count == usage.prompt_token_count


def test_count_tokens_is_the_prompt_the_model_reads(client):
    counted = client.models.count_tokens(model="tiny-chat", contents="Hi!")
    plain = types.GenerateContentConfig(temperature=0, max_output_tokens=2)
    created = client.models.generate_content(model="tiny-chat", contents="Hi!", config=plain)
    assert counted.total_tokens == created.usage_metadata.prompt_token_count


def test_tool_round_trip(client):
    forced = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
        mode="ANY", allowed_function_names=["get_time"]))  # fmt: skip
    config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[TIME])],
                                         tool_config=forced, temperature=0,
                                         max_output_tokens=256)  # fmt: skip
    ask = types.Content(role="user", parts=[types.Part.from_text(text="Time in UTC?")])
    first = client.models.generate_content(model="tiny-chat", contents=[ask], config=config)
    (call,) = first.function_calls
    assert call.name == "get_time"
    jsonschema.validate(call.args, TIME_SCHEMA)
    answer = types.Part.from_function_response(name="get_time", response={"time": "12:00"})
    contents = [ask, first.candidates[0].content, types.Content(role="user", parts=[answer])]
    config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[TIME])],
                                         temperature=0, max_output_tokens=12)  # fmt: skip
    second = client.models.generate_content(model="tiny-chat", contents=contents, config=config)
    assert second.usage_metadata.prompt_token_count > first.usage_metadata.prompt_token_count
    assert second.candidates[0].content.parts


@pytest.mark.parametrize("field", ["response_json_schema", "response_schema"])
def test_json_schema_answers_validate(client, field):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    given = schema if field == "response_json_schema" else types.Schema(
        type="OBJECT", properties={"ok": types.Schema(type="BOOLEAN")}, required=["ok"])  # fmt: skip
    config = types.GenerateContentConfig(response_mime_type="application/json", temperature=0,
                                         **{field: given})  # fmt: skip
    reply = client.models.generate_content(model="tiny-chat", contents="Is it ok?",
                                           config=config)  # fmt: skip
    jsonschema.validate(reply.parsed, {k: v for k, v in schema.items()
                                       if k != "additionalProperties"})  # fmt: skip


def test_embeddings(client):
    reply = client.models.embed_content(model="all-minilm", contents=["one", "two"])
    assert [len(e.values) for e in reply.embeddings] == [384, 384]


def test_models_are_listed(client):
    names = [m.name for m in client.models.list()]
    assert "models/tiny-chat:latest" in names
    assert client.models.get(model="tiny-chat").name == "models/tiny-chat:latest"


def test_errors_are_the_sdks_exceptions(client):
    with pytest.raises(errors.ClientError) as missing:
        client.models.generate_content(model="no-such-model", contents="Hi")
    assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"
    hot = types.GenerateContentConfig(temperature=3)
    with pytest.raises(errors.ClientError) as bad:
        client.models.generate_content(model="tiny-chat", contents="Hi", config=hot)
    assert bad.value.code == 400 and "temperature" in bad.value.message


def test_goog_api_key(make_server):
    key = "sk-local-0123456789abcdef"
    server = make_server(ORTSERVE_API_KEYS=f"gemini:{key}")
    client, wrong = sdk(server, key), sdk(server, "wrong")  # held: a dropped client closes
    reply = client.models.generate_content(model="tiny-chat", contents="Hi", config=GREEDY)
    assert reply.text is not None
    with pytest.raises(errors.ClientError) as refused:
        wrong.models.generate_content(model="tiny-chat", contents="Hi")
    assert refused.value.code == 401
