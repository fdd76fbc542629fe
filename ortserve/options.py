"""Option values as requests and Modelfiles give them: names, types, ranges (a leaf).

Ollama's `options` (and a Modelfile's PARAMETERs) and OpenAI's or Anthropic's sampling
fields are checked here into plain values under Ollama's names; engine/sampling.py turns
them, over the model's parameters and the defaults, into GenerationOptions.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ortserve.errors import InvalidRequest

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


def parse_options(options: Any, prefix: str = "options", strict: bool = False) -> dict[str, Any]:
    """Checked values of the supported options; unsupported ones are checked and dropped.

    An unknown name is logged and ignored, as Ollama does with a request's options; `strict`
    (Modelfile PARAMETERs) makes it a 400.
    """
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
INT32 = 2**31 - 1
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 100.0),
    "top_k": (0, INT32),
    "top_p": (0.0, 1.0),
    "num_ctx": (1, INT32),
    "num_predict": (-(2**31), INT32),
    "seed": (-(2**63), 2**63 - 1),
    "repeat_penalty": (0.001, 100.0),
}


def _check_supported(name: str, value: Any, param: str) -> Any:
    """Type and range of one supported option."""
    value = _CHECKS[_SUPPORTED[name]](value, param)
    if name in RANGES:
        in_range(value, *RANGES[name], param)
    return value


def number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(param, "number", value)
    if not math.isfinite(value):
        raise InvalidRequest(f"{param} must be a finite number", param=param)
    return float(value)


def integer(value: Any, param: str) -> int:
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


def stop_strings(value: Any, param: str) -> tuple[str, ...]:
    """A string or a list of strings; empty strings and repeats dropped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error(param, "string or array of strings", value)
    return tuple(dict.fromkeys(s for s in value if s))


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "number": number,
    "integer": integer,
    "boolean": _boolean,
    "stop": stop_strings,
}


def api_sampling(fields: Iterable[tuple[str, str, Any]], *, max_temperature: float = 2.0
                 ) -> dict[str, Any]:  # fmt: skip
    """The sampling fields of OpenAI's or Anthropic's APIs, checked, under Ollama's names.

    `fields` holds (the client's field name, the option it sets, its value); None is "not
    given". Ranges are the API's own (OpenAI's temperature goes to 2, Anthropic's to 1).
    """
    given: dict[str, Any] = {}
    for param, name, value in fields:
        if value is None:
            continue
        if name == "temperature":
            given[name] = in_range(number(value, param), 0.0, max_temperature, param)
        elif name == "num_predict":
            given[name] = in_range(integer(value, param), 1, INT32, param)
        elif name in ("presence_penalty", "frequency_penalty"):
            in_range(number(value, param), -2.0, 2.0, param)
            warn_unsupported(name)
        else:
            given[name] = _check_supported(name, value, param)
    return given


def in_range(value: float, low: float, high: float, param: str) -> float:
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


def parameter_text(parameters: dict[str, Any]) -> str:
    """Ollama's text form: `key` padded to 30, a space, the value (strings quoted)."""
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(item, ensure_ascii=False)}")
    return "\n".join(lines)
