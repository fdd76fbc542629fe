"""Embeddings through the serving core: resolve, check, lease, embed, release.

Every protocol's embedding endpoint (Ollama's /api/embed and /api/embeddings, OpenAI's
/v1/embeddings, Gemini's embedContent and batchEmbedContents) builds one EmbeddingRequest and
calls embed(); none leases a model or checks a capability itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ortserve.errors import InvalidRequest
from ortserve.serving.core import require
from ortserve.serving.requests import EMBED_MAX_INPUTS


@dataclass(frozen=True)
class EmbeddingRequest:
    """Texts to embed with one model; each group of texts may ask its own width."""

    model: str
    texts: list[str]
    truncate: bool = True  # cut a text at the model's context; False: refuse it (400)
    dimensions: int | None = None  # Matryoshka: the first N components, normalised again
    keep_alive: float | None = None  # seconds; None: the server's default
    param: str = "input"  # the request field that holds the texts, for errors


@dataclass(frozen=True)
class Embeddings:
    """One vector per text, with what a protocol reports about the run."""

    vectors: Any  # numpy array, one row per text
    prompt_tokens: int
    load_duration_ns: int
    total_duration_ns: int


def embed(state, request: EmbeddingRequest) -> Embeddings:
    """The vectors of `request.texts` (none: the model is only loaded, Ollama's empty prompt).

    `state` gives the library and the runtime (api/state.ServerState or any such object).
    """
    started = time.perf_counter_ns()
    if len(request.texts) > EMBED_MAX_INPUTS:  # bounded before the model is even resolved
        raise InvalidRequest(f"{request.param}: {len(request.texts)} texts, more than the "
                             f"{EMBED_MAX_INPUTS} one request may embed", param=request.param)  # fmt: skip
    info = require(state.library, request.model, "embedding", "embeddings")
    runtime = state.runtime
    loaded = runtime.acquire(info, request.keep_alive)
    try:
        load_ns = loaded.load_duration_ns  # read now: the next request resets it
        if not request.texts:
            return Embeddings(None, 0, load_ns, time.perf_counter_ns() - started)
        result = loaded.embed(request.texts, truncate=request.truncate,
                              dimensions=request.dimensions)  # fmt: skip
    except BaseException:
        runtime.release(loaded, request.keep_alive, failed=True)
        raise
    runtime.release(loaded, request.keep_alive)
    return Embeddings(result.vectors, result.prompt_tokens, load_ns,
                      time.perf_counter_ns() - started)  # fmt: skip
