"""Keys, Host and Origin checks on a real `ortserve serve`, with the real clients and the CLI."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys

import ollama
import openai
import pytest

pytestmark = pytest.mark.slow

KEY = "sk-integration-0123456789"


@pytest.fixture(scope="module")
def keyed_server(served_library):
    from tests.integration.conftest import Server

    running = Server(served_library, ORTSERVE_API_KEYS=f"alice:{KEY}")
    yield running
    running.stop()


def _raw(server, method: str, path: str, body: str = "", **headers: str):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body=body or None, headers=headers)
    response = connection.getresponse()
    return response.status, response.read().decode()


def test_clients_with_the_key_are_served_and_without_it_refused(keyed_server):
    chat = [{"role": "user", "content": "hi"}]
    oai = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY)
    answer = oai.chat.completions.create(model="tiny-chat", messages=chat, max_tokens=4)
    assert answer.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=keyed_server.url + "/v1", api_key="sk-wrong-key-000000"
        ).models.list()
    client = ollama.Client(host=keyed_server.url, headers={"Authorization": f"Bearer {KEY}"})
    assert client.chat(model="tiny-chat", messages=chat, options={"num_predict": 4}).done
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=keyed_server.url).list()
    assert info.value.status_code == 401
    assert _raw(keyed_server, "GET", "/healthz")[0] == 200


def test_the_cli_sends_ortserve_api_key(keyed_server):
    env = {**keyed_server.env, "ORTSERVE_API_KEY": KEY}
    run = subprocess.run([sys.executable, "-m", "ortserve", "run", "tiny-chat", "hi"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    ps = subprocess.run([sys.executable, "-m", "ortserve", "ps"], env=env,
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "tiny-chat:latest" in ps.stdout
    without = {k: v for k, v in env.items() if k != "ORTSERVE_API_KEY"}
    refused = subprocess.run([sys.executable, "-m", "ortserve", "ps"], env=without,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "Error: an API key is required: send Authorization: Bearer <key> or x-api-key: <key>"
    )


def test_dns_rebinding_and_cross_site_posts_are_refused(server, served_library):
    assert _raw(server, "GET", "/api/tags", Host="evil.example")[0] == 403
    assert _raw(server, "GET", "/api/tags", Host=f"127.0.0.1:{server.port}")[0] == 200
    body = '{"source": "tiny-chat", "destination": "planted"}'
    status, text = _raw(server, "POST", "/api/copy", body, Origin="http://evil.example",
                        **{"Content-Type": "text/plain"})  # fmt: skip
    assert status == 403 and "ORTSERVE_ORIGINS" in text
    assert not served_library.exists("planted")  # any web page could change the library before
    status, _ = _raw(server, "POST", "/api/copy", body, **{"Content-Type": "text/plain"})
    assert status == 415 and not served_library.exists("planted")


def test_local_names_and_private_addresses_pass_the_host_guard_as_with_ollama(server):
    """Open WebUI in Docker reaches the host as host.docker.internal; mDNS names, this
    machine's hostname and LAN addresses are answered too, as Ollama answers them."""
    import socket

    for host in ("host.docker.internal", "myhost.local", socket.gethostname(), "192.168.1.5"):
        assert _raw(server, "GET", "/api/tags", Host=f"{host}:{server.port}")[0] == 200, host
    for host in ("evil.example", "8.8.8.8", "localhost.evil.example"):
        assert _raw(server, "GET", "/api/tags", Host=f"{host}:{server.port}")[0] == 403, host


def test_a_page_on_localhost_gets_cors_headers(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("OPTIONS", "/api/chat", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"})  # fmt: skip
    response = connection.getresponse()
    response.read()
    assert response.status == 204
    assert response.getheader("Access-Control-Allow-Origin") == "http://localhost:5173"


def test_an_exposed_server_without_keys_warns_at_start(served_library):
    from tests.support.http import free_port

    env = {**os.environ, "ORTSERVE_MODELS": str(served_library.root),
           "ORTSERVE_HOST": f"0.0.0.0:{free_port()}"}  # fmt: skip
    env.pop("ORTSERVE_API_KEYS", None)
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "serve"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("warning:") or len(lines) > 50:
                break
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert any(line.startswith("ortserve listening on http://0.0.0.0:") for line in lines)
    assert lines[-1].startswith("warning: ortserve is reachable beyond this machine (0.0.0.0)")


def test_serve_on_a_busy_port_says_who_holds_it(server, served_library):
    import http.server
    import threading

    def serve_on(port: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "ORTSERVE_MODELS": str(served_library.root),
               "ORTSERVE_HOST": f"127.0.0.1:{port}"}  # fmt: skip
        return subprocess.run([sys.executable, "-m", "ortserve", "serve"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    taken = serve_on(server.port)
    assert taken.returncode == 1
    assert taken.stderr.strip().startswith(
        f"Error: 127.0.0.1:{server.port} is in use by ortserve "
    ), taken.stderr
    assert f"ORTSERVE_HOST=127.0.0.1:{server.port + 1}" in taken.stderr
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        held = serve_on(other.server_port)
    finally:
        other.shutdown()
    assert "is in use by another server (SimpleHTTP" in held.stderr
