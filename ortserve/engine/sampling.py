"""Ollama `options` and OpenAI sampling fields -> GenerationOptions.

Precedence: the request, then the model's own parameters (its manifest, Ollama names), then
Ollama's defaults (GenerationOptions' defaults). docs/options.md lists every option.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ortserve.engine.types import GenerationOptions
from ortserve.errors import InvalidRequest, LibraryCorrupt

log = logging.getLogger("ortserve.engine")

# Option name -> the JSON type it must have.
_SUPPORTED: dict[str, str] = {
    "num_predict": "integer",
    "temperature": "number",
    "top_k": "integer",
    "top_p": "number",
    "seed": "integer",
    "stop": "stop",
    "repeat_penalty": "number",
    "num_ctx": "integer",
}
# Options Ollama has (or had: clients still send removed ones) that this engine cannot honour.
_UNSUPPORTED: dict[str, str] = {
    "num_keep": "number",
    "typical_p": "number",
    "min_p": "number",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "mirostat": "number",
    "mirostat_tau": "number",
    "mirostat_eta": "number",
    "penalize_newline": "boolean",
    "repeat_last_n": "number",
    "tfs_z": "number",
    "draft_num_predict": "number",
    "numa": "boolean",
    "num_batch": "number",
    "num_gpu": "number",
    "main_gpu": "number",
    "low_vram": "boolean",
    "f16_kv": "boolean",
    "vocab_only": "boolean",
    "use_mmap": "boolean",
    "use_mlock": "boolean",
    "num_thread": "number",
    "logits_all": "boolean",
    "embedding_only": "boolean",
}
SUPPORTED_OPTIONS = frozenset(_SUPPORTED)
UNSUPPORTED_OPTIONS = frozenset(_UNSUPPORTED)

# Names already warned about: one line per option per process, not one per request.
_warned: set = set()  # option names, and ("unknown", name)
_warned_lock = threading.Lock()


def resolve_options(
    request: dict | None,
    model_parameters: dict | None,
    *,
    context_length: int,
    param_prefix: str = "options",
    strict: bool = False,
    max_tokens: int | None = None,
) -> GenerationOptions:
    """Ollama `options` over the model's parameters over Ollama's defaults.

    An unknown name is logged and ignored, as Ollama does with a request's options; `strict`
    (Modelfile PARAMETERs) makes it a 400.
    """
    given = {**_model_options(model_parameters), **_parse_options(request, param_prefix, strict)}
    return _build(given, context_length, max_tokens)


def openai_options(
    body: dict, model_parameters: dict | None, *, context_length: int, max_tokens: int | None = None
) -> GenerationOptions:
    """OpenAI sampling fields of `body`; an omitted field keeps the model's own parameter."""
    given = _model_options(model_parameters)
    for field, name, check in _OPENAI_FIELDS:
        value = body.get(field)
        if value is not None:
            given[name] = check(value, field)
    # max_completion_tokens replaced max_tokens in OpenAI's API; the newer one wins.
    limit = body.get("max_completion_tokens")
    field = "max_completion_tokens"
    if limit is None:
        limit, field = body.get("max_tokens"), "max_tokens"
    if limit is not None:
        given["num_predict"] = _in_range(_integer(limit, field), 1, _INT32, field)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            _in_range(_number(body[name], name), -2.0, 2.0, name)
            warn_unsupported(name)
    return _build(given, context_length, max_tokens)


def option_type(name: str) -> str | None:
    """The JSON type of option `name` ("integer", "number", "boolean", "stop"); None if unknown."""
    return _SUPPORTED.get(name) or _UNSUPPORTED.get(name)


def warn_unsupported(name: str) -> None:
    """Log that option `name` is ignored, once per process."""
    with _warned_lock:
        if name in _warned:
            return
        _warned.add(name)
    log.warning('option "%s" is not supported by ortserve and is ignored', name)


def warn_unknown(name: str) -> None:
    """Log that option `name` is not one ortserve or Ollama knows, once per process."""
    with _warned_lock:
        if ("unknown", name) in _warned:
            return
        _warned.add(("unknown", name))
    log.warning('invalid option provided: "%s" is not an option and is ignored', name)


def _model_options(parameters: dict | None) -> dict[str, Any]:
    """The manifest's parameters; a bad one is a broken manifest, not a bad request."""
    try:
        return _parse_options(parameters, "parameters", strict=True)
    except InvalidRequest as e:
        raise LibraryCorrupt(f"the model's parameters are invalid: {e.message}") from e


def _parse_options(options: dict | None, prefix: str, strict: bool) -> dict[str, Any]:
    """Checked values of the supported options; unsupported ones are checked and dropped."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidRequest(
            f"invalid type for {prefix}: expected object, got {_json_type(options)}", param=prefix
        )
    parsed: dict[str, Any] = {}
    for name, value in options.items():
        param = f"{prefix}.{name}"
        if value is None:  # JSON null: the same as leaving the option out
            continue
        if name in _SUPPORTED:
            parsed[name] = _check_supported(name, value, param)
        elif name in _UNSUPPORTED:
            _CHECKS[_UNSUPPORTED[name]](value, param)
            warn_unsupported(name)
        elif strict:
            raise InvalidRequest(f'unknown option "{name}"', param=param)
        else:  # as Ollama: a client's extra option is logged and ignored, never a 400
            warn_unknown(name)
    return parsed


# What the engine can take: og's integers are 32-bit (seed 64-bit); beyond these ranges a
# value is refused here rather than by og with its internal message.
_INT32 = 2**31 - 1
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 100.0),
    "top_k": (0, _INT32),
    "top_p": (0.0, 1.0),
    "num_ctx": (1, _INT32),
    "num_predict": (-(2**31), _INT32),
    "seed": (-(2**63), 2**63 - 1),
    "repeat_penalty": (0.001, 100.0),
}


def _check_supported(name: str, value: Any, param: str) -> Any:
    """Type and range of one supported option."""
    value = _CHECKS[_SUPPORTED[name]](value, param)
    if name in _RANGES:
        _in_range(value, *_RANGES[name], param)
    return value


def _build(given: dict[str, Any], context_length: int, max_tokens: int | None) -> GenerationOptions:
    """GenerationOptions from checked values, normalised for the engine.

    `max_tokens` (ORTSERVE_MAX_TOKENS) caps what one turn may generate, "no limit" included.
    """
    defaults = GenerationOptions()
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


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(param, "number", value)
    if not math.isfinite(value):
        raise InvalidRequest(f"{param} must be a finite number", param=param)
    return float(value)


def _integer(value: Any, param: str) -> int:
    # JSON has one number type: 2.0 is the integer 2 to most clients, 2.5 is not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(param, "integer", value)
    return value


def _boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(param, "boolean", value)
    return value


def _stop(value: Any, param: str) -> tuple[str, ...]:
    """A string or a list of strings; empty strings and repeats dropped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error(param, "string or array of strings", value)
    return tuple(dict.fromkeys(s for s in value if s))


def _openai_temperature(value: Any, param: str) -> float:
    return _in_range(_number(value, param), 0.0, 2.0, param)


def _openai_top_p(value: Any, param: str) -> float:
    return _in_range(_number(value, param), 0.0, 1.0, param)


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "number": _number,
    "integer": _integer,
    "boolean": _boolean,
    "stop": _stop,
}
# OpenAI field, GenerationOptions name, check.
_OPENAI_FIELDS: tuple[tuple[str, str, Callable[[Any, str], Any]], ...] = (
    ("temperature", "temperature", _openai_temperature),
    ("top_p", "top_p", _openai_top_p),
    (
        "seed",
        "seed",
        lambda value, field: _in_range(_integer(value, field), *_RANGES["seed"], field),
    ),
    ("stop", "stop", _stop),
)


def _at_least(value: Any, low: float, param: str) -> Any:
    if value < low:
        raise InvalidRequest(f"{param} must be at least {low}, got {value}", param=param)
    return value


def _in_range(value: float, low: float, high: float, param: str) -> float:
    if not low <= value <= high:
        raise InvalidRequest(f"{param} must be between {low} and {high}, got {value}", param=param)
    return value


def _type_error(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"invalid type for {param}: expected {expected}, got {_json_type(value)}", param=param
    )


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object"
