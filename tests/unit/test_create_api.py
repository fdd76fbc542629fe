"""POST /api/create through Flask's test client: validation (400s naming fields), statuses."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.bundles import write_bundle
from tests.support.http import lines


class RecordingRuntime:
    """Only what /api/create asks of a runtime: unload a model it replaced."""

    def __init__(self, library):
        self.library = library
        self.unloaded = []

    def unload(self, name):
        self.unloaded.append(name)
        return False


@pytest.fixture
def runtime(library):
    return RecordingRuntime(library)


def test_create_streams_statuses(client, library, base, runtime):
    body = {
        "model": "pirate",
        "from": "base",
        "system": "Arr.",
        "parameters": {"num_predict": 3, "stop": ["x", "y"]},
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}],
        "license": ["MIT", "more"],
        "template": "{{ messages[0].content }}",
    }
    response = client.post("/api/create", json=body)
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    assert lines(response) == [
        {"status": f"using existing layer {base.digest.replace('-', ':', 1)}"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    m = library.get("pirate").manifest
    assert m["bundle"] == base.digest and m["system"] == "Arr."
    assert m["parameters"] == {"temperature": 0.7, "top_k": 20, "num_predict": 3,
                               "stop": ["x", "y"]}  # fmt: skip
    assert m["messages"] == body["messages"] and m["license"] == "MIT\nmore"
    assert m["template"] == "{{ messages[0].content }}"
    assert runtime.unloaded == ["pirate:latest"]  # a loaded old version must not linger


def test_create_without_streaming_and_the_older_name_field(client, library, base):
    response = client.post("/api/create", json={"name": "n", "from": "base", "stream": False})
    assert response.status_code == 200 and response.get_json() == {"status": "success"}
    assert library.get("n").digest == base.digest


def test_create_from_uploaded_files(client, library, tmp_path):
    folder = write_bundle(tmp_path / "bundle", b"weights")
    files = {}
    for path in folder.iterdir():
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert client.post(f"/api/blobs/{digest}", data=path.read_bytes()).status_code == 201
        files[path.name] = digest
    response = client.post("/api/create", json={"model": "up", "files": files, "stream": False})
    assert response.status_code == 200, response.get_json()
    assert (library.get("up").path / "model.onnx").read_bytes() == b"weights"


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"from": "base"}, 400, "model is required"),
        ({"model": "x", "from": 3}, 400, "from: 3 is not of type 'string'"),
        ({"model": "x", "from": "base", "system": ["a"]}, 400, "system: ['a'] is not of type"),
        ({"model": "x", "from": "base", "parameters": []}, 400, "parameters: [] is not of type"),
        ({"model": "x", "from": "base", "parameters": {"temprature": 1}}, 400,
         'unknown option "temprature"'),
        ({"model": "x", "from": "base", "parameters": {"temperature": "hot"}}, 400,
         "parameters.temperature: 'hot' is not of type"),
        ({"model": "x", "from": "base", "messages": [{"role": "robot", "content": "x"}]}, 400,
         "messages[0].role: 'robot' is not one of"),
        ({"model": "x", "from": "base", "messages": [{"role": "user"}]}, 400,
         "messages[0].content is required"),
        ({"model": "x", "from": "base", "license": 5}, 400, "license: 5 is not valid"),
        ({"model": "x", "from": "base", "quantize": "q5_K_M"}, 400, 'quantize: "q5_K_M" is not'),
        ({"model": "x", "from": "base", "quantize": "q4_K_M"}, 400, "already quantized (int4)"),
        ({"model": "x", "from": "base", "template": "{% if %}"}, 400, "template: invalid chat"),
        ({"model": "x", "from": "base", "stream": "yes"}, 400, "stream: 'yes' is not of type"),
        ({"model": "x", "files": {"a": "sha256:12"}}, 400, "files.a: 'sha256:12' does not match"),
        ({"model": "x", "files": {"a": "sha256:" + "0" * 64}}, 400, "is not on the server"),
        ({"model": "x", "adapters": {"a": "sha256:" + "0" * 64}, "from": "base"}, 400,
         "adapters: blob"),
        ({"model": "x", "from": "nothing"}, 404, 'model "nothing:latest" not found'),
        ({"model": "x"}, 400, "from is required"),
        ({"model": "../x", "from": "base"}, 400, "invalid model name"),
        ({"model": "x", "modelfile": "FROM base"}, 400, '"modelfile" is not supported'),
        ({"model": "x", "from": "/etc"}, 400, "from: invalid model name '/etc'"),
    ],
)  # fmt: skip
def test_errors_before_streaming_name_the_field(client, library, base, body, status, message):
    response = client.post("/api/create", json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    assert message in response.get_json()["error"]
    assert not library.exists("x")


def test_malformed_json(client):
    response = client.post("/api/create", data="{", content_type="application/json")
    assert response.status_code == 400 and response.get_json() == {"error": "invalid JSON body"}


def test_an_error_after_streaming_started_is_the_last_line(client, library, base, monkeypatch):
    from ortserve.errors import LibraryCorrupt

    def broken_save(*args, **kwargs):
        raise LibraryCorrupt("disk on fire")

    monkeypatch.setattr(library.__class__, "save", broken_save)
    response = client.post("/api/create", json={"model": "x", "from": "base"})
    assert response.status_code == 200
    assert lines(response)[-1] == {"error": "disk on fire"}
