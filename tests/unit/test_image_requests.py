"""Images on every protocol: Ollama's images, OpenAI's image_url, the Responses API's
input_image, Anthropic's image blocks, Gemini's inlineData; `ortserve run`'s image paths.

Flask's test client, a real library, real pictures (pillow), the real prompt builder; the
engine is faked (plumbing only): a vision model's FakeLoaded has an image placeholder, records
the images generate() is given, and reports IMAGE_TOKENS per image in its usage as a real
engine reports the expanded prompt. tests/integration/test_vision_server.py runs the tiny
Qwen2.5-VL behind the real server under each protocol's official client.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from PIL import Image

from ortserve import interactive
from ortserve.api import create_app
from ortserve.config import Settings
from ortserve.engine.runtime import Runtime
from ortserve.serving import core, images
from ortserve.serving.requests import ChatPrompt, GenerationRequest, TextPrompt
from tests.support.fakes import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKENS,
    RoomyToolRuntime,
    add_fake_model,
    add_model,
    fake_backend,
    prompt_text,
)
from tests.support.http import anthropic_error, openai_error


def picture(size=(12, 8), fmt="PNG", mode="RGB", color=(200, 30, 90)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(out, format=fmt)
    return out.getvalue()


PNG = picture()
B64 = base64.b64encode(PNG).decode()
DATA_URL = f"data:image/png;base64,{B64}"


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a signature and an IHDR only (no pixels),
    what a decompression bomb looks like to a reader of headers."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


@pytest.fixture
def runtime(library):
    add_model(library, "eye", capabilities=["completion", "tools", "vision"])
    add_model(library, "tiny", capabilities=["completion", "tools"])
    return RoomyToolRuntime(library)


# ---- each protocol's field reaches generate() as bytes, after the placeholder ----------------


def google_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert (error["code"], error["status"]) == (status, "INVALID_ARGUMENT")
    return error


def ask(client, protocol: str, image: dict | None = None, model: str = "eye", **extra):
    """POST a one-message request with one picture (or `image`, the protocol's own part)."""
    if protocol == "chat":
        message = {"role": "user", "content": "What is it?", "images": [B64], **(image or {})}
        body = {"model": model, "messages": [message], "stream": False}
        return client.post("/api/chat", json={**body, **extra})
    if protocol == "generate":
        body = {"model": model, "prompt": "What is it?", "images": [B64], "stream": False}
        return client.post("/api/generate", json={**body, **(image or {}), **extra})
    if protocol == "openai":
        part = image or {"type": "image_url", "image_url": {"url": DATA_URL}}
        content = [{"type": "text", "text": "What is it?"}, part]
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        return client.post("/v1/chat/completions", json={**body, **extra})
    if protocol == "responses":
        part = image or {"type": "input_image", "image_url": DATA_URL}
        content = [{"type": "input_text", "text": "What is it?"}, part]
        body = {"model": model, "input": [{"role": "user", "content": content}]}
        return client.post("/v1/responses", json={**body, **extra})
    if protocol == "anthropic":
        source = {"type": "base64", "media_type": "image/png", "data": B64}
        part = image or {"type": "image", "source": source}
        content = [part, {"type": "text", "text": "What is it?"}]
        body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
        return client.post("/v1/messages", json={**body, **extra})
    assert protocol == "gemini"
    part = image or {"inlineData": {"mimeType": "image/png", "data": B64}}
    body = {"contents": [{"role": "user", "parts": [{"text": "What is it?"}, part]}]}
    return client.post(f"/v1beta/models/{model}:generateContent", json={**body, **extra})


PROTOCOLS = ("chat", "generate", "openai", "responses", "anthropic", "gemini")
# Where each protocol's picture is, as its errors name it
FIELDS = {
    "chat": "messages[0].images[0]",
    "generate": "images[0]",
    "openai": "messages[0].content[1].image_url.url",
    "responses": "input[0].content[1].image_url",
    "anthropic": "messages[0].content[0].source.data",
    "gemini": "contents[0].parts[1].inlineData.data",
}


def prompt_tokens(protocol: str, body: dict) -> int:
    if protocol in ("chat", "generate"):
        return body["prompt_eval_count"]
    if protocol == "openai":
        return body["usage"]["prompt_tokens"]
    if protocol in ("responses", "anthropic"):
        return body["usage"]["input_tokens"]
    return body["usageMetadata"]["promptTokenCount"]


def refusal(protocol: str, response) -> tuple[str, str | None]:
    """(message, field) of a 400 in the protocol's own error shape."""
    if protocol in ("chat", "generate"):
        assert response.status_code == 400, response.get_data(as_text=True)
        body = response.get_json()
        assert set(body) == {"error"}
        return body["error"], None
    if protocol in ("openai", "responses"):
        error = openai_error(response, 400)
        return error["message"], error["param"]
    if protocol == "anthropic":
        return anthropic_error(response, 400, "invalid_request_error"), None
    error = google_error(response, 400)
    return error["message"], error["details"][0]["fieldViolations"][0]["field"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_protocols_image_reaches_generate_after_the_placeholder(client, runtime, protocol):
    response = ask(client, protocol)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert runtime.images == [(PNG,)]  # the very bytes sent, in a tuple
    text = prompt_text(runtime)
    assert f"{IMAGE_PLACEHOLDER}What is it?" in text, text
    assert text.count(IMAGE_PLACEHOLDER) == 1
    # usage is the engine's count: the image's tokens in it, not the placeholder's
    assert prompt_tokens(protocol, response.get_json()) == len(text) + IMAGE_TOKENS


def test_a_request_without_images_does_not_pass_the_argument(client, runtime):
    """Backends that take no images keep working: generate() gets no images argument."""
    body = {"model": "eye", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
    assert client.post("/api/chat", json=body).status_code == 200
    assert runtime.images == [None]


def test_images_in_order_across_messages_and_each_before_its_text(client, runtime):
    red, blue, green = picture(color=(255, 0, 0)), picture(color=(0, 0, 255)), picture((5, 5))
    messages = [
        {"role": "user", "content": "one", "images": [base64.b64encode(red).decode()]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "two",
         "images": [base64.b64encode(b).decode() for b in (blue, green)]},
    ]  # fmt: skip
    response = client.post("/api/chat", json={"model": "eye", "messages": messages,
                                              "stream": False})  # fmt: skip
    assert response.status_code == 200, response.get_json()
    assert runtime.images == [(red, blue, green)]
    text = prompt_text(runtime)
    assert f"<user>{IMAGE_PLACEHOLDER}one<assistant>ok" in text
    assert f"<user>{IMAGE_PLACEHOLDER * 2}two<assistant>" in text


def test_guided_and_tool_turns_take_the_images_too(client, runtime):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    runtime.script = [(['{"a": 1}'],)]
    assert ask(client, "chat", format=schema).status_code == 200
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    runtime.script = [(["plain answer"],)]
    assert ask(client, "openai", tools=[tool]).status_code == 200
    assert runtime.images == [(PNG,), (PNG,)]


def test_a_raw_prompt_gets_the_placeholders_unless_it_places_them(client, runtime):
    assert ask(client, "generate", raw=True).status_code == 200
    assert prompt_text(runtime) == f"{IMAGE_PLACEHOLDER}What is it?"
    placed = {"prompt": f"Look: {IMAGE_PLACEHOLDER} What is it?"}
    assert ask(client, "generate", placed, raw=True).status_code == 200
    assert prompt_text(runtime) == placed["prompt"]
    assert runtime.images == [(PNG,), (PNG,)]


def test_a_truncated_history_drops_its_images(client, library):
    """Ollama's truncate drops the oldest turns to fit num_ctx: their images go with them."""
    first = {"role": "user", "content": "x" * 80, "images": [B64]}
    messages = [first, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}]
    body = {"model": "eye", "messages": messages, "stream": False, "options": {"num_ctx": 64}}
    runtime = client.application.extensions["ortserve"].runtime
    assert client.post("/api/chat", json=body).status_code == 200, library
    assert prompt_text(runtime) == "<user>hi<assistant>"
    assert runtime.images == [None]


def test_the_placeholder_typed_as_text_is_refused(client, runtime):
    message = {"role": "user", "content": f"{IMAGE_PLACEHOLDER} hi"}
    response = client.post("/api/chat", json={"model": "eye", "messages": [message]})
    assert response.status_code == 400
    assert "image placeholder" in response.get_json()["error"]
    assert runtime.generated == []


def test_stored_responses_keep_their_images_for_the_next_turn(client, runtime):
    first = ask(client, "responses").get_json()
    follow = {"model": "eye", "input": "And now?", "previous_response_id": first["id"]}
    assert client.post("/v1/responses", json=follow).status_code == 200
    assert runtime.images == [(PNG,), (PNG,)]
    assert prompt_text(runtime).count(IMAGE_PLACEHOLDER) == 1


def test_stored_responses_with_images_are_json_in_the_library_store(library, runtime):
    app = create_app(Settings(models=library.root, responses_store="library"), runtime=runtime)
    client = app.test_client()
    first = ask(client, "responses").get_json()
    stored = json.loads((library.root / "responses" / f"{first['id']}.json").read_text())
    assert stored["conversation"][0]["images"] == [B64]
    follow = {"model": "eye", "input": "And now?", "previous_response_id": first["id"]}
    assert client.post("/v1/responses", json=follow).status_code == 200
    assert runtime.images[-1] == (PNG,)


def test_every_format_clients_send_is_taken(client, runtime):
    """PNG, JPEG, WebP, GIF, BMP, any mode: passed on as sent (the engine decodes them)."""
    for raw in (picture(fmt="WEBP"), picture(fmt="GIF"), picture(mode="RGBA", color=(1, 2, 3, 4)),
                picture(fmt="BMP"), picture(mode="L"), picture(fmt="JPEG")):  # fmt: skip
        message = {"role": "user", "content": "x", "images": [base64.b64encode(raw).decode()]}
        assert client.post("/api/chat", json={"model": "eye", "messages": [message],
                                              "stream": False}).status_code == 200  # fmt: skip
        assert runtime.images[-1] == (raw,)
    tiff = picture(fmt="TIFF")
    error = ask(client, "chat", {"images": [base64.b64encode(tiff).decode()]}).get_json()
    assert error == {"error": "messages[0].images[0]: not an image (PNG, JPEG, WebP, GIF or BMP)"}


# ---- bad input: 400 in each protocol's shape, naming the field, before anything loads --------


BAD = {
    "not base64": "@@@not base64@@@",
    "not an image": base64.b64encode(b"hello, this is text").decode(),
    "a broken image": base64.b64encode(PNG[:-20]).decode(),
    "too many pixels": base64.b64encode(huge_png_header(100_000, 100_000)).decode(),
}


def with_image(protocol: str, data: str) -> dict:
    if protocol == "chat":
        return {"images": [data]}
    if protocol == "generate":
        return {"images": [data]}
    if protocol == "openai":
        return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    if protocol == "responses":
        return {"type": "input_image", "image_url": f"data:image/png;base64,{data}"}
    if protocol == "anthropic":
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": data}}  # fmt: skip
    return {"inlineData": {"mimeType": "image/png", "data": data}}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("why", list(BAD))
def test_bad_images_are_400_naming_the_field(client, runtime, protocol, why):
    data = BAD[why]
    if why == "not base64" and protocol in ("openai", "responses"):
        data = "%%%"
    message, field = refusal(protocol, ask(client, protocol, with_image(protocol, data)))
    assert message.startswith(f"{FIELDS[protocol]}: "), message
    assert why in message, message
    assert field in (None, FIELDS[protocol])
    assert runtime.acquired == []  # refused before the model loads


def client_with(library, runtime, **settings):
    """A client of an app whose settings (ORTSERVE_MAX_IMAGE_BYTES, ...) are `settings`."""
    return create_app(Settings(models=library.root, **settings), runtime=runtime).test_client()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_too_large_images_are_400(library, runtime, protocol):
    client = client_with(library, runtime, max_image_bytes=len(PNG) - 1)
    message, _ = refusal(protocol, ask(client, protocol))
    assert message.startswith(f"{FIELDS[protocol]}: image too large"), message
    assert "ORTSERVE_MAX_IMAGE_BYTES" in message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_more_images_than_a_request_may_hold_are_400(library, runtime, protocol):
    client = client_with(library, runtime, max_images=1)
    if protocol in ("chat", "generate"):
        extra = {"images": [B64, B64]}
    else:
        extra = with_image(protocol, B64)
    if protocol in ("chat", "generate"):
        response = ask(client, protocol, extra)
    else:  # the same picture twice in the message's parts
        response = _twice(client, protocol, extra)
    message, _ = refusal(protocol, response)
    assert "too many images: at most 1 per request" in message, message


def _twice(client, protocol: str, part: dict):
    if protocol == "openai":
        body = {"model": "eye", "messages": [{"role": "user", "content": [part, part]}]}
        return client.post("/v1/chat/completions", json=body)
    if protocol == "responses":
        return client.post("/v1/responses", json={"model": "eye", "input": [
            {"role": "user", "content": [part, part]}]})  # fmt: skip
    if protocol == "anthropic":
        body = {"model": "eye", "max_tokens": 8,
                "messages": [{"role": "user", "content": [part, part]}]}  # fmt: skip
        return client.post("/v1/messages", json=body)
    body = {"contents": [{"role": "user", "parts": [part, part]}]}
    return client.post("/v1beta/models/eye:generateContent", json=body)


def test_the_count_covers_a_stored_conversation_too(library, runtime):
    client = client_with(library, runtime, max_images=1)
    first = ask(client, "responses").get_json()
    follow = {"model": "eye", "previous_response_id": first["id"],
              "input": [{"role": "user", "content": [with_image("responses", B64)]}]}  # fmt: skip
    error = openai_error(client.post("/v1/responses", json=follow), 400)
    assert "too many images: 2, at most 1" in error["message"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_model_without_vision_refuses_images_naming_the_field(client, runtime, protocol):
    message, field = refusal(protocol, ask(client, protocol, model="tiny"))
    assert message == f'{FIELDS[protocol]}: "tiny:latest" does not support images (it has no ' \
                      "vision capability)", message  # fmt: skip
    assert field in (None, FIELDS[protocol])
    assert runtime.acquired == []  # before loading it


def test_protocol_specific_refusals(client, runtime):
    error = openai_error(ask(client, "responses", {"type": "input_image", "file_id": "file-1"}),
                         400)  # fmt: skip
    assert error["param"] == "input[0].content[1].file_id"
    assert "file_id" in error["message"] and "data URL" in error["message"]
    text_url = {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}
    assert "not an image" in openai_error(ask(client, "openai", text_url), 400)["message"]
    plain = {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}
    assert "must be base64" in openai_error(ask(client, "openai", plain), 400)["message"]
    # as google-genai sends it: mime_type, and URL-safe base64 without padding
    safe = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    assert images.decode_base64("-_-_-_8", "x", proto=True) == b"\xfb\xff\xbf\xfb\xff"
    sdk = {"inlineData": {"mime_type": "image/png", "data": safe}}
    assert ask(client, "gemini", sdk).status_code == 200
    assert runtime.images == [(PNG,)]
    runtime.acquired.clear()
    pdf = {"inlineData": {"mimeType": "application/pdf", "data": B64}}
    error = google_error(ask(client, "gemini", pdf), 400)
    assert error["details"][0]["fieldViolations"][0]["field"] == (
        "contents[0].parts[1].inlineData.mimeType"
    )
    nested = {"type": "tool_result", "tool_use_id": "t",
              "content": [{"type": "image", "source": {}}]}  # fmt: skip
    message = anthropic_error(ask(client, "anthropic", nested), 400, "invalid_request_error")
    assert "image blocks are not supported in a tool_result" in message
    assert runtime.acquired == []


def test_assistant_images_on_anthropic_are_refused(client, runtime):
    source = {"type": "base64", "media_type": "image/png", "data": B64}
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "image", "source": source}]},
                {"role": "user", "content": "and?"}]  # fmt: skip
    body = {"model": "eye", "max_tokens": 8, "messages": messages}
    message = anthropic_error(client.post("/v1/messages", json=body), 400,
                              "invalid_request_error")  # fmt: skip
    assert message.startswith("messages[1].content[0]:")


# ---- http(s) URLs: refused unless ORTSERVE_FETCH_IMAGES; fetched within the cap and time ----


class _Pictures(BaseHTTPRequestHandler):
    """/cat.png: the PNG; /slow.png: headers, then nothing for a while; /big.png: 64 KiB."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = {"/cat.png": PNG, "/big.png": b"\0" * (64 << 10)}.get(self.path, PNG)
        self.send_response(200 if self.path != "/missing.png" else 404)
        self.send_header("Content-Type", "image/png")
        if self.path != "/big.png":  # no Content-Length: the cap must hold while reading
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/slow.png":
            self.wfile.write(body[:10])
            self.wfile.flush()
            time.sleep(3)
        with contextlib.suppress(OSError):  # the client gave up (the timeout test)
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def picture_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pictures)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fetching(library, runtime):
    app = create_app(Settings(models=library.root, fetch_images=True), runtime=runtime)
    return app.test_client()


URL_PARTS = {
    "openai": lambda url: {"type": "image_url", "image_url": {"url": url}},
    "responses": lambda url: {"type": "input_image", "image_url": url},
    "anthropic": lambda url: {"type": "image", "source": {"type": "url", "url": url}},
}
URL_FIELDS = {"openai": "messages[0].content[1].image_url.url",
              "responses": "input[0].content[1].image_url",
              "anthropic": "messages[0].content[0].source.url"}  # fmt: skip


@pytest.mark.parametrize("protocol", list(URL_PARTS))
def test_urls_are_refused_unless_fetching_is_on(client, runtime, picture_server, protocol):
    message, _ = refusal(protocol, ask(client, protocol, URL_PARTS[protocol](
        f"{picture_server}/cat.png")))  # fmt: skip
    assert message.startswith(f"{URL_FIELDS[protocol]}: image URLs are not fetched")
    assert "ORTSERVE_FETCH_IMAGES=1" in message and "data URL" in message


@pytest.mark.parametrize("protocol", list(URL_PARTS))
def test_urls_are_fetched_when_fetching_is_on(fetching, runtime, picture_server, protocol):
    response = ask(fetching, protocol, URL_PARTS[protocol](f"{picture_server}/cat.png"))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert runtime.images == [(PNG,)]


def test_fetching_is_bounded_in_bytes_and_time(library, runtime, picture_server, monkeypatch):
    fetching = client_with(library, runtime, fetch_images=True, max_image_bytes=32 << 10)
    big = ask(fetching, "openai", URL_PARTS["openai"](f"{picture_server}/big.png"))
    assert "image too large" in openai_error(big, 400)["message"]
    monkeypatch.setattr(images, "FETCH_TIMEOUT", 0.5)
    started = time.monotonic()
    slow = ask(fetching, "openai", URL_PARTS["openai"](f"{picture_server}/slow.png"))
    assert "took more than 0.5 s" in openai_error(slow, 400)["message"]
    assert time.monotonic() - started < 2.5
    missing = ask(fetching, "openai", URL_PARTS["openai"](f"{picture_server}/missing.png"))
    assert "gave HTTP 404" in openai_error(missing, 400)["message"]
    assert runtime.acquired == []


def test_the_setting_is_read_from_the_environment():
    assert Settings.from_env({"ORTSERVE_FETCH_IMAGES": "1"}).fetch_images is True
    assert Settings.from_env({}).fetch_images is False


# ---- the serving core on a real Runtime over the fake backend --------------------------------


@pytest.fixture
def state(library):
    with fake_backend() as backend:
        add_fake_model(library, "seer", capabilities=["completion", "vision"])
        settings = Settings(models=library.root)
        runtime = Runtime(settings, library)
        yield SimpleNamespace(library=library, runtime=runtime, settings=settings,
                              backend=backend)  # fmt: skip
        runtime.shutdown()


def test_the_core_renders_placeholders_and_passes_images_only_when_given(state):
    message = {"role": "user", "content": "Hi", "images": [PNG]}
    exchange = core.start(state, GenerationRequest("seer", [ChatPrompt([message])]))
    exchange.finish()
    plain = GenerationRequest("seer", [TextPrompt("Hi", images=(PNG, PNG))])
    core.start(state, plain).finish()
    core.start(state, GenerationRequest("seer", [TextPrompt("Hi")])).finish()
    model = state.backend.loaded[0]
    assert model.images == [(PNG,), (PNG, PNG), None]
    assert "".join(map(chr, model.turns[0][0])).count(IMAGE_PLACEHOLDER) == 1
    assert exchange.usage().prompt_tokens == len(model.turns[0][0]) + IMAGE_TOKENS


# ---- ortserve run: image paths in the prompt are attached ------------------------------------


class ShowingBackend:
    """Answers /api/show with `capabilities` and every chat with 'ok' (plumbing only)."""

    def __init__(self, capabilities):
        self.capabilities = capabilities
        self.bodies = []

    def stream(self, path, body):
        self.bodies.append((path, body))
        if path == "/api/show":
            yield {"capabilities": self.capabilities}
            return
        yield {"message": {"role": "assistant", "content": "ok"}, "done": True}


def test_run_attaches_existing_image_files_and_removes_their_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(PNG)
    (tmp_path / "my dog.JPG").write_bytes(b"jpeg bytes")
    notes = []
    session = interactive.Session(ShowingBackend(["completion", "vision"]), "eye",
                                  keep_alive=None, verbose=False, out=lambda _: None)  # fmt: skip
    session.note = notes.append
    session.ask(r"describe ./cat.png and ./my\ dog.JPG, not ./absent.png or cat.png")
    message = session.backend.bodies[-1][1]["messages"][0]
    assert message["content"] == "describe  and , not ./absent.png or cat.png"
    assert [base64.b64decode(i) for i in message["images"]] == [PNG, b"jpeg bytes"]
    assert notes == ["Added image 'cat.png'\n", "Added image 'my dog.JPG'\n"]
    session.ask(f"and '{tmp_path}/cat.png'?")  # quoted, as a shell completes it
    message = session.backend.bodies[-1][1]["messages"][2]
    assert message["content"] == "and ?" and len(message["images"]) == 1
    assert [p for p, _ in session.backend.bodies].count("/api/show") == 1  # asked once


def test_run_leaves_paths_as_text_for_a_model_without_vision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(PNG)
    session = interactive.Session(ShowingBackend(["completion"]), "tiny", keep_alive=None,
                                  verbose=False, out=lambda _: None)  # fmt: skip
    session.ask("describe ./cat.png")
    assert session.backend.bodies[-1][1]["messages"][0] == {
        "role": "user",
        "content": "describe ./cat.png",
    }
