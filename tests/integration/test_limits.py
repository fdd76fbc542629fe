"""Limits that hold, against a real `ortserve serve` (gunicorn, and waitress where it differs):
stalled connections hold no thread, a client that stops sending is cut off, bodies over the
limit are refused however they are framed, a full server says 503 with Retry-After, and a
damaged bundle refuses to load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from ortserve.library import Library
from tests.integration.conftest import Server

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"num_predict": 8}}  # fmt: skip
MIB = 1 << 20


class WaitressServer(Server):
    """`ortserve serve --waitress` (conftest's Server runs gunicorn)."""

    def __init__(self, library: Library, **env: str):
        from tests.support.http import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ORTSERVE_MODELS": str(library.root),
                    "ORTSERVE_HOST": f"127.0.0.1:{self.port}", **env}  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ortserve", "serve", "--waitress"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._wait_ready()


@pytest.fixture
def serve(served_library):
    """serve("gunicorn" | "waitress", **env) -> a running server, stopped at the end."""
    started: list[Server] = []

    def start(kind: str = "gunicorn", library: Library | None = None, **env: str) -> Server:
        cls = WaitressServer if kind == "waitress" else Server
        started.append(cls(library or served_library, **env))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def call(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a GET, or of a POST of `body`."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def timed(url: str, body: dict | None = None) -> tuple[int, float]:
    started = time.monotonic()
    status, _, _ = call(url, body)
    return status, time.monotonic() - started


def connect(server: Server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    if data:
        sock.sendall(data)
    return sock


def head(path: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Five ways to stall: silent, half a request line, half a head, half a body, half a chunk.
STALLS = (
    b"",
    b"POST /api/ch",
    b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len",
    head("/api/chat", "Content-Length: 200") + b'{"model": "tiny-chat", ',
    head("/api/chat", "Transfer-Encoding: chunked") + b'5\r\n{"mod\r\n',
)


def read_answer(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the server sends before it closes (b"" if nothing), and when it closed."""
    started = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received, time.monotonic() - started


# ---- settings -----------------------------------------------------------------------------------


def test_threads_queue_and_read_timeout_settings(tmp_path):
    from ortserve.config import Settings, SettingsError

    defaults = Settings.from_env({"ORTSERVE_MODELS": str(tmp_path)})
    assert defaults.read_timeout == 30 and defaults.generation_slots == defaults.threads - 8
    # the defaults admit 64 streams on one model, and a model's full queue is reachable
    assert defaults.num_parallel + defaults.max_queue >= 64
    assert defaults.num_parallel + defaults.max_queue < defaults.generation_slots
    small = Settings.from_env({"ORTSERVE_MODELS": str(tmp_path), "ORTSERVE_THREADS": "4",
                               "ORTSERVE_READ_TIMEOUT": "250ms"})  # fmt: skip
    assert (small.generation_slots, small.read_timeout) == (3, 0.25)
    with pytest.raises(SettingsError, match="ORTSERVE_READ_TIMEOUT"):
        Settings.from_env({"ORTSERVE_MODELS": str(tmp_path), "ORTSERVE_READ_TIMEOUT": "0"})


# ---- stalled connections hold no thread ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["gunicorn", "waitress"])
def test_64_idle_or_half_sent_connections_leave_health_and_chat_answering(serve, kind):
    server = serve(kind, ORTSERVE_THREADS="8")  # far fewer threads than stalled connections
    assert call(server.url + "/api/chat", CHAT)[0] == 200  # loaded before the clock starts
    stalled = [connect(server, STALLS[i % len(STALLS)]) for i in range(64)]
    try:
        time.sleep(0.5)  # every stalled connection has been accepted and read
        worst = {"/healthz": 0.0, "/api/chat": 0.0}
        for _ in range(3):
            for path, body in (("/healthz", None), ("/api/chat", CHAT)):
                status, seconds = timed(server.url + path, body)
                assert status == 200
                worst[path] = max(worst[path], seconds)
        print(f"{kind}: 64 stalled connections, 8 threads: worst /healthz {worst['/healthz']:.3f}s,"
              f" /api/chat {worst['/api/chat']:.3f}s")  # fmt: skip
        assert worst["/healthz"] < 1 and worst["/api/chat"] < 1
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("kind", ["gunicorn", "waitress"])
def test_a_client_that_stops_sending_is_cut_off_at_the_read_timeout(serve, kind):
    server = serve(kind, ORTSERVE_READ_TIMEOUT="2")
    silent, half = connect(server), connect(server, STALLS[2])
    answer, seconds = read_answer(half, timeout=10)
    assert 1.5 < seconds < 5
    if kind == "gunicorn":  # waitress closes without a word
        assert answer.startswith(b"HTTP/1.1 408 ") and b"ORTSERVE_READ_TIMEOUT" in answer
    assert read_answer(silent, timeout=10)[0] == b""
    silent.close()
    half.close()


def test_a_large_body_that_stops_half_way_frees_its_thread(serve):
    """A body past what the main loop buffers (1 MiB) is read by a thread, each read bounded."""
    server = serve(ORTSERVE_READ_TIMEOUT="2", ORTSERVE_THREADS="4")
    sock = connect(server, head("/api/chat", f"Content-Length: {3 * MIB}") + b" " * (2 * MIB))
    answer, seconds = read_answer(sock, timeout=10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"stopped arriving" in answer
    assert seconds < 5
    assert call(server.url + "/api/chat", CHAT)[0] == 200


# ---- the body limit holds for chunked bodies ---------------------------------------------------


def _chunked(total: int):
    """A chat body of about `total` bytes, in 1 MiB chunks (urllib sends it chunked)."""
    yield b'{"model":"tiny-chat","stream":false,"options":{"num_predict":4},"messages":[{"role":"user","content":"'  # noqa: E501
    sent = 0
    while sent < total:
        size = min(MIB, total - sent)
        sent += size
        yield b"a" * size
    yield b'"}]}'


def _post_chunked(url: str, total: int) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=_chunked(total), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Transfer-Encoding": "chunked"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("kind", ["gunicorn", "waitress"])
def test_a_chunked_body_over_32_mib_is_refused_with_413(serve, kind):
    server = serve(kind)
    status, body = _post_chunked(server.url + "/api/chat", 33 * MIB)
    assert status == 413 and "32 MiB" in body["error"]
    status, body = _post_chunked(server.url + "/api/chat", 10)  # the same framing, small
    assert status == 200 and body["done"] is True


# ---- a full server answers 503 with Retry-After -------------------------------------------------


def _at_once(count: int, action) -> list:
    """`action()` from `count` threads released together; their results."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        results[i] = action()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_a_full_model_queue_answers_503_with_retry_after(serve):
    """NUM_PARALLEL 1 + MAX_QUEUE 1: two of eight long chats are taken, the rest hear 503."""
    server = serve(ORTSERVE_NUM_PARALLEL="1", ORTSERVE_MAX_QUEUE="1", ORTSERVE_THREADS="16")
    assert call(server.url + "/api/chat", CHAT)[0] == 200
    long_chat = {**CHAT, "options": {"num_predict": 900}}
    results = _at_once(8, lambda: call(server.url + "/api/chat", long_chat))
    statuses = sorted(status for status, _, _ in results)
    print(f"8 concurrent chats, parallel 1, queue 1: statuses {statuses}")
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1
    assert set(statuses) <= {200, 503}
    for status, body, headers in results:
        if status == 503:
            assert headers["Retry-After"].isdigit() and "busy" in body["error"]
    openai = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": 900}  # fmt: skip
    results = _at_once(8, lambda: call(server.url + "/v1/chat/completions", openai))
    refused = [(body, headers) for status, body, headers in results if status == 503]
    assert refused and all(b["error"]["type"] == "server_busy" and h["Retry-After"]
                           for b, h in refused)  # fmt: skip


def test_generation_beyond_the_threads_answers_503_and_health_still_answers(serve):
    """4 threads: 3 generation slots; slow uploads hold them; the 4th chat hears 503 at once."""
    server = serve(ORTSERVE_THREADS="4")
    assert call(server.url + "/api/chat", CHAT)[0] == 200
    # bodies past the main loop's buffer go to a thread, which waits for the rest
    uploads = [connect(server, head("/api/chat", f"Content-Length: {4 * MIB}") + b" " * (2 * MIB))
               for _ in range(3)]  # fmt: skip
    try:
        time.sleep(0.5)
        started = time.monotonic()
        status, body, headers = call(server.url + "/api/chat", CHAT)
        assert status == 503 and int(headers["Retry-After"]) >= 1, body
        assert "ORTSERVE_THREADS" in body["error"] and time.monotonic() - started < 1
        status, seconds = timed(server.url + "/healthz")
        assert status == 200 and seconds < 1
        assert call(server.url + "/api/tags")[0] == 200
    finally:
        for sock in uploads:
            sock.close()  # their reads fail, their slots are given back
    deadline = time.monotonic() + 10
    while (
        status := call(server.url + "/api/chat", CHAT)[0]
    ) == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200


# ---- integrity at load --------------------------------------------------------------------------


def test_a_corrupted_bundle_refuses_to_load_and_verify_agrees(serve, own_library):
    server = serve(library=own_library)
    assert call(server.url + "/api/chat", CHAT)[0] == 200
    unload = {"model": "tiny-chat", "keep_alive": 0}
    assert call(server.url + "/api/generate", unload)[0] == 200
    weights = own_library.get("tiny-chat").path / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    for at in range(1000, 1064):  # bytes flipped in the weights, the size unchanged
        data[at] ^= 0xFF
    weights.write_bytes(bytes(data))

    status, body, _ = call(server.url + "/api/chat", CHAT)
    assert status == 500 and '"tiny-chat:latest"' in body["error"], body
    assert "model.onnx.data" in body["error"]
    assert str(own_library.root) not in body["error"] and "/" not in body["error"]
    status, body, _ = call(server.url + "/v1/chat/completions",
                           {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert status == 500 and "damaged" in body["error"]["message"]

    verify = subprocess.run([sys.executable, "-m", "ortserve", "verify"], capture_output=True,
                            text=True, env={**os.environ, "ORTSERVE_MODELS": str(own_library.root)})  # fmt: skip
    assert verify.returncode == 1 and "model.onnx.data" in verify.stdout
