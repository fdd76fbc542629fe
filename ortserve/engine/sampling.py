"""Typed sampling values -> GenerationOptions for one turn.

Precedence: the request, then the model's own parameters (its manifest, Ollama names), then
Ollama's defaults (GenerationOptions' defaults). ortserve/options.py checks the values;
docs/options.md lists every option.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ortserve.engine.types import GenerationOptions
from ortserve.errors import InvalidRequest, LibraryCorrupt
from ortserve.options import Sampling, parse_options


def resolve(
    given: Sampling,
    model: Sampling,
    *,
    context_length: int,
    max_tokens: int | None = None,
    default_context: int | None = None,
) -> GenerationOptions:
    """A request's values over the model's parameters (model_sampling, parsed when it
    loaded) over Ollama's defaults.

    default_context: num_ctx when neither sets one (ORTSERVE_CONTEXT_LENGTH).
    """
    return _build(given.over(model).given(), context_length, max_tokens, default_context)


def resolve_options(
    request: dict | None,
    model_parameters: dict | None,
    *,
    context_length: int,
    max_tokens: int | None = None,
) -> GenerationOptions:
    """Ollama `options` over a manifest's parameters over Ollama's defaults."""
    return resolve(parse_options(request), model_sampling(model_parameters),
                   context_length=context_length, max_tokens=max_tokens)  # fmt: skip


def model_sampling(parameters: dict | None) -> Sampling:
    """A manifest's parameters; a bad one is a broken manifest, not a bad request."""
    try:
        return parse_options(parameters, "parameters", strict=True)
    except InvalidRequest as e:
        raise LibraryCorrupt(f"the model's parameters are invalid: {e.message}") from e


def _build(
    given: dict[str, Any], context_length: int, max_tokens: int | None, default_context: int | None
) -> GenerationOptions:
    """GenerationOptions from checked values, normalised for the engine.

    `max_tokens` (ORTSERVE_MAX_TOKENS) caps what one turn may generate, "no limit" included.
    """
    defaults = GenerationOptions()
    if default_context is not None:
        defaults = replace(defaults, num_ctx=default_context)
    options = replace(defaults, **{"num_ctx": min(defaults.num_ctx, context_length), **given})
    num_predict = options.num_predict
    return replace(
        options,
        num_predict=_capped(-1 if num_predict < 0 else num_predict, max_tokens),  # -1, -2: none
        seed=None if options.seed is not None and options.seed < 0 else options.seed,
        # A model cannot attend past its trained context, whatever the client asks for.
        num_ctx=min(options.num_ctx, context_length),
    )


def _capped(num_predict: int, cap: int | None) -> int:
    if cap is None:
        return num_predict
    return cap if num_predict < 0 else min(num_predict, cap)
