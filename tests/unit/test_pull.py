"""Pull plumbing against the test hub: references, variant choice, files fetched, digests,
locking. The bundles here are small hand-made ones (a config, a tokenizer, a stand-in graph):
they test what is downloaded and recorded, not that a model runs (tests/integration does)."""

from __future__ import annotations

import json
import threading

import pytest

from ortserve.errors import (
    InvalidName,
    InvalidRequest,
    OrtServeError,
    SourceUnavailable,
    UnsupportedModel,
)
from ortserve.library.names import ModelName
from ortserve.models import catalog
from ortserve.models.pull import (
    ConverterMissing,
    PullRef,
    RepoFile,
    RepoNotFound,
    Snapshot,
    choose_variant,
    git_blob_id,
    pull,
    resolve,
    variant_provider,
)
from tests.hub import LocalHub
from tests.support.bundles import hand_made_bundle
from tests.support.wait import wait_for

PROVIDER_OPTIONS = {"cuda-fp16": [{"cuda": {}}], "directml-int4": [{"dml": {}}]}


# ---- references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, repo, variant, revision",
    [
        ("hf.co/org/repo", "org/repo", None, None),
        ("org/Repo-1.5B", "org/Repo-1.5B", None, None),
        ("hf.co/org/repo:cpu-int4", "org/repo", "cpu-int4", None),
        ("org/repo:cpu-int4@main", "org/repo", "cpu-int4", "main"),
        ("org/repo@0123abc:cuda-fp16", "org/repo", "cuda-fp16", "0123abc"),
        ("huggingface.co/org/repo@v1", "org/repo", None, "v1"),
    ],
)
def test_refs_parse(text, repo, variant, revision):
    ref = PullRef.parse(text)
    assert (ref.repo, ref.variant, ref.revision, ref.local) == (repo, variant, revision, None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "a b",
        "llama3.2@main",
        "hf.co/a/b/c",
        "org/repo:a:b",
        "org/repo:a/b",
        "org/../x",
        "-org/repo",
        "org/repo@",
    ],
)
def test_bad_refs_are_400_naming_the_field(text):
    with pytest.raises(InvalidRequest) as error:
        PullRef.parse(text)
    assert error.value.status == 400 and error.value.param == "model"


def test_default_names_follow_ollama(tmp_path):
    assert PullRef.parse("hf.co/Org/Repo").default_name() == "hf.co/Org/Repo:latest"
    assert PullRef.parse("huggingface.co/org/repo:x").default_name() == "hf.co/org/repo:x"
    assert PullRef.parse("org/repo:cpu-int4@main").default_name() == "org/repo:cpu-int4"
    folder = tmp_path / "My Model"
    folder.mkdir()
    local = PullRef.parse(f"{folder}:fp32")
    assert local.local == folder and local.variant == "fp32"
    assert local.default_name() == "my-model:fp32"


@pytest.mark.parametrize(
    "text, name",
    [
        ("llama3.2", "llama3.2:latest"),
        ("qwen2.5:0.5b", "qwen2.5:0.5b"),
        ("Phi4-Mini", "Phi4-Mini:latest"),
    ],
)
def test_a_bare_name_is_a_catalog_reference_named_as_typed(text, name):
    ref = PullRef.parse(text)
    assert (ref.repo, ref.local, ref.catalog) == (None, None, ModelName.parse(text))
    assert ref.default_name() == name
    assert PullRef.parse(text, local=False).catalog == ModelName.parse(text)


def test_a_directory_of_that_name_comes_before_the_catalog(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama3.2").mkdir()
    assert PullRef.parse("llama3.2").local == tmp_path / "llama3.2"
    assert PullRef.parse("llama3.2", local=False).catalog is not None  # a client's: never disk


# ---- the catalog of short names --------------------------------------------------------------


def test_the_shipped_catalog_names_the_ollama_models_and_each_pulls_on_a_cpu():
    shipped = catalog.load()
    for name, expected in [
        ("llama3.2", "llama3.2:3b"),
        ("llama3.2:1b", "llama3.2:1b"),
        ("qwen2.5:0.5b", "qwen2.5:0.5b"),
        ("qwen3:0.6b", "qwen3:0.6b"),
        ("phi4-mini", "phi4-mini:3.8b"),
        ("gemma3:1b", "gemma3:1b"),
        ("all-minilm", "all-minilm:22m"),
        ("ALL-MINILM:L6-V2", "all-minilm:22m"),
    ]:
        assert shipped.lookup(ModelName.parse(name)).name == expected
    for entry in shipped.entries():  # a CPU bundle or a checkpoint: every machine can pull it
        choice = catalog.choose(entry, ["cpu"])
        assert choice.provider == "cpu" or choice.source.precision in ("int4", "int8"), entry
    embedding = catalog.choose(shipped.lookup(ModelName.parse("all-minilm")), ["cpu"]).source
    assert embedding == catalog.Source("sentence-transformers/all-MiniLM-L6-v2", precision="int8")


@pytest.mark.parametrize(
    "providers, variant",
    [
        (["cpu"], "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"),
        (["cuda", "cpu"], "gpu/gpu-int4-rtn-block-32"),
        (["dml", "cpu"], "gpu/gpu-int4-rtn-block-32"),
        (["webgpu", "cpu"], "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"),
    ],
)
def test_the_bundle_for_the_best_usable_provider_is_chosen(providers, variant):
    entry = catalog.load().lookup(ModelName.parse("phi4-mini"))
    choice = catalog.choose(entry, providers)
    assert choice.source.repo == "microsoft/Phi-4-mini-instruct-onnx"
    assert choice.source.variant == variant
    converted = catalog.choose(entry, providers, convert=True)  # a precision asked for
    assert converted.provider is None and converted.source.repo == "microsoft/Phi-4-mini-instruct"


def test_without_a_bundle_for_any_provider_the_checkpoint_is_converted():
    qwen = catalog.load().lookup(ModelName.parse("qwen2.5:0.5b"))
    assert catalog.choose(qwen, ["cuda", "cpu"]).describe() == "convert int4"
    only_cuda = catalog.Entry("m", "t", {"cuda": catalog.Source("o/r", "cuda")}, None)
    with pytest.raises(SourceUnavailable, match=r"bundles for cuda only, none for .*\(cpu\)"):
        catalog.choose(only_cuda, ["cpu"])


@pytest.mark.parametrize(
    "name, message",
    [
        ("llama3", "unknown model 'llama3': not in the catalog of short names (close: llama3.2"),
        ("mistral", "(it has all-minilm, gemma3, llama3.2,"),
        (
            "qwen2.5:99b",
            "qwen2.5 has no tag '99b' in the catalog; tags: 0.5b, 1.5b, 3b, 7b, latest",
        ),
        ("gemma3", "gemma3 has no default tag in the catalog; tags: 1b"),
    ],
)
def test_an_unknown_name_or_tag_is_a_404_naming_close_ones(name, message):
    with pytest.raises(RepoNotFound) as error:
        catalog.load().lookup(ModelName.parse(name))
    assert message in error.value.message
    assert error.value.status == 404 and error.value.param == "model"


def test_the_library_root_and_ortserve_catalog_extend_the_shipped_catalog(tmp_path, monkeypatch):
    root = tmp_path / "models"
    root.mkdir()
    _write_catalog(root / "catalog.json", {
        "qwen2.5": {"tags": {"0.5b": {"checkpoint": {"repo": "me/qwen-fork", "precision": "int8"}},
                             "latest": "0.5b"}},
        "mine": {"tags": {"latest": "x", "x": {"bundles": {"cpu": {"repo": "me/mine"}}}}},
    })  # fmt: skip
    named = _write_catalog(tmp_path / "extra.json", {
        "MINE": {"tags": {"x": {"bundles": {"cpu": {"repo": "me/mine-2", "revision": "v2"}}}}},
    })  # fmt: skip
    monkeypatch.setenv("ORTSERVE_CATALOG", str(named))
    merged = catalog.load(root)
    qwen = merged.lookup(ModelName.parse("qwen2.5"))  # replaced tag, new alias
    assert qwen.name == "qwen2.5:0.5b" and qwen.checkpoint.repo == "me/qwen-fork"
    assert (
        merged.lookup(ModelName.parse("qwen2.5:7b")).checkpoint.repo == "Qwen/Qwen2.5-7B-Instruct"
    )
    mine = merged.lookup(ModelName.parse("mine"))  # ORTSERVE_CATALOG applies last
    assert mine.bundles["cpu"] == catalog.Source("me/mine-2", revision="v2")
    assert "mine:x" in {e.name for e in merged.entries()}


@pytest.mark.parametrize(
    "models, message",
    [
        (
            {"m": {"tags": {"t": {"bundles": {"gpu": {"repo": "o/r"}}}}}},
            "t/bundles: 'gpu' is not one of",
        ),
        ({"m": {"tags": {"t": {"checkpoint": {"repo": "../etc"}}}}}, "t/checkpoint/repo: '../etc'"),
        (
            {"m": {"tags": {"t": {"checkpoint": {"repo": "o/r", "precision": "q4"}}}}},
            "precision: 'q4' is not",
        ),
        ({"m b": {"tags": {}}}, "at models: 'm b' does not match"),
    ],
)
def test_a_bad_catalog_file_is_one_clear_error_naming_it(tmp_path, monkeypatch, models, message):
    path = _write_catalog(tmp_path / "bad.json", models)
    monkeypatch.setenv("ORTSERVE_CATALOG", str(path))
    with pytest.raises(OrtServeError, match=f"catalog {path} is invalid at ") as error:
        catalog.load()
    assert message in error.value.message
    monkeypatch.setenv("ORTSERVE_CATALOG", str(tmp_path / "missing.json"))
    with pytest.raises(OrtServeError, match="ORTSERVE_CATALOG=.*no such file"):
        catalog.load()
    path.write_text("{not json")
    monkeypatch.setenv("ORTSERVE_CATALOG", str(path))
    with pytest.raises(OrtServeError, match="cannot be read"):
        catalog.load()


def _write_catalog(path, models):
    path.write_text(json.dumps({"models": models}))
    return path


# ---- variants --------------------------------------------------------------------------------

VARIANTS = [
    "cpu_and_mobile/cpu-int4-rtn-block-32",
    "cpu_and_mobile/cpu-fp32",
    "cuda/cuda-fp16",
    "cuda/cuda-int4-rtn-block-32",
    "directml/directml-int4-awq-block-128",
]


@pytest.mark.parametrize(
    "providers, expected",
    [
        (["cpu"], "cpu_and_mobile/cpu-int4-rtn-block-32"),
        (["cuda", "cpu"], "cuda/cuda-int4-rtn-block-32"),
        (["dml", "cpu"], "directml/directml-int4-awq-block-128"),
        (["webgpu", "cpu"], "cpu_and_mobile/cpu-int4-rtn-block-32"),
    ],
)
def test_the_variant_for_the_best_provider_is_chosen(providers, expected):
    assert choose_variant(VARIANTS, None, providers, _by_name) == expected


def test_a_named_variant_is_honoured_whatever_the_providers():
    assert choose_variant(VARIANTS, "cuda-fp16", ["cpu"], _by_name) == "cuda/cuda-fp16"
    assert choose_variant(VARIANTS, "CPU-FP32", ["cpu"], _by_name) == "cpu_and_mobile/cpu-fp32"
    with pytest.raises(RepoNotFound, match="variant 'q4_k_m' not found; variants: cpu-int4"):
        choose_variant(VARIANTS, "q4_k_m", ["cpu"], _by_name)


def test_no_runnable_variant_says_which_there_are():
    with pytest.raises(SourceUnavailable, match="variants: cuda-fp16, dml-int4. Name one"):
        choose_variant(["cuda/cuda-fp16", "dml-int4"], None, ["cpu"], _by_name)


def test_variant_files_leave_out_nested_variants():
    snapshot = Snapshot(PullRef("o/r"), "c" * 40)
    for path in ["genai_config.json", "model.onnx", "a/genai_config.json", "a/model.onnx",
                 "LICENSE"]:  # fmt: skip
        snapshot.files[path] = RepoFile(path)
    assert snapshot.variants() == ["", "a"]
    assert [f.path for f in snapshot.variant_files("")] == [
        "LICENSE",
        "genai_config.json",
        "model.onnx",
    ]
    assert [f.path for f in snapshot.variant_files("a")] == ["a/genai_config.json", "a/model.onnx"]


def _by_name(variant: str) -> str:
    return variant_provider(variant) or "cpu"


# ---- pulls against the test hub ---------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    running = LocalHub().start()
    monkeypatch.setenv("HF_ENDPOINT", running.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield running
    running.stop()


@pytest.fixture
def variant_repo(hub, tmp_path):
    """org/multi: cpu-int4, cuda-fp16 and directml-int4 bundles, a LICENSE at the root."""
    root = tmp_path / "repos" / "multi"
    for variant in ("cpu-int4-rtn-block-32", "cuda-fp16", "directml-int4"):
        hand_made_bundle(root / variant, PROVIDER_OPTIONS.get(variant, []))
    (root / "LICENSE").write_text("MIT License\n")
    (root / "README.md").write_text("# multi\n")
    return hub.add_repo("org/multi", root)


def test_pull_downloads_only_the_chosen_variant(hub, variant_repo, library):
    events = []
    info = pull("hf.co/org/multi", library=library, progress=events.append)

    assert info.name == "hf.co/org/multi:latest"
    source = info.manifest["source"]
    assert source == {
        "source": "hf.co/org/multi",
        "revision": variant_repo.commit,
        "variant": "cpu-int4-rtn-block-32",
    }
    fetched = {
        r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests("GET", "/resolve/")
    }
    assert fetched == {f"cpu-int4-rtn-block-32/{n}" for n in _BUNDLE_FILES} | {"LICENSE"}
    assert sorted(p.name for p in info.path.iterdir()) == sorted(
        [*_BUNDLE_FILES, "ortserve-files.json"]
    )
    assert info.manifest["license"] == "MIT License\n"
    assert info.details["quantization"] == "int4"
    assert info.manifest["verification"] == {"files_checked": len(_BUNDLE_FILES)}

    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert statuses.index("verifying sha256 digest") < statuses.index("writing manifest")
    model = [e for e in events if e.status == "downloading cpu-int4-rtn-block-32/model.onnx"]
    size = variant_repo.files["cpu-int4-rtn-block-32/model.onnx"].size
    assert model[-1].total == model[-1].completed == size
    assert (
        model[-1].digest
        == "sha256:" + variant_repo.files["cpu-int4-rtn-block-32/model.onnx"].sha256
    )


def test_a_named_variant_and_a_second_name_share_the_bundle(hub, variant_repo, library):
    cuda = pull("org/multi:cuda-fp16", library=library)
    assert cuda.name == "org/multi:cuda-fp16"
    assert cuda.manifest["source"]["variant"] == "cuda-fp16"
    config = json.loads((cuda.path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    again = pull("org/multi:cuda-fp16", name="mine", library=library)
    assert again.digest == cuda.digest


def test_a_repeated_pull_downloads_nothing(hub, variant_repo, library):
    first = pull("org/multi", library=library)
    gets = len(hub.requests("GET", "/resolve/"))
    events = []
    second = pull("org/multi", library=library, progress=events.append)
    assert second.digest == first.digest
    assert len(hub.requests("GET", "/resolve/")) == gets
    assert [e.status for e in events] == ["pulling manifest", "already up to date", "success"]


def test_concurrent_pulls_share_one_download(hub, variant_repo, library):
    stalled = hub.stall("cpu-int4-rtn-block-32/model.onnx", after=100)
    results, errors = [], []

    def run():
        try:
            results.append(pull("org/multi", library=library))
        except Exception as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=run)
    first.start()
    assert stalled.wait(30)
    waiting = []
    second = threading.Thread(
        target=lambda: results.append(pull("org/multi", library=library, progress=waiting.append))
    )
    second.start()
    wait_for(lambda: any(e.status.startswith("waiting for another pull") for e in waiting))
    hub.release()  # the stalled connection closes; huggingface-hub resumes it with a Range
    first.join(60)
    second.join(60)
    assert not errors
    assert len({r.digest for r in results}) == 1 and len(results) == 2
    assert waiting[-2].status == "already up to date"
    assert len([r for r in hub.downloads("model.onnx") if r.range is None]) == 1


def test_a_file_that_does_not_match_its_hub_digest_is_refused(hub, variant_repo, library):
    tampered = variant_repo.files["cpu-int4-rtn-block-32/model.onnx"].local
    data = tampered.read_bytes()
    tampered.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other content
    with pytest.raises(SourceUnavailable, match="model.onnx does not match its digest"):
        pull("org/multi", library=library)
    assert library.list() == []


def test_a_precision_for_a_bundle_repo_is_refused(hub, variant_repo, library):
    with pytest.raises(InvalidRequest, match="choose a variant as REPO:VARIANT") as error:
        pull("org/multi", precision="fp32", library=library)
    assert error.value.param == "precision"
    assert hub.requests("GET", "/resolve/") == []


def test_unknown_repo_revision_and_bad_name(hub, variant_repo, library):
    with pytest.raises(RepoNotFound, match="repository not found"):
        pull("org/nothing", library=library)
    with pytest.raises(RepoNotFound, match="revision 'v9' not found"):
        pull("org/multi@v9", library=library)
    with pytest.raises(InvalidName):
        pull("org/multi", name="../../escape", library=library)
    assert hub.requests("GET", "/resolve/") == []


def test_a_repo_with_neither_bundle_nor_checkpoint_is_refused(hub, tmp_path, library):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("nothing here\n")
    hub.add_repo("org/empty", tmp_path / "empty")
    with pytest.raises(SourceUnavailable, match="neither an ONNX GenAI bundle"):
        pull("org/empty", library=library)


def test_a_checkpoint_without_the_convert_extra_says_how_to_install_it(
    hub, tmp_path, library, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optimum" else real(name)
    )
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\0" * 64)
    hub.add_repo("org/ckpt", tmp_path / "ckpt")
    with pytest.raises(ConverterMissing, match=r"pip install 'ortserve\[convert\]'"):
        pull("org/ckpt", library=library)
    assert hub.requests("GET", "/resolve/") == []  # refused before downloading weights


def test_a_bundle_missing_a_named_file_is_refused(hub, tmp_path, library):
    hand_made_bundle(tmp_path / "broken", [])
    (tmp_path / "broken" / "model.onnx").unlink()
    hub.add_repo("org/broken", tmp_path / "broken")
    with pytest.raises(SourceUnavailable, match="model.onnx, named by genai_config.json"):
        pull("org/broken", library=library)
    assert library.list() == []


def test_a_local_directory_pulls_without_a_hub(tmp_path, library):
    hand_made_bundle(tmp_path / "bundles" / "cpu-int4", [])
    hand_made_bundle(tmp_path / "bundles" / "cuda-fp16", [{"cuda": {}}])
    info = pull(str(tmp_path / "bundles"), library=library)
    assert info.name == "bundles:latest"
    assert info.manifest["source"]["variant"] == "cpu-int4"
    assert info.manifest["source"]["source"] == str(tmp_path / "bundles")


def test_git_blob_id_is_gits(tmp_path):
    (tmp_path / "f").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "f") == "ce013625030ba8dba906f756967f9e9ca394464a"


# ---- short names against the test hub ---------------------------------------------------------


@pytest.fixture
def hub_catalog(tmp_path, monkeypatch, variant_repo):
    """ORTSERVE_CATALOG: `tiny` (alias of tiny:1b) names org/multi's cpu and cuda variants;
    `tiny-ckpt` a checkpoint repo, converted at int8."""
    path = _write_catalog(tmp_path / "catalog.json", {
        "tiny": {"tags": {"latest": "1b", "1b": {"bundles": {
            "cpu": {"repo": "org/multi", "variant": "cpu-int4-rtn-block-32"},
            "cuda": {"repo": "org/multi", "variant": "cuda-fp16"}}}}},
        "tiny-ckpt": {"tags": {"latest": {"checkpoint": {"repo": "org/ckpt", "precision": "int8"}}}},
    })  # fmt: skip
    monkeypatch.setenv("ORTSERVE_CATALOG", str(path))
    return path


def test_a_short_name_pulls_the_catalogs_variant_for_this_machine(
    hub, variant_repo, hub_catalog, library
):
    info = pull("tiny", library=library)
    assert info.name == "tiny:latest"  # as typed, as Ollama names `ollama pull llama3.2`
    assert info.manifest["source"] == {
        "source": "hf.co/org/multi",
        "revision": variant_repo.commit,
        "variant": "cpu-int4-rtn-block-32",
        "catalog": "tiny:1b",
    }
    fetched = {
        r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests("GET", "/resolve/")
    }
    assert fetched == {f"cpu-int4-rtn-block-32/{n}" for n in _BUNDLE_FILES} | {"LICENSE"}
    tagged = pull("tiny:1b", library=library)
    assert tagged.name == "tiny:1b" and tagged.digest == info.digest


def test_a_short_name_on_a_cuda_machine_pulls_the_cuda_bundle(
    hub, hub_catalog, library, monkeypatch
):
    monkeypatch.setattr("ortserve.models.pull.preferred_providers", lambda: ["cuda", "cpu"])
    info = pull("tiny", library=library)
    assert info.manifest["source"]["variant"] == "cuda-fp16"
    config = json.loads((info.path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_a_short_name_resolves_to_its_recipe_and_an_asked_precision_wins(hub_catalog, library):
    ref, precision = resolve(PullRef.parse("tiny-ckpt"), library)
    assert (ref.repo, ref.variant, precision, ref.entry) == (
        "org/ckpt",
        None,
        "int8",
        "tiny-ckpt:latest",
    )
    assert ref.default_name() == "tiny-ckpt:latest" and ref.source == "hf.co/org/ckpt"
    assert resolve(PullRef.parse("tiny-ckpt"), library, "fp16")[1] == "fp16"
    with pytest.raises(SourceUnavailable, match="no checkpoint to convert at a precision"):
        resolve(PullRef.parse("tiny"), library, "int8")


def test_an_architecture_the_converter_lacks_is_refused_before_the_weights(
    hub, tmp_path, library, monkeypatch
):
    (tmp_path / "gemma3").mkdir()
    (tmp_path / "gemma3" / "config.json").write_text('{"model_type": "gemma3_text"}')
    (tmp_path / "gemma3" / "model.safetensors").write_bytes(b"\0" * 64)
    hub.add_repo("org/gemma3", tmp_path / "gemma3")
    path = _write_catalog(
        tmp_path / "c.json", {"g": {"tags": {"1b": {"checkpoint": {"repo": "org/gemma3"}}}}}
    )
    monkeypatch.setenv("ORTSERVE_CATALOG", str(path))
    with pytest.raises(
        UnsupportedModel, match="does not convert architecture 'gemma3_text'; it converts gemma,"
    ):
        pull("g:1b", library=library)
    assert hub.downloads("model.safetensors") == []
    assert library.list() == []


# ---- POST /api/pull through the Flask app ----------------------------------------------------


@pytest.fixture
def runtime():
    return None  # pulls do not touch the engine


def test_api_pull_streams_progress_then_success(client, hub, variant_repo):
    response = client.post("/api/pull", json={"model": "org/multi"})
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    files = [line for line in lines if line["status"].startswith("downloading ")]
    assert all({"digest", "total", "completed"} <= line.keys() for line in files)


def test_api_pull_without_stream_and_with_name(client, hub, variant_repo):
    response = client.post("/api/pull", json={"name": "org/multi:cuda-fp16", "stream": False})
    assert response.status_code == 200 and response.get_json() == {"status": "success"}
    tags = client.get("/api/tags").get_json()["models"]
    assert [m["name"] for m in tags] == ["org/multi:cuda-fp16"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({}, 400, "model is required"),
        ({"model": 7}, 400, "model: 7 is not of type 'string'"),
        ({"model": "not a ref"}, 400, "invalid model reference"),
        ({"model": "org/multi", "stream": "yes"}, 400, "stream: 'yes' is not of type"),
        ({"model": "org/nothing"}, 404, "repository not found"),
        ({"model": "org/multi:nope", "stream": False}, 404, "variant 'nope' not found"),
    ],
)
def test_api_pull_errors(client, hub, variant_repo, body, status, message):
    response = client.post("/api/pull", json=body)
    assert response.status_code == status
    assert message in response.get_json()["error"]


def test_api_pull_of_a_short_name(client, hub, hub_catalog):
    response = client.post("/api/pull", json={"model": "tiny"})
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert [m["name"] for m in client.get("/api/tags").get_json()["models"]] == ["tiny:latest"]
    missing = client.post("/api/pull", json={"model": "tinyy"})
    assert missing.status_code == 404
    assert (
        "unknown model 'tinyy': not in the catalog of short names (close: tiny"
        in (missing.get_json()["error"])
    )


def test_api_pull_client_gone_adds_nothing(client, hub, variant_repo, library):
    stalled = hub.stall("cpu-int4-rtn-block-32/model.onnx", after=100)
    response = client.post("/api/pull", json={"model": "org/multi"}, buffered=False)
    first = next(response.response)
    assert json.loads(first) == {"status": "pulling manifest"}
    assert stalled.wait(30)
    response.close()  # the client goes away mid-download
    hub.release()
    wait_for(lambda: not any(t.name == "ortserve-pull" for t in threading.enumerate()))
    assert library.list() == []
    assert not library.bundles_dir.exists() or not any(library.bundles_dir.iterdir())


def test_api_pull_never_looks_at_server_paths(client, tmp_path):
    """An existing and a missing server path get the same answer: nothing is read or told."""
    answers = []
    for path in (tmp_path, tmp_path / "missing", tmp_path.parent):
        response = client.post("/api/pull", json={"model": str(path)})
        assert response.status_code == 400
        answers.append(response.get_json()["error"].replace(str(path), "PATH"))
    assert len(set(answers)) == 1
    assert "`ortserve pull DIRECTORY` on the server" in answers[0]


# ---- helpers -----------------------------------------------------------------------------------

_BUNDLE_FILES = ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
