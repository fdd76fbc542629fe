"""Ollama's native API over HTTP plumbing: Flask's test client, a real library, a fake engine.

The engine is faked (allowed for HTTP plumbing); prompts and options go through the real
prompt builder and option resolver. tests/integration/ runs real models behind real servers.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder

from ortserve import __version__
from ortserve.api import create_app, init_app
from ortserve.config import Settings
from ortserve.errors import InvalidRequest, ModelNotFound, OrtServeError
from tests.support.fakes import TEMPLATE, FakeRuntime, FakeTurn, add_model
from tests.support.http import lines

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
FINAL_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture
def runtime(library):
    add_model(library, "tiny")
    add_model(library, "minilm", capabilities=["embedding"], template=None)
    return FakeRuntime(library)


# ---- simple routes ----------------------------------------------------------------------------


def test_root_and_version(client):
    root = client.get("/")
    assert root.status_code == 200
    assert root.get_data(as_text=True) == "ortserve is running"
    assert client.head("/").status_code == 200
    assert client.get("/api/version").get_json() == {"version": __version__}
    assert client.head("/api/version").status_code == 200


def test_tags_lists_every_model_in_ollamas_shape(client, library):
    response = client.get("/api/tags")
    assert response.mimetype == "application/json"
    models = {m["name"]: m for m in response.get_json()["models"]}
    assert set(models) == {"tiny:latest", "minilm:latest"}
    tiny = models["tiny:latest"]
    info = library.get("tiny")
    assert tiny["model"] == "tiny:latest"
    assert tiny["digest"] == info.digest.removeprefix("sha256-") and len(tiny["digest"]) == 64
    assert tiny["size"] == info.size > 0
    assert RFC3339.match(tiny["modified_at"])
    assert tiny["details"] == {
        "parent_model": "",
        "format": "onnx-genai",
        "family": "qwen2",
        "families": ["qwen2"],
        "parameter_size": "1.23K",
        "quantization_level": "int4",
        "context_length": 64,
        "embedding_length": 32,
    }
    assert tiny["capabilities"] == ["completion"]
    assert models["minilm:latest"]["capabilities"] == ["embedding"]
    assert client.head("/api/tags").status_code == 200


def test_show(client, library):
    body = client.post("/api/show", json={"model": "tiny", "verbose": True}).get_json()
    assert body["license"] == "MIT License\nCopyright"
    assert f"FROM {library.get('tiny').path}" in body["modelfile"]
    assert body["parameters"] == (
        f'{"stop":<30} "<end>"\n{"stop":<30} "<eot>"\n{"temperature":<30} 0.5'
    )
    assert body["template"] == TEMPLATE.source
    assert "system" not in body  # empty fields are left out, as Ollama's omitempty does
    assert body["details"]["quantization_level"] == "int4"
    assert body["model_info"] == {
        "general.architecture": "qwen2",
        "general.parameter_count": 1234,
        "qwen2.context_length": 64,
        "qwen2.embedding_length": 32,
        "general.format": "onnx-genai",
        "general.parameter_size": "1.23K",
        "general.quantization": "int4",
    }
    assert body["capabilities"] == ["completion"]
    assert RFC3339.match(body["modified_at"])
    assert (body["provider"], body["loaded"]) == (None, False)  # no genai_config to plan from


def test_show_names_the_provider_a_loaded_model_runs_on(client, runtime):
    runtime.resident.add("tiny:latest")
    body = client.post("/api/show", json={"model": "tiny"}).get_json()
    assert (body["provider"], body["loaded"]) == ("webgpu", True)


def test_show_accepts_the_older_name_field_and_404s(client):
    assert client.post("/api/show", json={"name": "tiny"}).status_code == 200
    missing = client.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404
    assert missing.get_json() == {"error": 'model "nope:latest" not found, try pulling it first'}


def test_ps_shapes_the_runtimes_loaded_models(client, library):
    info = library.get("tiny")
    (entry,) = client.get("/api/ps").get_json()["models"]
    assert entry["name"] == entry["model"] == "tiny:latest"
    assert entry["digest"] == info.digest.removeprefix("sha256-") and entry["size"] == info.size
    assert entry["expires_at"] == "2017-07-14T02:40:00Z"
    assert (entry["provider"], entry["size_vram"], entry["pending"]) == ("cpu", 0, 2)
    assert entry["context_length"] == 64 and entry["details"]["family"] == "qwen2"


def test_ps_does_not_start_a_runtime(library):
    app = create_app(Settings(models=library.root))
    assert app.test_client().get("/api/ps").get_json() == {"models": []}
    assert app.extensions["ortserve"].started_runtime is None


def test_copy_and_delete(client, runtime, library):
    copied = client.post("/api/copy", json={"source": "tiny", "destination": "team/alias:v1"})
    assert copied.status_code == 200 and copied.get_data() == b""
    assert library.get("team/alias:v1").digest == library.get("tiny").digest

    deleted = client.delete("/api/delete", json={"model": "team/alias:v1"})
    assert deleted.status_code == 200 and deleted.get_data() == b""
    assert runtime.unloaded == ["team/alias:v1"]
    assert not library.exists("team/alias:v1")
    assert library.exists("tiny")  # the shared bundle stays for the other name

    again = client.delete("/api/delete", json={"model": "team/alias:v1"})
    assert again.status_code == 404
    assert "not found, try pulling it first" in again.get_json()["error"]


def test_copy_errors(client):
    missing = client.post("/api/copy", json={"source": "nope", "destination": "x"})
    assert missing.status_code == 404
    bad = client.post("/api/copy", json={"source": "tiny", "destination": "../escape"})
    assert bad.status_code == 400
    assert "invalid model name" in bad.get_json()["error"]
    incomplete = client.post("/api/copy", json={"source": "tiny"})
    assert incomplete.status_code == 400
    assert incomplete.get_json() == {"error": "destination is required"}


# ---- generate and chat --------------------------------------------------------------------------


def test_generate_streams_ndjson(client, runtime):
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "Hi"})
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    objects = lines(response)
    assert [o["response"] for o in objects] == ["Hel", "lo", " world", ""]
    for chunk in objects[:-1]:
        assert chunk["model"] == "tiny" and chunk["done"] is False
        assert RFC3339.match(chunk["created_at"])
        assert set(chunk) == {"model", "created_at", "response", "done"}
    final = objects[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert all(isinstance(final[f], int) for f in FINAL_FIELDS)
    assert final["load_duration"] == 777
    assert final["prompt_eval_duration"] == 1500 and final["eval_duration"] == 2500
    assert final["eval_count"] == 3
    prompt = "<user>Hi<assistant>"  # the real prompt builder, with the model's template
    assert final["prompt_eval_count"] == len(prompt)
    assert runtime.generated[0][0] == [ord(c) for c in prompt]
    assert final["total_duration"] >= final["load_duration"]
    assert "context" not in final
    assert runtime.released == [("tiny:latest", None)]


def test_generate_stream_false_is_one_object(client, runtime):
    runtime.next_turn = FakeTurn(["a", "b"], reason="length")
    response = client.post(
        "/api/generate",
        json={"model": "tiny", "prompt": "Hi", "stream": False, "keep_alive": "10m"},
    )
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["response"] == "ab" and body["done"] is True and body["done_reason"] == "length"
    assert all(f in body for f in FINAL_FIELDS)
    assert runtime.acquired == [("tiny:latest", 600.0)]
    assert runtime.released == [("tiny:latest", 600.0)]


def test_generate_system_raw_and_options(client, runtime):
    client.post(
        "/api/generate",
        json={"model": "tiny", "prompt": "Hi", "system": "Be brief", "stream": False,
              "options": {"temperature": 0, "num_predict": 5, "stop": ["x"]}},
    )  # fmt: skip
    tokens, options = runtime.generated[-1]
    assert "".join(map(chr, tokens)) == "<system>Be brief<user>Hi<assistant>"
    assert (options.temperature, options.num_predict, options.stop) == (0.0, 5, ("x",))

    client.post("/api/generate", json={"model": "tiny", "prompt": "As is", "raw": True})
    tokens, options = runtime.generated[-1]
    assert "".join(map(chr, tokens)) == "As is"
    assert options.temperature == 0.5  # the model's own parameter
    assert options.stop == ("<end>", "<eot>")


def test_chat_streams_messages(client, runtime):
    messages = [{"role": "system", "content": "S"}, {"role": "User", "content": "Hi"}]
    response = client.post("/api/chat", json={"model": "tiny", "messages": messages})
    objects = lines(response)
    assert [o["message"] for o in objects[:-1]] == [
        {"role": "assistant", "content": t} for t in ("Hel", "lo", " world")
    ]
    final = objects[-1]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done"] is True and final["done_reason"] == "stop"
    assert all(f in final for f in FINAL_FIELDS) and "response" not in final
    assert "".join(map(chr, runtime.generated[0][0])) == "<system>S<user>Hi<assistant>"


def test_chat_stream_false_and_model_system_prompt(client, runtime, library):
    library.update("tiny", system="You are terse.")
    body = client.post(
        "/api/chat",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
    ).get_json()
    assert body["message"] == {"role": "assistant", "content": "Hello world"}
    assert body["done_reason"] == "stop"
    assert "".join(map(chr, runtime.generated[0][0])) == (
        "<system>You are terse.<user>Hi<assistant>"
    )


@pytest.mark.parametrize("route, empty", [("/api/generate", {"prompt": ""}), ("/api/chat", {})])
def test_empty_prompt_loads_and_keep_alive_0_unloads(client, runtime, route, empty):
    loaded = client.post(route, json={"model": "tiny", **empty})
    body = loaded.get_json()
    assert loaded.mimetype == "application/json"
    assert body["done"] is True and body["done_reason"] == "load"
    assert body["model"] == "tiny" and RFC3339.match(body["created_at"])
    if route == "/api/chat":
        assert body["message"] == {"role": "assistant", "content": ""}
    else:
        assert body["response"] == ""
    assert runtime.acquired == [("tiny:latest", None)] and runtime.released == runtime.acquired
    assert runtime.generated == []

    unloaded = client.post(route, json={"model": "tiny", "keep_alive": 0, **empty}).get_json()
    assert unloaded["done_reason"] == "unload"
    assert runtime.unloaded == ["tiny:latest"]
    assert len(runtime.acquired) == 1  # unloading does not load it first


def test_unload_of_an_unknown_model_is_404(client):
    response = client.post("/api/generate", json={"model": "nope", "keep_alive": "0s"})
    assert response.status_code == 404


def test_keep_alive_forms(client, runtime):
    for value, seconds in (("5m", 300.0), (30, 30.0), ("-1", -1.0), ("1h30m", 5400.0)):
        client.post("/api/generate", json={"model": "tiny", "keep_alive": value})
        assert runtime.acquired[-1] == ("tiny:latest", seconds)
    bad = client.post("/api/generate", json={"model": "tiny", "keep_alive": "soon"})
    assert bad.status_code == 400
    assert bad.get_json()["error"].startswith("keep_alive: invalid duration")
    wrong_type = client.post("/api/generate", json={"model": "tiny", "keep_alive": [1]})
    assert wrong_type.status_code == 400 and "keep_alive" in wrong_type.get_json()["error"]


# ---- errors ----------------------------------------------------------------------------------------


def test_unknown_model_is_404_with_ollamas_message(client):
    for route in ("/api/generate", "/api/chat"):
        response = client.post(route, json={"model": "nope", "prompt": "x",
                                            "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        assert response.status_code == 404
        assert response.get_json() == {
            "error": 'model "nope:latest" not found, try pulling it first'
        }


def test_malformed_json_and_missing_body(client):
    for data in ("{", "[1, 2]", "NaN", '{"model": NaN}'):
        response = client.post("/api/generate", data=data, content_type="application/json")
        assert response.status_code == 400, data
        assert "error" in response.get_json()
    assert client.post("/api/generate", data="{").get_json() == {"error": "invalid JSON body"}
    assert client.post("/api/chat", data="").get_json() == {"error": "missing request body"}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "x"}, "model is required"),
        ({"model": 5}, "model: 5 is not of type 'string'"),
        ({"model": "tiny", "stream": "yes"}, "stream: 'yes' is not of type 'boolean'"),
        (
            {"model": "tiny", "options": {"temperature": "hot"}},
            "options.temperature: 'hot' is not of type 'number'",
        ),
        ({"model": "tiny", "options": {"top_p": 2}}, "options.top_p: 2 is greater than"),
        ({"model": "tiny", "messages": "hi"}, "messages: 'hi' is not of type 'array'"),
        (
            {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role: 'robot' is not one of ['system', 'user', 'assistant', 'tool']",
        ),
        ({"model": "tiny", "messages": [{"content": "x"}]}, "messages[0].role is required"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
            "messages[0].content: 3 is not of type 'string'",
        ),
    ],
)
def test_schema_errors_name_the_field(client, body, message):
    route = "/api/chat" if "messages" in body else "/api/generate"
    response = client.post(route, json=body)
    assert response.status_code == 400
    assert response.get_json()["error"].startswith(message)


def test_unknown_options_are_ignored_and_nulls_mean_not_given(client, runtime):
    options = {"temperatur": 1, "mirostat": None, "num_ctx": None, "stop": None, "top_k": 7}
    response = client.post(
        "/api/generate", json={"model": "tiny", "prompt": "x", "stream": False, "options": options}
    )
    assert response.status_code == 200, response.get_json()
    sent = runtime.generated[-1][1]
    assert sent.top_k == 7 and sent.stop == ("<end>", "<eot>")  # null stop: the model's own


@pytest.mark.parametrize("think", [True, "high"])
@pytest.mark.parametrize("route", ["/api/generate", "/api/chat"])
def test_think_on_a_model_without_a_thinking_section_is_400(client, runtime, route, think):
    body = {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    response = client.post(route, json={**body, "think": think})
    assert response.status_code == 400
    assert response.get_json() == {
        "error": '"tiny:latest" does not support thinking: its chat template has no thinking section'
    }
    assert runtime.generated == []


@pytest.mark.parametrize(
    "route, extra, field",
    [
        ("/api/generate", {"suffix": "end"}, "suffix"),
        ("/api/generate", {"template": "{{ .Prompt }}"}, "template"),
        ("/api/generate", {"context": [1, 2]}, "context"),
    ],
)
def test_later_features_are_refused_not_ignored(client, runtime, route, extra, field):
    body = {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    response = client.post(route, json={**body, **extra})
    assert response.status_code == 400
    assert response.get_json() == {"error": f'"{field}" is not supported yet'}
    assert runtime.acquired == []


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "function"}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
    ],
)
def test_malformed_tools_are_400(client, runtime, extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    response = client.post("/api/chat", json={**body, **extra})
    assert response.status_code == 400
    assert "tool" in response.get_json()["error"]


def test_empty_or_false_later_fields_are_fine(client, runtime):
    body = {"model": "tiny", "prompt": "x", "stream": False, "format": "", "images": [],
            "think": False, "context": [], "suffix": "", "tools": None, "logprobs": False}  # fmt: skip
    assert client.post("/api/generate", json=body).status_code == 200


def test_raw_with_system_is_refused(client):
    response = client.post(
        "/api/generate", json={"model": "tiny", "prompt": "x", "raw": True, "system": "s"}
    )
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "raw mode does not support template, system, or context"
    }


def test_a_model_without_completion_cannot_generate_or_chat(client, runtime):
    for route, kind in (("/api/generate", "generate"), ("/api/chat", "chat")):
        response = client.post(route, json={"model": "minilm", "prompt": "x",
                                            "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        assert response.status_code == 400
        assert response.get_json() == {"error": f'"minilm:latest" does not support {kind}'}
    assert runtime.acquired == []


def test_busy_server_is_503_and_releases_the_model(client, runtime):
    runtime.busy = True
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x"})
    assert response.status_code == 503
    assert response.get_json() == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }
    assert runtime.released == [("tiny:latest", None)]


def test_prompt_longer_than_the_context_is_400(client, runtime):
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x" * 100})
    assert response.status_code == 400
    assert "prompt" in response.get_json()["error"]
    assert runtime.released == [("tiny:latest", None)]


def test_error_before_any_output_keeps_its_status(client, runtime):
    runtime.next_turn = FakeTurn([], error=InvalidRequest("bad turn"))
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x"})
    assert response.status_code == 400
    assert response.get_json() == {"error": "bad turn"}
    assert runtime.released == [("tiny:latest", None)]


def test_mid_stream_error_is_the_last_line(client, runtime):
    runtime.next_turn = FakeTurn(["a", "b"], error=OrtServeError("engine failed"), error_after=1)
    response = client.post("/api/chat", json={"model": "tiny", "messages": [
        {"role": "user", "content": "x"}]})  # fmt: skip
    assert response.status_code == 200
    objects = lines(response)
    assert objects[0]["message"]["content"] == "a"
    assert objects[-1] == {"error": "engine failed"}
    assert runtime.released == [("tiny:latest", None)]
    assert runtime.turns[0].cancelled == 1


def test_mid_stream_bug_is_internal_error_without_details(client, runtime):
    runtime.next_turn = FakeTurn(["a"], error=KeyError("secret detail"), error_after=1)
    objects = lines(client.post("/api/generate", json={"model": "tiny", "prompt": "x"}))
    assert objects[-1] == {"error": "internal error"}


def test_stream_false_error_is_a_status(client, runtime):
    runtime.next_turn = FakeTurn(["a"], error=OrtServeError("engine failed"), error_after=1)
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x", "stream": False})
    assert response.status_code == 500
    assert response.get_json() == {"error": "engine failed"}


def test_cancelled_turn_is_reported(client, runtime):
    runtime.next_turn = FakeTurn(["a"], reason="cancelled")
    objects = lines(client.post("/api/generate", json={"model": "tiny", "prompt": "x"}))
    assert "cancelled" in objects[-1]["error"]
    runtime.next_turn = FakeTurn(["a"], reason="cancelled")
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x", "stream": False})
    assert response.status_code == 503


def test_client_leaving_mid_stream_cancels_the_turn(client, runtime):
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x"}, buffered=False)
    chunks = iter(response.response)
    first = json.loads(next(chunks))
    assert first["response"] == "Hel"
    response.close()  # what the WSGI server does when the client goes away
    assert runtime.turns[0].cancelled == 1
    assert runtime.released == [("tiny:latest", None)]


def test_client_leaving_before_the_stream_starts_still_releases(app, runtime):
    # Straight through WSGI: the test client would read the first chunk before returning.
    environ = EnvironBuilder(
        method="POST", path="/api/generate", json={"model": "tiny", "prompt": "x"}
    ).get_environ()
    statuses = []
    body = app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"]
    body.close()  # the server closes the response without sending any of it
    assert runtime.turns[0].cancelled == 1
    assert runtime.released == [("tiny:latest", None)]


def test_finished_stream_is_not_cancelled(client, runtime):
    lines(client.post("/api/generate", json={"model": "tiny", "prompt": "x"}))
    assert runtime.turns[0].cancelled == 0
    assert runtime.released == [("tiny:latest", None)]


def test_oversized_body_is_413(client):
    body = b'{"model": "tiny", "prompt": "' + b"x" * (32 * 1024 * 1024) + b'"}'
    response = client.post("/api/generate", data=body, content_type="application/json")
    assert response.status_code == 413
    assert "too large" in response.get_json()["error"]


def test_wrong_method_and_unknown_path(client):
    wrong = client.get("/api/chat")
    assert wrong.status_code == 405
    assert "POST" in wrong.headers["Allow"]
    assert "method not allowed" in wrong.get_json()["error"]
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": "404 page not found"}


def test_openai_paths_get_openais_error_shape(client):
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.get_json() == {
        "error": {"message": "404 page not found", "type": "not_found_error", "param": None,
                  "code": None}
    }  # fmt: skip


def test_unexpected_exception_is_500_without_details(client, runtime, monkeypatch, caplog):
    def broken(name, keep_alive=None):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(runtime, "acquire", broken)
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x"})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}
    assert "secret detail" in caplog.text  # logged with its traceback, not sent


def test_library_errors_keep_their_status(client, runtime, monkeypatch):
    def missing(name, keep_alive=None):
        raise ModelNotFound("tiny:latest")  # removed between the check and the load

    monkeypatch.setattr(runtime, "acquire", missing)
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x"})
    assert response.status_code == 404


# ---- ops ---------------------------------------------------------------------------------------


def test_health_and_readiness(client, library, runtime, tmp_path):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}
    runtime.library = type(library)(tmp_path / "absent")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "not ready"


# ---- mounting into another Flask app -----------------------------------------------------------------


def test_init_app_mounts_into_an_existing_app(library, runtime):
    host = Flask("host")

    @host.get("/hello")
    def hello():
        return "host says hi"

    @host.get("/boom")
    def boom():
        raise ValueError("host bug")

    init_app(host, settings=Settings(models=library.root), runtime=runtime, url_prefix="/ollama")
    client = host.test_client()
    assert client.get("/hello").get_data(as_text=True) == "host says hi"
    assert client.get("/ollama/api/version").get_json() == {"version": __version__}
    assert client.get("/ollama/").get_data(as_text=True) == "ortserve is running"
    assert len(lines(client.post("/ollama/api/generate", json={"model": "tiny", "prompt": "x"})))
    # ortserve's errors are JSON; the host's own keep the host's handling
    assert client.get("/ollama/api/nope").get_json() == {"error": "404 page not found"}
    assert client.post("/ollama/api/show", json={"model": "nope"}).status_code == 404
    not_found = client.get("/elsewhere")
    assert not_found.status_code == 404 and not_found.mimetype == "text/html"
    crashed = client.get("/boom")
    assert crashed.status_code == 500 and crashed.mimetype == "text/html"


def test_blueprint_works_with_a_runtime_placed_in_extensions(library, runtime):
    from ortserve.api.native import native_bp

    host = Flask("host")
    host.register_blueprint(native_bp)
    host.extensions["ortserve"] = runtime
    names = [m["name"] for m in host.test_client().get("/api/tags").get_json()["models"]]
    assert sorted(names) == ["minilm:latest", "tiny:latest"]


# ---- structured output (format) ------------------------------------------------------------

NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_format_schema_sets_guidance_and_answers_valid_json(client, runtime):
    runtime.next_turn = FakeTurn(['{"name"', ':"x"}'])
    body = {"model": "tiny", "prompt": "x", "stream": False, "format": NAME_SCHEMA}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200
    assert json.loads(response.get_json()["response"]) == {"name": "x"}
    assert response.headers["X-Ortserve-Attempts"] == "1"
    assert response.get_json()["attempts"] == 1
    options = runtime.generated[0][1]
    assert options.guidance.kind == "json_schema" and options.num_predict > 0


def test_format_json_is_any_object(client, runtime):
    runtime.next_turn = FakeTurn(['{"a":[1]}'])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False,
            "format": "json"}  # fmt: skip
    response = client.post("/api/chat", json=body)
    assert json.loads(response.get_json()["message"]["content"]) == {"a": [1]}


@pytest.mark.parametrize("fmt", ["yaml", 3, ["json"]])
def test_bad_format_is_400(client, runtime, fmt):
    body = {"model": "tiny", "prompt": "x", "format": fmt}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 400
    assert response.get_json() == {
        "error": 'invalid format: expected "json" or a JSON Schema object'
    }
    assert runtime.acquired == []


def test_invalid_schema_is_400_naming_the_problem(client, runtime):
    body = {"model": "tiny", "prompt": "x", "format": {"type": "object", "not": {}}}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 400
    assert "'not'" in response.get_json()["error"]


def test_failed_attempt_is_retried_and_streamed_retry_is_signalled(client, runtime):
    runtime.script = [(['{"name":'], "length"), (['{"name":"y"}'],)]
    body = {"model": "tiny", "prompt": "x", "format": NAME_SCHEMA}
    objects = lines(client.post("/api/generate", json=body))
    retry = [o for o in objects if "retry" in o]
    assert len(retry) == 1 and retry[0]["retry"]["attempt"] == 2 and retry[0]["done"] is False
    after = objects[objects.index(retry[0]) + 1 :]
    assert json.loads("".join(o["response"] for o in after)) == {"name": "y"}
    assert objects[-1]["done"] is True and objects[-1]["attempts"] == 2
    assert runtime.generated[1][1].seed is not None  # a new seed for the retry


def test_every_attempt_failing_is_422(client, runtime):
    runtime.script = [(["nope"],)] * 3
    body = {"model": "tiny", "prompt": "x", "stream": False, "format": NAME_SCHEMA}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 422
    assert "after 3 attempts" in response.get_json()["error"]
    assert runtime.released


def test_every_attempt_failing_mid_stream_is_an_error_line(client, runtime):
    runtime.script = [(["nope"],)] * 3
    objects = lines(client.post("/api/generate", json={"model": "tiny", "prompt": "x",
                                                         "format": NAME_SCHEMA}))  # fmt: skip
    assert "after 3 attempts" in objects[-1]["error"]
    assert sum("retry" in o for o in objects) == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"model": "tiny", "prompt": ' + "[" * 990 + "]" * 990 + "}", "JSON nested deeper than 64"),
        ('{"model": "tiny", "prompt": ' + "[" * 100 + "]" * 100 + "}", "JSON nested deeper than 64"),
        ('{"model": "tiny", "prompt": "hi\\ud800"}', "prompt: text holds a lone UTF-16 surrogate"),
        ('{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages[0].content: text holds a lone UTF-16 surrogate"),
    ],
)  # fmt: skip
def test_deep_json_and_lone_surrogates_are_400_not_500(client, raw, message):
    for route in ("/api/generate", "/api/chat", "/api/create", "/api/embed"):
        response = client.post(route, data=raw, content_type="application/json")
        assert response.status_code == 400, (route, response.get_json())
        assert response.get_json()["error"].startswith(message), route


# ---- issue 20: hostile keep_alive, messages on generate, durations, stops and thinking ----------


@pytest.mark.parametrize("keep_alive", ["1e300", "1e400", '"9999999999999h"', "9.3e9"])
def test_a_keep_alive_too_long_to_be_a_date_is_forever(client, runtime, keep_alive):
    raw = f'{{"model": "tiny", "prompt": "x", "stream": false, "keep_alive": {keep_alive}}}'
    response = client.post("/api/generate", data=raw, content_type="application/json")
    assert response.status_code == 200
    assert runtime.acquired[-1] == ("tiny:latest", -1.0)  # forever, as a negative keep_alive


def test_ps_survives_an_expiry_past_any_date(client, runtime):
    """One model's expiry (a keep_alive of 1e300 before the fix) must not fail the listing."""
    listed = runtime.loaded_models

    def far_future():
        (loaded,) = listed()
        loaded.expires_at = 1e300
        return [loaded]

    runtime.loaded_models = far_future
    response = client.get("/api/ps")
    assert response.status_code == 200
    assert response.get_json()["models"][0]["expires_at"] == "2318-01-01T00:00:00Z"


@pytest.mark.parametrize("messages", [[None], [5], ["x"]])
def test_generate_ignores_messages_of_any_shape(client, runtime, messages):
    """Generate has no messages field (Ollama ignores it): [null] was a 500 (AttributeError)."""
    response = client.post("/api/generate", json={"model": "tiny", "prompt": "x",
                                                    "stream": False, "messages": messages})  # fmt: skip
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["response"] == "Hello world"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["/api/generate", "/api/chat"])
def test_total_duration_includes_the_load(client, runtime, monkeypatch, route, stream):
    """Ollama's total_duration counts the load; it was measured from after the load."""
    load_ns = 50_000_000
    acquire = runtime.acquire

    def slow_acquire(name, keep_alive=None):
        time.sleep(load_ns / 1e9)  # the load, as a real first request waits for it
        loaded = acquire(name, keep_alive)
        loaded.load_duration_ns = load_ns
        return loaded

    monkeypatch.setattr(runtime, "acquire", slow_acquire)
    body = {"model": "tiny", "stream": stream, "prompt": "x",
            "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
    response = client.post(route, json=body)
    final = lines(response)[-1] if stream else response.get_json()
    assert final["load_duration"] == load_ns
    assert final["total_duration"] >= load_ns + final["eval_duration"]


THINKING_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and "
    "not enable_thinking %}<think></think>{% endif %}{% endif %}"
)


@pytest.mark.parametrize("stream", [False, True])
def test_stops_apply_to_the_answer_not_the_thinking(client, runtime, library, stream):
    """stop=["Paris"] on a model that thinks about Paris first gave an empty answer."""
    add_model(library, "thinker", capabilities=["completion", "thinking"],
              template=THINKING_TEMPLATE)  # fmt: skip
    runtime.script = [(["<think>The capital is Par", "is, I know.</think>", "It is Pa",
                        "ris.", " More"],)]  # fmt: skip
    body = {"model": "thinker", "stream": stream, "think": True, "options": {"stop": ["Paris"]},
            "messages": [{"role": "user", "content": "capital of France?"}]}  # fmt: skip
    response = client.post("/api/chat", json=body)
    objects = lines(response) if stream else [response.get_json()]
    assert "".join(o["message"]["content"] for o in objects) == "It is "
    assert "".join(o["message"].get("thinking", "") for o in objects) == (
        "The capital is Paris, I know."
    )
    assert objects[-1]["done_reason"] == "stop"
    assert runtime.generated[-1][1].stop == ()  # the engine does not cut the thinking
    assert runtime.turns[-1].cancelled  # generation ends at the stop all the same
