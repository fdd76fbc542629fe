"""Push to the test hub and pull back: the real huggingface-hub client, the real push and pull
code, tests/hub.py's commit API; hand-made bundles (tests/unit/test_pull.py), no engine."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from ortserve.errors import InvalidRequest, PullCancelled, SourceUnavailable
from ortserve.library import Library
from ortserve.library.modelfile import render_modelfile
from ortserve.models import pushed
from ortserve.models.pull import pull
from ortserve.models.push import PushTarget, parse_target, push
from tests.hub import LocalHub
from tests.support.bundles import hand_made_bundle

TEMPLATE = "{{ range .Messages }}{{ .Content }}{{ end }}"
ADAPTER = b"TORT" + bytes(range(200))  # the blob's bytes: push and pull never parse it


@pytest.fixture
def source(tmp_path) -> Library:
    """A library with a model that has every manifest part a push carries."""
    library = Library(tmp_path / "source")
    _add_model(library, "tiny")
    return library


def _add_model(library: Library, name: str) -> None:
    from io import BytesIO

    with library.staging("test") as staged:
        bundle = staged / "bundle"
        hand_made_bundle(bundle, [])
        (bundle / "model.onnx.data").write_bytes(bytes(range(256)) * 64)  # a second LFS file
        digest = "sha256:" + hashlib.sha256(ADAPTER).hexdigest()
        library.add_blob(BytesIO(ADAPTER), digest)
        library.add(name, bundle, _manifest(digest))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The test hub as HF_ENDPOINT, and as the endpoint huggingface-hub read at its import
    (which it uses to parse the commit URLs a commit answers)."""
    from huggingface_hub import constants, file_download

    running = LocalHub().start()
    monkeypatch.setenv("HF_ENDPOINT", running.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", running.url)
    template = running.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    yield running
    running.stop()


def _manifest(adapter_digest: str) -> dict:
    return {
        "details": {"family": "qwen2", "format": "onnx", "quantization": "int4"},
        "capabilities": ["completion"],
        "template": TEMPLATE,
        "system": "You are terse.\nVery terse.",
        "parameters": {"temperature": 0.2, "stop": ["<|end|>", "###"], "num_ctx": 64},
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "adapters": [{"name": "style", "digest": adapter_digest}],
        "license": "MIT License\n\nCopyright the authors.",
        "source": {"source": "test"},
    }


def _same_modelfile(a, b) -> None:
    """Equal Modelfiles but for the library roots and names (the bundle digest is in FROM)."""

    def normal(info):
        text = render_modelfile(info).replace(str(info.path.parent.parent), "LIBRARY")
        return text.replace(info.name, "NAME")

    assert normal(a) == normal(b)


def _oid(library: Library, name: str, path: str) -> str:
    return hashlib.sha256((library.get(name).path / path).read_bytes()).hexdigest()


# ---- destinations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo", "variant"),
    [
        ("hf.co/org/repo:cpu-int4", "org/repo", "cpu-int4"),
        ("huggingface.co/org/repo", "org/repo", None),
        ("org/repo:latest", "org/repo", None),
        ("org/repo", "org/repo", None),
    ],
)
def test_destinations_parse(text, repo, variant):
    assert parse_target(text) == PushTarget(repo, variant)


@pytest.mark.parametrize(
    "text",
    ["tiny", "tiny:latest", "org/repo@main", "org/repo:..", "org/repo:ortserve-adapters", ""],
)
def test_bad_destinations_are_400_naming_the_field(text):
    with pytest.raises(InvalidRequest) as error:
        parse_target(text)
    assert error.value.param == "destination"


def test_a_model_not_named_after_a_repository_needs_a_destination(hub, source):
    with pytest.raises(InvalidRequest, match="named after its destination") as error:
        push("tiny", library=source)
    assert error.value.param == "model"
    assert hub.requests("POST") == []


# ---- push, then pull elsewhere -----------------------------------------------------------------


def test_pull_of_a_push_makes_the_same_model(hub, source, tmp_path):
    events = []
    result = push("tiny", "hf.co/org/pushed:cpu-int4", library=source, progress=events.append)

    statuses = [e.status for e in events]
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
    assert any(e.status.startswith("pushing ") and e.completed == e.total for e in events)
    assert len(hub.commits) == 1 and result.commit == hub.repos["org/pushed"].commit
    files = hub.files("org/pushed")
    assert "cpu-int4/ortserve-manifest.json" in files and ".gitattributes" in files
    adapter = pushed.adapter_path(source.get("tiny").manifest["adapters"][0]["digest"])
    assert files[f"cpu-int4/{adapter}"] == ADAPTER
    assert "cpu-int4/ortserve-files.json" not in files

    target = Library(tmp_path / "elsewhere")
    info = pull("hf.co/org/pushed:cpu-int4", library=target)
    original = source.get("tiny")
    assert info.digest == original.digest
    for key in pushed.FIELDS:
        assert info.manifest[key] == original.manifest[key], key
    assert target.has_blob(original.manifest["adapters"][0]["digest"])
    _same_modelfile(original, info)
    assert target.verify(info.name)[0].ok


def test_a_model_named_after_its_destination_pushes_to_the_root(hub, source, tmp_path):
    source.copy("tiny", "hf.co/org/named")
    push("hf.co/org/named:latest", library=source)

    files = hub.files("org/named")
    assert "genai_config.json" in files and "ortserve-manifest.json" in files
    info = pull("hf.co/org/named", library=Library(tmp_path / "elsewhere"))
    # the hub's .gitattributes beside the bundle is not part of it
    assert info.digest == source.get("tiny").digest
    _same_modelfile(source.get("tiny"), info)


def test_a_second_push_replaces_the_variant_and_an_identical_one_commits_nothing(
    hub,
    source,
    tmp_path,
):
    push("tiny", "org/pushed:v1", library=source)
    first = hub.repos["org/pushed"].commit
    again = push("tiny", "org/pushed:v1", library=source)
    assert again.commit is None and hub.repos["org/pushed"].commit == first

    with source.staging("other") as staged:  # another bundle under the same destination
        bundle = staged / "bundle"
        hand_made_bundle(bundle, [{"cuda": {}}])
        source.add("other", bundle, {"parameters": {}, "license": None})
    push("other", "org/pushed:v1", library=source)

    files = hub.files("org/pushed")
    assert "v1/model.onnx.data" not in files  # the previous push's leftovers went
    assert not any(p.startswith(f"v1/{pushed.ADAPTER_FOLDER}/") for p in files)
    info = pull("org/pushed:v1", library=Library(tmp_path / "elsewhere"))
    assert info.digest == source.get("other").digest


# ---- interrupted, resumed ----------------------------------------------------------------------


def test_an_interrupted_push_shows_nothing_and_resumes_without_resending(hub, source):
    graph, data = _oid(source, "tiny", "model.onnx"), _oid(source, "tiny", "model.onnx.data")
    cancel = threading.Event()

    def stop_after_the_graph(event):
        if event.digest == f"sha256:{graph}" and event.completed == event.total:
            cancel.set()

    with pytest.raises(PullCancelled, match="push again to resume"):
        push("tiny", "org/resumed:cpu", library=source, progress=stop_after_the_graph,
             cancel=cancel)  # fmt: skip
    assert hub.commits == []  # nothing half-written is visible
    assert set(hub.files("org/resumed")) == {".gitattributes"}
    assert len(hub.uploads(graph)) == 1 and hub.uploads(data) == []

    push("tiny", "org/resumed:cpu", library=source)

    assert len(hub.uploads(graph)) == 1  # the hub had it: not sent again
    assert len(hub.uploads(data)) == 1
    assert len(hub.commits) == 1 and "cpu/model.onnx.data" in hub.files("org/resumed")


# ---- the token ---------------------------------------------------------------------------------


def test_writes_carry_hf_token_and_a_refusal_says_to_set_it(hub, source, monkeypatch):
    hub.write_token = "hf_test_write"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    with pytest.raises(SourceUnavailable, match="HF_TOKEN") as error:
        push("tiny", "org/private:cpu", library=source)
    assert "401" in error.value.message
    assert hub.commits == []

    monkeypatch.setenv("HF_TOKEN", "hf_test_write")
    push("tiny", "org/private:cpu", library=source)
    commit = hub.requests("POST", "/api/models/org/private/commit/")
    assert [r.authorization for r in commit] == ["Bearer hf_test_write"]
    assert len(hub.commits) == 1


# ---- the manifest file from the hub is checked -------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bundle": "sha256-" + "0" * 64}, "bundle"),
        ({"files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}, "files[0]"),
        ({"template": 3}, "template"),
        ({"parameters": {"temperature": "hot"}}, "temperature"),
        ({"adapters": [{"name": "a", "digest": "md5:1"}]}, "adapters"),
        ({"format": "other"}, "format"),
    ],
)
def test_a_bad_manifest_file_is_refused_naming_the_field(source, tmp_path, change, field):
    info = source.get("tiny")
    index = json.loads((info.path / "ortserve-files.json").read_text())
    path = tmp_path / pushed.MANIFEST_FILE
    path.write_text(json.dumps({**pushed.build(info, index), **change}))
    with pytest.raises(SourceUnavailable, match=field.replace("[", r"\[")):
        pushed.read(path, "hf.co/org/repo")
    path.write_text(json.dumps(pushed.build(info, index)))
    assert pushed.read(path, "hf.co/org/repo").bundle == info.digest


# ---- POST /api/push ------------------------------------------------------------------------------


class _Runtime:
    """What the app asks of a runtime here: its library."""

    def __init__(self, library):
        self.library = library


@pytest.fixture
def runtime(library):
    return _Runtime(library)


def test_api_push_streams_progress_and_validates(hub, library, client):
    _add_model(library, "tiny")
    assert client.post("/api/push", json={"model": "tiny", "destination": 3}).status_code == 400
    missing = client.post("/api/push", json={"model": "nope", "destination": "org/x"})
    assert missing.status_code == 404
    bad = client.post("/api/push", json={"model": "tiny"})
    assert bad.status_code == 400 and "destination" in bad.get_json()["error"]
    assert hub.requests("POST") == []

    response = client.post("/api/push", json={"model": "tiny", "destination": "org/api:cpu"})
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert lines[0] == {"status": "retrieving manifest"}
    assert lines[-1] == {"status": "success"}
    layer = next(
        line for line in lines if line["status"].startswith("pushing ") and "total" in line
    )
    assert layer["digest"].startswith("sha256:") and layer["completed"] in (0, layer["total"])
    assert "cpu/ortserve-manifest.json" in hub.files("org/api")

    # Ollama's form: the model is named after its destination, `name` from older clients
    library.copy("tiny", "hf.co/org/ollama:cpu")
    whole = client.post("/api/push", json={"name": "hf.co/org/ollama:cpu", "stream": False})
    assert whole.status_code == 200 and whole.get_json() == {"status": "success"}
    assert "cpu/genai_config.json" in hub.files("org/ollama")
