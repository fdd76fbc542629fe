"""One request can never disable a model: a batch that breaks og's Engine fails alone and
the lane gets a fresh engine; a schema that cannot be enforced is refused before generation."""

from __future__ import annotations

import httpx
import pytest

from ortserve.config import Settings
from ortserve.engine.guided import guidance_for
from ortserve.engine.runtime import Runtime
from ortserve.engine.types import Finished, GenerationOptions
from ortserve.errors import OrtServeError

pytestmark = pytest.mark.slow

# llguidance cannot build this grammar ("Too many items"): og then marks the Engine unhealthy
POISON = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def _run(loaded, options: GenerationOptions) -> Finished:
    finished = None
    for item in loaded.generate(loaded.encode("hi"), options):
        if isinstance(item, Finished):
            finished = item
    return finished


def test_a_batch_that_breaks_the_engine_fails_alone_and_the_lane_is_rebuilt(served_library):
    # below the HTTP checks on purpose: the guidance reaches og as a client once could send it
    runtime = Runtime(Settings(models=served_library.root, engine_lanes=1), served_library)
    try:
        loaded = runtime.acquire("tiny-chat")
        poisoned = GenerationOptions(num_predict=32, num_ctx=256, guidance=guidance_for(POISON))
        with pytest.raises(OrtServeError) as info:
            _run(loaded, poisoned)
        assert info.value.message == "generation failed (engine error ENGINE_EXECUTION_FAILURE)"
        for _ in range(5):  # before the fix: every later turn on the model failed
            finished = _run(loaded, GenerationOptions(num_predict=8, temperature=0, num_ctx=256))
            assert finished.usage.generated_tokens == 8
        runtime.release(loaded)
    finally:
        runtime.shutdown()


@pytest.mark.parametrize(
    ("path", "field"), [("/api/chat", "format"), ("/v1/chat/completions", "response_format")]
)
def test_an_unenforceable_schema_is_400_and_the_model_keeps_answering(server, path, field):
    if field == "format":
        body = {**CHAT, "format": POISON}
    else:
        body = {"model": "tiny-chat", "messages": CHAT["messages"], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": POISON}}}  # fmt: skip
    refused = httpx.post(server.url + path, json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    assert "no finite instance" in refused.text
    for _ in range(5):
        good = httpx.post(server.url + "/api/chat", json={**CHAT, "options": {"num_predict": 4}},
                          timeout=60)  # fmt: skip
        assert good.status_code == 200


def test_a_30_mb_prompt_is_refused_fast_without_tokenizing_it(server):
    import time

    import psutil

    worker = max(psutil.Process(server.process.pid).children(recursive=True),
                 key=lambda p: p.memory_info().rss)  # fmt: skip
    before = worker.memory_info().rss
    prompt = "lorem ipsum dolor sit amet " * (30 * 1024 * 1024 // 27)
    for path, body in [("/api/generate", {"model": "tiny-chat", "prompt": prompt}),
                       ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": prompt}]}),
                       ("/v1/completions", {"model": "tiny-chat", "prompt": prompt})]:  # fmt: skip
        started = time.monotonic()
        response = httpx.post(server.url + path, json=body, timeout=120)
        seconds = time.monotonic() - started
        assert response.status_code == 400, (path, response.text[:200])
        assert "prompt is too long" in response.text
        assert seconds < 10, (path, seconds)
    grown = worker.memory_info().rss - before
    assert grown < 300 * 2**20, f"worker grew by {grown / 2**20:.0f} MB"
