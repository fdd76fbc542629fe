"""Embeddings through the official `openai` and `ollama` clients against `ortserve serve`."""

from __future__ import annotations

import base64

import numpy as np
import ollama
import openai
import pytest

from converters.verify import SENTENCES

pytestmark = pytest.mark.slow

MOVIE, PARAPHRASE = 10, 11  # "A new movie is so great." / "The new movie is awesome."
LONG = "word " * 400  # about 400 tokens; all-MiniLM reads at most 256


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url)


def vectors(response) -> np.ndarray:
    return np.asarray([d.embedding for d in response.data], dtype=np.float64)


# ---- openai ----------------------------------------------------------------------------------


def test_openai_vectors_match_transformers_and_rank_a_paraphrase_first(oai, minilm_reference):
    reference = minilm_reference
    response = oai.embeddings.create(model="all-minilm", input=SENTENCES, encoding_format="float")
    served = vectors(response)
    assert served.shape == (len(SENTENCES), 384)
    cosines = (served * reference).sum(1) / np.linalg.norm(served, axis=1)
    assert cosines.min() >= 0.999
    similarity = served @ served.T
    others = [similarity[MOVIE, j] for j in range(len(SENTENCES)) if j not in (MOVIE, PARAPHRASE)]
    assert similarity[MOVIE, PARAPHRASE] > max(others)
    assert response.model == "all-minilm" and response.object == "list"
    assert [d.index for d in response.data] == list(range(len(SENTENCES)))
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(SENTENCES) * 2


def test_openai_base64_decodes_to_the_same_vectors(oai):
    texts = ["The weather is lovely today.", "It's so sunny outside!"]
    floats = vectors(
        oai.embeddings.create(model="all-minilm", input=texts, encoding_format="float")
    )
    packed = oai.embeddings.create(model="all-minilm", input=texts, encoding_format="base64")
    # Asked for explicitly, base64 comes back as sent: little-endian float32 bytes.
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data]
    np.testing.assert_array_equal(np.stack(decoded), floats.astype(np.float32))
    default = oai.embeddings.create(model="all-minilm", input=texts)  # the SDK asks for base64
    np.testing.assert_array_equal(vectors(default), floats.astype(np.float32))


def test_openai_dimensions_truncate_and_renormalise(oai):
    text = "Python is a popular programming language."
    full = vectors(oai.embeddings.create(model="all-minilm", input=text, encoding_format="float"))
    short = vectors(oai.embeddings.create(model="all-minilm", input=[text], dimensions=128))
    assert short.shape == (1, 128)
    assert abs(np.linalg.norm(short[0]) - 1) < 1e-5
    expected = full[0, :128] / np.linalg.norm(full[0, :128])
    np.testing.assert_allclose(short[0], expected, atol=1e-6)


def test_openai_errors(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="tiny-chat", input="hello")
    assert info.value.status_code == 400
    assert "does not support embeddings" in info.value.body["message"]

    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="all-minilm", input=[[101, 7592, 102]])
    assert info.value.param == "input" and info.value.type == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="all-minilm", input="hi", dimensions=1000)
    assert info.value.param == "dimensions"

    with pytest.raises(openai.NotFoundError) as info:
        oai.embeddings.create(model="no-such-model", input="hello")
    assert info.value.code == "model_not_found"


# ---- ollama ----------------------------------------------------------------------------------


def test_ollama_embed_and_legacy_embeddings_agree_with_v1(client, oai):
    texts = ["The cat sits outside.", "A man is playing guitar."]
    response = client.embed(model="all-minilm", input=texts)
    assert len(response.embeddings) == 2 and len(response.embeddings[0]) == 384
    assert response.prompt_eval_count > 4 and response.total_duration > 0
    v1 = vectors(oai.embeddings.create(model="all-minilm", input=texts, encoding_format="float"))
    np.testing.assert_allclose(response.embeddings, v1, atol=1e-6)

    legacy = client.embeddings(model="all-minilm", prompt=texts[0])
    np.testing.assert_allclose(legacy.embedding, v1[0], atol=1e-6)

    short = client.embed(model="all-minilm", input=texts[0], dimensions=64)
    assert len(short.embeddings[0]) == 64


def test_ollama_truncation(client):
    cut = client.embed(model="all-minilm", input=LONG)
    assert cut.prompt_eval_count == 256
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="all-minilm", input=["short", LONG], truncate=False)
    assert info.value.status_code == 400
    assert "input[1]" in info.value.error and "256 tokens" in info.value.error


def test_ollama_errors(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="tiny-chat", input="hello")
    assert info.value.status_code == 400
    assert "does not support embeddings" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="no-such-model", input="hello")
    assert info.value.status_code == 404


# ---- loading rules ---------------------------------------------------------------------------


def test_embedding_model_obeys_keep_alive_and_max_loaded_models(make_server):
    running = make_server(ORTSERVE_MAX_LOADED_MODELS="1")
    client = ollama.Client(host=running.url)
    client.embed(model="all-minilm", input="hi")
    assert [m.model for m in client.ps().models] == ["all-minilm:latest"]
    client.generate(model="tiny-chat", prompt="")  # loads it: the idle embedder is evicted
    assert [m.model for m in client.ps().models] == ["tiny-chat:latest"]
    client.embed(model="all-minilm", input="hi", keep_alive=0)  # evicts tiny-chat, unloads
    assert client.ps().models == []


def test_langchain_ollama_embeddings_with_its_defaults(server, minilm_reference):
    """OllamaEmbeddings sends every option, unset ones as null: null means "not given"."""
    from langchain_ollama import OllamaEmbeddings

    embeddings = OllamaEmbeddings(model="all-minilm", base_url=server.url)
    vectors = np.array(embeddings.embed_documents(SENTENCES))
    np.testing.assert_allclose(vectors, minilm_reference, atol=1e-4)
    assert len(embeddings.embed_query("The sky is blue")) == 384
