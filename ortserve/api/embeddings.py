"""Embeddings on both APIs: /api/embed and /api/embeddings (Ollama), /v1/embeddings (OpenAI)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from flask import Blueprint

from ortserve.api.protocol import GENERATION, Protocol, Route, json_body
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response
from ortserve.api.validation import keep_alive_seconds, read_json, validate
from ortserve.errors import InvalidRequest
from ortserve.serving import embedding
from ortserve.serving.embedding import EmbeddingRequest, Embeddings
from ortserve.serving.requests import EMBED_MAX_INPUTS

embeddings_bp = Blueprint("embeddings", __name__)


@embeddings_bp.post("/api/embed")
def embed():
    """Ollama: one vector per input text, with timings and the tokens read."""
    body = validate("embed", _texts_only(read_json()))
    result = _run(body, _texts(body["input"]), keep_alive_seconds(body))
    return json_response(
        {
            "model": body["model"],
            "embeddings": result.vectors.tolist(),
            "total_duration": result.total_duration_ns,
            "load_duration": result.load_duration_ns,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


@embeddings_bp.post("/api/embeddings")
def embeddings_legacy():
    """Ollama's older endpoint: `prompt` -> `embedding`; an empty prompt just loads the model."""
    body = validate("embeddings", read_json())
    prompt = body.get("prompt", "")
    result = _run(body, [prompt] if prompt else [], keep_alive_seconds(body), param="prompt")
    return json_response({"embedding": result.vectors[0].tolist() if prompt else []})


@embeddings_bp.post("/v1/embeddings")
def openai_embeddings():
    """OpenAI: `data[i].embedding` as floats or base64 float32, and token usage."""
    body = validate("openai_embeddings", _texts_only(read_json()))
    result = _run(body, _texts(body["input"]), None)
    encode = _base64 if body.get("encoding_format") == "base64" else _floats
    data = [
        {"object": "embedding", "index": i, "embedding": encode(row)}
        for i, row in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})


# ---- helpers -------------------------------------------------------------------------------


def _run(body: dict[str, Any], texts: list[str], keep_alive: float | None, param: str = "input"
         ) -> Embeddings:  # fmt: skip
    """The serving core's embeddings of `texts` with the body's model."""
    request = EmbeddingRequest(body["model"], texts, truncate=body.get("truncate", True),
                               dimensions=body.get("dimensions"), keep_alive=keep_alive,
                               param=param)  # fmt: skip
    return embedding.embed(current_state(), request)


def _texts_only(body: dict[str, Any]) -> dict[str, Any]:
    """Token arrays ([1, 2] or [[1, 2]]) are refused by name rather than as a type error, and
    too many texts before any is looked at."""
    value = body.get("input")
    if isinstance(value, list) and len(value) > EMBED_MAX_INPUTS:
        raise InvalidRequest(
            f"input: {len(value)} texts, more than the {EMBED_MAX_INPUTS} one request may embed",
            param="input",
        )
    if isinstance(value, list) and any(isinstance(v, (int, list)) for v in value):
        raise InvalidRequest(
            "input: token arrays are not supported; send a string or a list of strings",
            param="input",
        )
    return body


def _texts(value: str | list[str]) -> list[str]:
    """One text or a list (the schema has refused an empty list)."""
    return [value] if isinstance(value, str) else value


def _floats(row: np.ndarray) -> list[float]:
    return row.tolist()


def _base64(row: np.ndarray) -> str:
    """Little-endian float32 bytes, base64: what the openai SDK decodes with numpy."""
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")


PROTOCOL = Protocol(
    "embeddings", embeddings_bp, rank=11,  # errors: in the shape of the path's owner
    generation_paths=("/api/embed", "/api/embeddings", "/v1/embeddings"),
    routes=(
        Route("POST", "/api/embed", "One vector per input text", "embed", json_body("Embed"),
              GENERATION),
        Route("POST", "/api/embeddings", "One vector (Ollama's older endpoint)", "embeddings",
              json_body("EmbeddingLegacy"), GENERATION),
        Route("POST", "/v1/embeddings", "Embeddings", "openai_embeddings",
              json_body("OpenAIEmbeddings"), GENERATION),
    ),
)  # fmt: skip
