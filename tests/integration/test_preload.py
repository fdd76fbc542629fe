"""ORTSERVE_PRELOAD on a real `ortserve serve`: /readyz says 200 only once the models are
loaded (and they are: /api/ps lists them, kept forever), 503 naming a model that failed."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def readiness(server, timeout: float = 60) -> httpx.Response:
    """/readyz once every preload has ended (each answer before must be a 503)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(server.url + "/readyz", timeout=10)
        if not {"waiting", "loading"} & set(response.json()["models"].values()):
            return response
        assert response.status_code == 503
        assert time.monotonic() < deadline, "still loading"
        time.sleep(0.05)


def test_ready_once_the_preloaded_models_are_loaded_and_they_stay(make_server):
    server = make_server(ORTSERVE_PRELOAD="tiny-chat,all-minilm", ORTSERVE_KEEP_ALIVE="1s")
    response = readiness(server)
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready", "models": {"tiny-chat": "loaded", "all-minilm": "loaded"}}  # fmt: skip
    time.sleep(1.5)  # past ORTSERVE_KEEP_ALIVE: preloaded models are kept regardless
    loaded = {m["name"]: m for m in httpx.get(server.url + "/api/ps").json()["models"]}
    assert set(loaded) == {"tiny-chat:latest", "all-minilm:latest"}
    assert all(m["expires_at"].startswith("2318-") for m in loaded.values())  # Ollama's forever
    body = {"model": "tiny-chat", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    answer = httpx.post(server.url + "/api/generate", json=body, timeout=60).json()
    assert answer["load_duration"] == 0  # no load on the first request: it was preloaded
    assert "preloaded tiny-chat in " in server.output()


@pytest.mark.parametrize("model", ["nope", "broken"])
def test_a_model_that_cannot_preload_is_named_and_the_server_still_serves(make_server, model):
    """An unknown model, and one whose graph is garbage: 503 naming it; the rest works."""
    server = make_server(ORTSERVE_PRELOAD=f"{model},tiny-chat")
    response = readiness(server)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failed"
    assert body["models"] == {model: "failed", "tiny-chat": "loaded"}
    assert body["error"].startswith(f'model "{model}" failed to preload: ')
    assert httpx.get(server.url + "/healthz").status_code == 200
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
            "stream": False, "options": {"num_predict": 2}}  # fmt: skip
    assert httpx.post(server.url + "/api/chat", json=chat, timeout=60).status_code == 200
