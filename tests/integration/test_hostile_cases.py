"""Hostile requests found by fuzzing (issue 20), sent to a real served app: each is answered
(a 4xx in its protocol's error shape, or a plain answer where the value is legal), and the
server still lists its models and chats afterwards.

Before the fixes: keep_alive 1e300 made every later /api/ps a 500; messages [null] on
/api/generate was a 500; a format of 5000 anyOf branches was a 500 that rebuilt the engine.
"""

from __future__ import annotations

import json

import httpx
import pytest

CHAT = {"model": "tiny-chat", "stream": False, "options": {"num_predict": 2},
        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
OPENAI = {"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC = {"model": "tiny-chat", "max_tokens": 2,
             "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


def _branches(n: int) -> dict:
    """n object branches sharing the prefix {"k": : all open at once in the parser's row."""
    return {"anyOf": [{"type": "object", "properties": {"k": {"const": i}}, "required": ["k"]}
                      for i in range(n)]}  # fmt: skip


BIG = _branches(5000)
NESTED = {"anyOf": [{"type": "object", "properties": {"k": _branches(50)}, "required": ["k"]}
                    for _ in range(50)]}  # fmt: skip
ENUM_OBJECTS = {"enum": [{"k": i} for i in range(5000)]}


def _tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "pick", "parameters": parameters}}


def _forced(parameters: dict) -> dict:
    return {**OPENAI, "tools": [_tool(parameters)],
            "tool_choice": {"type": "function", "function": {"name": "pick"}}}  # fmt: skip


# (path, raw body, status, the field the error names; None: a plain answer)
CASES = {
    # 1: a keep_alive past any date is "forever" (as Ollama keeps a huge one), not a broken /ps
    "keep_alive 1e300": ("/api/chat", json.dumps(CHAT)[:-1] + ', "keep_alive": 1e300}', 200,
                         None),
    "keep_alive 1e400": ("/api/chat", json.dumps(CHAT)[:-1] + ', "keep_alive": 1e400}', 200,
                         None),
    # 2: generate has no messages (Ollama ignores the field): any shape of it is no error
    "generate messages [null]": ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
                                 "stream": False, "messages": [None],
                                 "options": {"num_predict": 2}}, 200, None),
    "generate messages [5]": ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
                              "stream": False, "messages": [5],
                              "options": {"num_predict": 2}}, 200, None),
    'generate messages ["x"]': ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
                                "stream": False, "messages": ["x"],
                                "options": {"num_predict": 2}}, 200, None),
    # 3: schemas whose grammar passes og's parser limit, on every protocol
    "ollama format anyOf 5000": ("/api/chat", {**CHAT, "format": BIG}, 400, "format"),
    "ollama format nested 50x50": ("/api/chat", {**CHAT, "format": NESTED}, 400, "format"),
    "ollama format enum objects": ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
                                   "stream": False, "format": ENUM_OBJECTS}, 400, "format"),
    "openai response_format": ("/v1/chat/completions", {**OPENAI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": BIG}}}, 400,
        "response_format.json_schema.schema"),
    "openai forced tool": ("/v1/chat/completions", _forced({"type": "object", "properties":
                           {"a": BIG}}), 400, "tools[0].function.parameters"),
    "openai many tools": ("/v1/chat/completions", {**OPENAI, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": f"t{i}", "parameters": {
            "type": "object", "properties": {"a": _branches(300)}}}} for i in range(5)]}, 400,
        "tools"),
    "ollama chat tools": ("/api/chat", {**CHAT, "tools": [_tool({"type": "object",
                          "properties": {"a": BIG}})]}, 400, "tools[0].function.parameters"),
    "responses text.format": ("/v1/responses", {"model": "tiny-chat", "input": "hi",
                              "max_output_tokens": 16, "text": {"format": {
                                  "type": "json_schema", "name": "x", "schema": BIG}}}, 400,
                              "text.format.schema"),
    "anthropic input_schema": ("/v1/messages", {**ANTHROPIC, "tools": [
        {"name": "pick", "input_schema": {"type": "object", "properties": {"a": BIG}}}],
        "tool_choice": {"type": "tool", "name": "pick"}}, 400, "tools[0].input_schema"),
}  # fmt: skip


def _png(width: int, height: int) -> str:
    """A valid PNG of `width` x `height` pixels that is a few hundred bytes: one IDAT of a
    zlib stream of zero rows, as decompression bombs are made (base64)."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = zlib.compress(b"\0" * (1 + width) * min(height, 64), 9)  # a start: never read
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


SMALL = _png(4, 4)
# Bad images (issue 24): refused by name, in each protocol's shape, before any model loads
IMAGE_CASES = {
    "ollama image to a text model": ("/api/chat", {**CHAT, "messages": [
        {"role": "user", "content": "hi", "images": [SMALL]}]}, 400, "messages[0].images[0]:"),
    "ollama image not base64": ("/api/chat", {**CHAT, "messages": [
        {"role": "user", "content": "hi", "images": ["%%%"]}]}, 400, "messages[0].images[0]:"),
    "ollama bytes not an image": ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
        "stream": False, "images": ["aGVsbG8gd29ybGQ="]}, 400, "images[0]:"),
    "ollama decompression bomb": ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
        "stream": False, "images": [_png(100_000, 100_000)]}, 400, "images[0]:"),
    "ollama too many images": ("/api/generate", {"model": "tiny-chat", "prompt": "hi",
        "stream": False, "images": [SMALL] * 9}, 400, "images[8]:"),
    "openai bomb data URL": ("/v1/chat/completions", {**OPENAI, "messages": [{"role": "user",
        "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + _png(60_000, 60_000)}}]}]}, 400,
        "messages[0].content[0].image_url.url:"),
    "anthropic image to a text model": ("/v1/messages", {**ANTHROPIC, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": SMALL}}]}]}, 400, None),
}  # fmt: skip
CASES.update({name: (*case[:3], case[3]) for name, case in IMAGE_CASES.items()})


def _error_field(path: str, body: dict) -> str:
    """The message of an error body, checked to be in the protocol's shape."""
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return body["error"]
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]["message"]
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_request_is_answered_and_the_server_stays_well(server, case):
    path, body, status, field = CASES[case]
    raw = body if isinstance(body, str) else json.dumps(body)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text[:500]
        if field is not None:
            message = _error_field(path, response.json())
            assert message.startswith(f"{field} "), message
            if not path.startswith("/api/") and path != "/v1/messages":
                assert response.json()["error"]["param"] == field.rstrip(":")
        elif status == 400:
            assert "image" in _error_field(path, response.json())
        listed = client.get("/api/ps")
        assert listed.status_code == 200, listed.text
        assert all(m["expires_at"] for m in listed.json()["models"])
        chat = client.post("/api/chat", json=CHAT)
        assert chat.status_code == 200, chat.text
        assert chat.json()["done"] is True


@pytest.mark.parametrize(("name", "data"), [("not audio", b"hello world" * 10), ("empty", b"")])
def test_audio_to_a_text_model_and_bytes_that_are_not_audio_are_400(server, name, data):
    """Audio to a model that does not hear, and bytes that are no audio: refused by name."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post("/v1/audio/transcriptions", data={"model": "tiny-chat"},
                               files={"file": ("clip.wav", data, "audio/wav")})  # fmt: skip
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] in ("model", "file") and error["type"] == "invalid_request_error"
        assert client.post("/api/chat", json=CHAT).status_code == 200


def test_a_forever_keep_alive_shows_in_ps_and_the_cli(server):
    raw = json.dumps(CHAT)[:-1] + ', "keep_alive": 1e300}'
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.post("/api/chat", content=raw).status_code == 200
        (entry,) = [m for m in client.get("/api/ps").json()["models"]
                    if m["name"] == "tiny-chat:latest"]  # fmt: skip
        assert entry["expires_at"] == "2318-01-01T00:00:00Z"
        client.post("/api/chat", json={**CHAT, "keep_alive": "5m"})  # back to the default
