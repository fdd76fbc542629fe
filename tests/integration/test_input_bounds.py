"""Inputs that used to take minutes and gigabytes, against a real `ortserve serve`: chat
templates render within limits (at /api/create and at every request), and a 30 MB embedding
input is cut or refused before it is tokenized."""

from __future__ import annotations

import time

import httpx
import numpy as np
import psutil
import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

MIB = 1 << 20
# The templates: hours of CPU and 7 GB, and 1 GB after 18 s.
NESTED_LOOPS = "{% for i in range(100000) %}{% for k in range(100000) %}x{% endfor %}{% endfor %}"
REPEATED = '{{ "x" * 1000000000 }}'
DOUBLING = (
    '{% set ns = namespace(s="x") %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}'
    "{% endfor %}{{ ns.s }}"
)
# Renders the Modelfile's sample chat; quadratic in a message's length.
QUADRATIC = (
    "{% for m in messages %}{% for i in range(m.content|length) %}"
    "{% for j in range(m.content|length) %}.{% endfor %}{% endfor %}{% endfor %}"
)


def worker(server: Server) -> psutil.Process:
    """The gunicorn worker (the biggest child): where requests run."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return max(children, key=lambda p: p.memory_info().rss)


def post(server: Server, path: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(server.url + path, json=body, timeout=120)
    return response, time.monotonic() - started


@pytest.fixture
def chat_server(own_library):
    """A server over a library of its own: a copy of tiny-chat, and models added by tests."""
    running = Server(own_library)
    yield running, own_library
    running.stop()


def test_create_refuses_a_template_past_its_limits_fast_naming_the_limit(chat_server):
    server, library = chat_server
    process = worker(server)
    before = process.memory_info().rss
    for template, limit in [(NESTED_LOOPS, "loop iterations"), (REPEATED, "output size"),
                            (DOUBLING, "output size")]:  # fmt: skip
        body = {"model": "hostile", "from": "tiny-chat", "template": template}
        response, seconds = post(server, "/api/create", body)
        assert response.status_code == 400, response.text
        assert f"exceeded its {limit} limit" in response.json()["error"], response.text
        assert seconds < 10, (template, seconds)
    assert not library.exists("hostile")
    grown = process.memory_info().rss - before
    assert grown < 300 * MIB, f"worker grew by {grown / MIB:.0f} MB"


def test_a_template_past_its_limits_at_request_time_is_a_400_not_a_hang(chat_server):
    server, library = chat_server
    base = library.get("tiny-chat").manifest
    for name, template in [("old-loops", NESTED_LOOPS), ("old-repeat", REPEATED)]:
        library.save(name, {**base, "template": template})  # stored before templates had limits
    response, _ = post(server, "/api/create",
                       {"model": "quadratic", "from": "tiny-chat", "template": QUADRATIC})  # fmt: skip
    assert response.status_code == 200, response.text

    hello = [{"role": "user", "content": "hello"}]
    long = [{"role": "user", "content": "y" * 5000}]
    cases = [
        ("/api/chat", {"model": "old-loops", "messages": hello}, "loop iterations"),
        ("/api/generate", {"model": "old-loops", "prompt": "hello"}, "loop iterations"),
        ("/api/chat", {"model": "old-repeat", "messages": hello}, "output size"),
        ("/api/chat", {"model": "quadratic", "messages": long}, "loop iterations"),
        ("/v1/chat/completions", {"model": "quadratic", "messages": long}, "loop iterations"),
    ]
    process = worker(server)
    before = process.memory_info().rss
    for path, body, limit in cases:
        response, seconds = post(server, path, {**body, "stream": False})
        assert response.status_code == 400, (path, body["model"], response.text)
        assert f"exceeded its {limit} limit" in response.text, response.text
        assert seconds < 10, (path, body["model"], seconds)
    grown = process.memory_info().rss - before
    assert grown < 300 * MIB, f"worker grew by {grown / MIB:.0f} MB"
    fine = {"model": "tiny-chat", "messages": hello, "stream": False,
            "options": {"num_predict": 2}}  # fmt: skip
    assert post(server, "/api/chat", fine)[0].status_code == 200


def test_a_30_mb_embedding_input_is_cut_or_refused_before_tokenizing(server):
    text = "hello world " * (30_000_000 // 12)
    short = "hello world " * 200  # 400 tokens: the model reads the same first 256
    warm, _ = post(server, "/api/embed", {"model": "all-minilm", "input": short})
    assert warm.status_code == 200
    expected = np.asarray(warm.json()["embeddings"][0])
    process = worker(server)
    before = process.memory_info().rss

    response, seconds = post(server, "/api/embed", {"model": "all-minilm", "input": text})
    assert response.status_code == 200 and seconds < 10, (response.text[:200], seconds)
    assert response.json()["prompt_eval_count"] == 256
    np.testing.assert_allclose(response.json()["embeddings"][0], expected, atol=1e-5)

    response, seconds = post(server, "/v1/embeddings", {"model": "all-minilm", "input": [text]})
    assert response.status_code == 200 and seconds < 10, (response.text[:200], seconds)
    np.testing.assert_allclose(response.json()["data"][0]["embedding"], expected, atol=1e-5)

    body = {"model": "all-minilm", "input": ["short", text], "truncate": False}
    response, seconds = post(server, "/api/embed", body)
    assert response.status_code == 400 and seconds < 10, (response.text[:200], seconds)
    assert "input[1] is too long" in response.json()["error"]

    grown = process.memory_info().rss - before
    assert grown < 300 * MIB, f"worker grew by {grown / MIB:.0f} MB"


def test_too_many_embedding_inputs_are_refused_naming_the_field(server):
    for path in ("/api/embed", "/v1/embeddings"):
        response, _ = post(server, path, {"model": "all-minilm", "input": ["a"] * 2049})
        assert response.status_code == 400, response.text
        assert "2048" in response.text and "input" in response.text
