"""API keys, the Host guard, Origin checks and CORS, and JSON-only bodies, on the real app."""

from __future__ import annotations

import pytest
from flask import Flask

from ortserve.api import create_app, init_app
from ortserve.config import Settings, SettingsError

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-ci-fedcba9876543210"


def make(library, **settings):
    app = create_app(Settings(models=library.root, **settings))
    app.testing = True
    return app.test_client()


# ---- API keys ------------------------------------------------------------------------------


@pytest.fixture
def keyed(library):
    return make(library, api_keys=(("alice", KEY), ("ci", OTHER)))


def test_without_keys_configured_nothing_is_asked(library):
    assert make(library).get("/api/tags").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": OTHER}, {"Authorization": f"bearer {KEY}"}],
)
def test_a_valid_key_in_either_header_is_accepted(keyed, headers):
    assert keyed.get("/api/tags", headers=headers).status_code == 200
    assert keyed.get("/v1/models", headers=headers).status_code == 200


def test_a_missing_or_wrong_key_is_401_in_each_protocols_shape(keyed):
    native = keyed.get("/api/tags")
    assert native.status_code == 401
    assert native.get_json() == {
        "error": "an API key is required: send Authorization: Bearer <key> or x-api-key: <key>"
    }
    assert native.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = keyed.get("/v1/models", headers={"Authorization": "Bearer sk-not-the-key-at-all"})
    assert wrong.status_code == 401
    assert wrong.get_json() == {"error": {"message": "invalid API key",
                                          "type": "authentication_error", "param": None,
                                          "code": "invalid_api_key"}}  # fmt: skip
    basic = keyed.get("/api/tags", headers={"Authorization": f"Basic {KEY}"})
    assert basic.status_code == 401


def test_health_checks_stay_open(keyed):
    for path in ("/", "/healthz", "/readyz"):
        assert keyed.get(path).status_code in (200, 503), path
        assert keyed.get(path).status_code != 401


def test_keys_come_from_the_variable_or_a_file(tmp_path):
    settings = Settings.from_env({"ORTSERVE_API_KEYS": f"alice:{KEY}, {OTHER}"})
    assert settings.api_keys == (("alice", KEY), ("key2", OTHER))
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice:{KEY}\nci:{OTHER}  # the CI job\n")
    settings = Settings.from_env({"ORTSERVE_API_KEYS": f"@{path}"})
    assert settings.api_keys == (("alice", KEY), ("ci", OTHER))


@pytest.mark.parametrize(
    ("value", "why"),
    [("alice:short", "shorter than 16"), ("@/no/such/file", "cannot read"), (" , ", "no keys")],
)
def test_bad_keys_stop_start_up_naming_the_variable(value, why):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ORTSERVE_API_KEYS": value})
    assert info.value.message.startswith("ORTSERVE_API_KEYS is invalid: ")
    assert why in info.value.message


# ---- Host guard ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:11434", "127.0.0.1:11434", "127.8.9.1", "[::1]:11434",
             "app.localhost"],
)  # fmt: skip
def test_loopback_hosts_are_answered(library, host):
    assert make(library).get("/api/tags", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["host.docker.internal:11434", "myhost.local", "MyHost.Local:8080", "192.168.1.5",
             "10.0.0.7:11434", "172.31.255.1", "[fd00::5]:11434", "0.0.0.0:11434",
             "[::ffff:192.168.1.5]"],
)  # fmt: skip
def test_local_names_and_private_addresses_are_answered_as_ollama_does(library, host):
    """Ollama's allowedHost: an Open WebUI container reaching the host as
    host.docker.internal, mDNS names, LAN addresses (a proxy or a VM on the same machine)."""
    assert make(library).get("/api/tags", headers={"Host": host}).status_code == 200


def test_this_machines_own_hostname_and_addresses_are_answered(library):
    import socket

    import psutil

    client = make(library)
    assert client.get("/api/tags", headers={"Host": socket.gethostname()}).status_code == 200
    own = [a.address for entries in psutil.net_if_addrs().values() for a in entries
           if a.family == socket.AF_INET]  # fmt: skip
    for address in own:
        assert client.get("/api/tags", headers={"Host": address}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:11434", "[fe80::1]", "8.8.8.8", "169.254.1.1",
             "localhost.evil.example", "evil.local.example", "internal"],
)  # fmt: skip
def test_other_hosts_are_403_while_bound_to_loopback(library, host):
    response = make(library).get("/api/tags", headers={"Host": host})
    assert response.status_code == 403
    assert "ORTSERVE_ALLOWED_HOSTS" in response.get_json()["error"]


def test_allowed_hosts_extend_the_list_and_a_public_bind_checks_none(library):
    allowed = make(library, allowed_hosts=("models.corp.example",))
    assert allowed.get("/api/tags", headers={"Host": "models.corp.example"}).status_code == 200
    assert allowed.get("/api/tags", headers={"Host": "evil.example"}).status_code == 403
    public = make(library, host="0.0.0.0")
    assert public.get("/api/tags", headers={"Host": "evil.example"}).status_code == 200


# ---- Origin and CORS -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["http://localhost", "http://localhost:3000", "https://127.0.0.1:8443",
               "http://0.0.0.0:5173", "app://desktop", "tauri://localhost",
               "vscode-webview://abc123", "file://"],
)  # fmt: skip
def test_ollamas_default_origins_are_allowed_with_cors_headers(library, origin):
    response = make(library).get("/api/tags", headers={"Origin": origin})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "chrome-extension://abc"])
def test_a_disallowed_origin_is_refused_simple_requests_included(library, origin):
    client = make(library)
    response = client.post(
        "/api/copy", data='{"source": "a", "destination": "b"}',
        headers={"Origin": origin, "Content-Type": "text/plain"},
    )  # fmt: skip
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    form = client.post("/api/delete", data={"model": "a"}, headers={"Origin": origin})
    assert form.status_code == 403


def test_origins_extend_the_defaults(library):
    client = make(library, origins=("chrome-extension://*",))
    response = client.get("/api/tags", headers={"Origin": "chrome-extension://abc"})
    assert response.headers["Access-Control-Allow-Origin"] == "chrome-extension://abc"


def test_a_preflight_for_an_allowed_origin_is_answered(library):
    response = make(library, api_keys=(("alice", KEY),)).options(
        "/v1/chat/completions",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    )  # fmt: skip
    assert response.status_code == 204  # no key needed: a browser sends none on preflight
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"


def test_a_preflight_for_another_origin_is_403(library):
    response = make(library).options(
        "/api/chat",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 403


# ---- JSON only -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x"])
def test_json_endpoints_refuse_bodies_declared_as_another_type(library, content_type):
    response = make(library).post(
        "/api/show", data='{"model": "x"}', headers={"Content-Type": content_type}
    )
    assert response.status_code == 415
    assert "application/json" in response.get_json()["error"]


def test_curl_d_without_a_browser_origin_still_works(library):
    # curl -d sends application/x-www-form-urlencoded; Ollama reads it as JSON, so does ortserve
    response = make(library).post(
        "/api/show", data='{"model": "x"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert response.status_code == 404  # read as JSON: the model does not exist


def test_a_host_app_keeps_its_own_routes_unguarded(library):
    app = Flask("host")

    @app.get("/mine")
    def mine():
        return "mine"

    init_app(app, Settings(models=library.root, api_keys=(("alice", KEY),)), url_prefix="/llm")
    client = app.test_client()
    assert client.get("/mine", headers={"Origin": "http://evil.example"}).status_code == 200
    assert client.get("/llm/api/tags").status_code == 401
    assert client.get("/llm/api/tags", headers={"x-api-key": KEY}).status_code == 200
