"""The Ray application's plumbing, without a cluster: the model id a request routes on, the
router's own errors in each protocol's shape, the settings replicas get (the cluster itself
runs in tests/integration/test_cluster.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve")

from ortserve.cluster.deployments import autoscaling_config, build, replica_env  # noqa: E402
from ortserve.cluster.errors import error_body, stream_error  # noqa: E402
from ortserve.cluster.routing import PROMPT_CHARS, model_name, route  # noqa: E402
from ortserve.config import Settings  # noqa: E402
from ortserve.errors import ModelNotFound, ServerBusy  # noqa: E402


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("name", ["qwen", "qwen:latest", "library/qwen:latest", "QWEN"])
def test_every_spelling_of_a_model_routes_alike(name):
    assert route("POST", "/api/chat", body(model=name)).model == "library/qwen/latest"


def test_the_id_maps_back_to_a_library_name():
    assert model_name("library/qwen/latest") == "library/qwen:latest"
    assert model_name(route("POST", "/v1/messages", body(model="me/m:v1")).model) == "me/m:v1"


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("POST", "/api/show", body(model="qwen")),  # library requests load nothing
        ("POST", "/api/pull", body(model="qwen")),
        ("GET", "/api/chat", b""),
        ("POST", "/api/chat", b"{not json"),  # any replica answers the 400
        ("POST", "/api/chat", b"[1]"),
        ("POST", "/api/chat", body(model=3)),
        ("POST", "/api/chat", body(model="../etc")),
    ],
)
def test_requests_that_run_no_model_route_anywhere(method, path, raw):
    where = route(method, path, raw)
    assert where.model == ""
    assert len(where.prompt.prompt) == 32  # a text of its own: it matches no conversation


def test_a_conversation_routes_on_its_text_in_every_protocol():
    chat = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]}]  # fmt: skip
    assert route("POST", "/api/chat", body(model="m", messages=chat)).prompt.prompt == (
        "firstanswersecond")  # fmt: skip
    anthropic = body(model="m", system="be brief", messages=chat[:1])
    assert route("POST", "/v1/messages", anthropic).prompt.prompt == "be brieffirst"
    assert route("POST", "/v1/responses", body(model="m", input="hi")).prompt.prompt == "hi"
    assert route("POST", "/api/generate", body(model="m", prompt="go")).prompt.prompt == "go"
    # a turn extends the one before it: the earlier text is the later one's prefix
    turn1 = route("POST", "/api/chat", body(model="m", messages=chat[:1])).prompt.prompt
    turn2 = route("POST", "/api/chat", body(model="m", messages=chat)).prompt.prompt
    assert turn2.startswith(turn1)
    long = route("POST", "/api/generate", body(model="m", prompt="x" * 10**6)).prompt.prompt
    assert len(long) == PROMPT_CHARS


def test_the_routers_errors_have_each_protocols_shape():
    lost = ServerBusy("gone")
    assert error_body("/api/chat", lost) == {"error": "gone"}
    assert error_body("/v1/chat/completions", lost)["error"]["type"] == "server_busy"
    assert error_body("/v1/messages", ModelNotFound("x"))["error"]["type"] == "not_found_error"
    assert error_body("/v1/messages", lost) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "gone"}}  # fmt: skip
    assert stream_error("/api/chat", "application/x-ndjson", lost) == '{"error":"gone"}\n'
    openai_end = stream_error("/v1/chat/completions", "text/event-stream", lost)
    assert openai_end.startswith('data: {"error":') and openai_end.endswith("data: [DONE]\n\n")
    assert stream_error("/v1/messages", "text/event-stream", lost).startswith("event: error\n")
    assert stream_error("/v1/responses", "text/event-stream", lost).startswith("event: error\n")


def test_replicas_get_the_drivers_ortserve_settings_only():
    env = {"ORTSERVE_MODELS": "/lib", "OLLAMA_HOST": "x", "HOME": "/root", "AWS_SECRET": "s"}
    assert replica_env(env) == {"ORTSERVE_MODELS": "/lib", "OLLAMA_HOST": "x"}


def test_autoscaling_runs_between_the_settings_on_turns_a_replica():
    settings = Settings.from_env({"ORTSERVE_MIN_REPLICAS": "2", "ORTSERVE_MAX_REPLICAS": "5",
                                  "ORTSERVE_NUM_PARALLEL": "4"})  # fmt: skip
    config = autoscaling_config(settings, {"downscale_delay_s": 1})
    assert config == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 5,
                      "target_ongoing_requests": 4, "downscale_delay_s": 1}  # fmt: skip
    # a maximum below the minimum is the minimum (Ray refuses it otherwise)
    low = Settings.from_env({"ORTSERVE_MIN_REPLICAS": "3", "ORTSERVE_MAX_REPLICAS": "1"})
    assert autoscaling_config(low, {})["max_replicas"] == 3


def test_the_importable_application_builds_without_a_cluster():
    from ray.serve import Application

    import ortserve.cluster

    assert isinstance(ortserve.cluster.app, Application)
    assert isinstance(build({"ORTSERVE_MAX_REPLICAS": "3"}), Application)
