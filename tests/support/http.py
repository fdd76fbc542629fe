"""HTTP helpers: free ports, NDJSON bodies, and each protocol's error shape checked once."""

from __future__ import annotations

import json
import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (test traffic stays on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(response) -> list[dict]:
    """The objects of a Flask test response's NDJSON body (Ollama's streams)."""
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def openai_error(response, status: int) -> dict:
    """The `error` object of an OpenAI-shaped error response, its status and keys checked."""
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def anthropic_error(response, status: int, kind: str) -> str:
    """The message of an Anthropic-shaped error response of type `kind`, its status checked."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    return body["error"]["message"]
