"""Sampling options: their names, types and limits, written once (a leaf).

Every protocol turns its sampling fields into one typed Sampling under Ollama's names:
Ollama's `options` (and a Modelfile's PARAMETERs) through parse_options, the OpenAI,
Anthropic and Gemini fields through api_sampling. The request schemas' limits are generated
from the tables here (options_schema, sampling_schema), so a body is checked once, at the
boundary. engine/sampling.py turns a request's Sampling over the model's (parsed once, at
load) over the defaults into GenerationOptions.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ortserve.errors import InvalidRequest

log = logging.getLogger("ortserve.engine")

# What the engine can take: og's integers are 32-bit (seed 64-bit); beyond these ranges a
# value is refused at the boundary rather than by og with its internal message.
INT32 = 2**31 - 1
INT64 = 2**63 - 1


@dataclass(frozen=True)
class Limit:
    """One field's JSON type and range: the ONE place a limit is written.

    The request schemas' options.json and sampling.json are generated from these tables
    (options_schema, sampling_schema), and Modelfile PARAMETERs are checked against them.
    """

    # "integer", "number", "boolean", "stop" (a string or a list of strings) or "stops" (a
    # list of strings, at most `maximum` of them)
    type: str
    minimum: float | None = None
    maximum: float | None = None

    def schema(self) -> dict[str, Any]:
        strings = {"type": "array", "items": {"type": "string"}}
        if self.type == "stop":
            return {"oneOf": [{"type": "string"}, strings]}
        if self.type == "stops":
            return strings if self.maximum is None else {**strings, "maxItems": self.maximum}
        schema: dict[str, Any] = {"type": self.type}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema

    def check(self, value: Any, param: str) -> Any:
        """The value, typed; a 400 naming `param` when its type or range is wrong."""
        value = _CHECKS[self.type](value, param)
        if self.type in ("number", "integer"):
            in_range(value, self.minimum, self.maximum, param)
        return value


_NUMBER, _INTEGER, _BOOLEAN = Limit("number"), Limit("integer"), Limit("boolean")
# Ollama's options that the engine honours (GenerationOptions has a field for each).
_SUPPORTED: dict[str, Limit] = {
    "num_predict": Limit("integer", -(2**31), INT32),
    "temperature": Limit("number", 0.0, 100.0),
    "top_k": Limit("integer", 0, INT32),
    "top_p": Limit("number", 0.0, 1.0),
    "seed": Limit("integer", -(2**63), INT64),
    "stop": Limit("stop"),
    "repeat_penalty": Limit("number", 0.001, 100.0),
    "num_ctx": Limit("integer", 1, INT32),
}
# Options Ollama has (or had: clients still send removed ones) that this engine cannot honour:
# checked loosely (any number for a numeric one) and ignored.
_UNSUPPORTED: dict[str, Limit] = {
    **dict.fromkeys(("num_keep", "typical_p", "min_p", "presence_penalty", "frequency_penalty",
                     "mirostat", "mirostat_tau", "mirostat_eta", "repeat_last_n", "tfs_z",
                     "draft_num_predict", "num_batch", "num_gpu", "main_gpu", "num_thread"),
                    _NUMBER),
    **dict.fromkeys(("penalize_newline", "numa", "low_vram", "f16_kv", "vocab_only", "use_mmap",
                     "use_mlock", "logits_all", "embedding_only"), _BOOLEAN),
}  # fmt: skip

_TEMPERATURE_2 = Limit("number", 0.0, 2.0)
_UNIT = Limit("number", 0.0, 1.0)
_MAX_TOKENS = Limit("integer", 1, INT32)
_SEED = _SUPPORTED["seed"]
_PENALTY = Limit("number", -2.0, 2.0)
# The sampling fields of the other APIs: field -> (the Ollama option it sets, or None for one
# the engine cannot honour; its limits, which are the API's own: OpenAI's temperature goes to
# 2, Anthropic's to 1). Where two fields set one option, the later one given wins.
API_FIELDS: dict[str, dict[str, tuple[str | None, Limit]]] = {
    "openai": {
        "temperature": ("temperature", _TEMPERATURE_2),
        "top_p": ("top_p", _UNIT),
        "seed": ("seed", _SEED),
        "stop": ("stop", Limit("stop")),
        "presence_penalty": (None, _PENALTY),
        "frequency_penalty": (None, _PENALTY),
        "max_tokens": ("num_predict", _MAX_TOKENS),
        "max_completion_tokens": ("num_predict", _MAX_TOKENS),  # wins over max_tokens
        "max_output_tokens": ("num_predict", _MAX_TOKENS),  # the Responses API's name
    },
    "anthropic": {
        "temperature": ("temperature", _UNIT),
        "top_p": ("top_p", _UNIT),
        "top_k": ("top_k", _SUPPORTED["top_k"]),
        "max_tokens": ("num_predict", _MAX_TOKENS),
        "stop_sequences": ("stop", Limit("stops")),
    },
    "gemini": {
        "temperature": ("temperature", _TEMPERATURE_2),
        "topP": ("top_p", _UNIT),
        "topK": ("top_k", Limit("number", 1, INT32)),  # the SDK sends a float
        "seed": ("seed", Limit("integer", -(2**31), INT32)),
        "maxOutputTokens": ("num_predict", _MAX_TOKENS),
        "stopSequences": ("stop", Limit("stops", maximum=16)),
        "presencePenalty": (None, _PENALTY),
        "frequencyPenalty": (None, _PENALTY),
    },
}


@dataclass(frozen=True)
class Sampling:
    """Checked sampling values under Ollama's names; None: not given (the model's or the
    default applies). What a request carries to the core, and what a model's parameters
    are parsed into once, when it loads."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    repeat_penalty: float | None = None
    num_ctx: int | None = None

    def given(self) -> dict[str, Any]:
        """The values set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}  # fmt: skip

    def over(self, base: Sampling) -> Sampling:
        """These values, and `base`'s where these are not given."""
        return replace(base, **self.given())


SUPPORTED_OPTIONS = frozenset(_SUPPORTED)
UNSUPPORTED_OPTIONS = frozenset(_UNSUPPORTED)

# Names already warned about: one line per option per process, not one per request.
_warned: set = set()  # option names, and ("unknown", name)
_warned_lock = threading.Lock()


def option_type(name: str) -> str | None:
    """The JSON type of option `name` ("integer", "number", "boolean", "stop"); None if unknown."""
    limit = _SUPPORTED.get(name) or _UNSUPPORTED.get(name)
    return limit.type if limit else None


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


def parse_options(options: Any, prefix: str = "options", strict: bool = False) -> Sampling:
    """Checked values of the supported options; unsupported ones are checked and dropped.

    An unknown name is logged and ignored, as Ollama does with a request's options; `strict`
    (Modelfile PARAMETERs) makes it a 400.
    """
    if options is None:
        return Sampling()
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
            parsed[name] = _SUPPORTED[name].check(value, param)
        elif name in _UNSUPPORTED:
            _UNSUPPORTED[name].check(value, param)
            warn_unsupported(name)
        elif strict:
            raise InvalidRequest(f'unknown option "{name}"', param=param)
        else:  # as Ollama: a client's extra option is logged and ignored, never a 400
            warn_unknown(name)
    return Sampling(**parsed)


def api_sampling(api: str, body: Mapping[str, Any]) -> Sampling:
    """An API's sampling fields (API_FIELDS[api]) of a body its schema has checked, under
    Ollama's names. The schema holds the limits (sampling_schema), so nothing is checked
    twice: values are only given their Python type. None is "not given"."""
    given: dict[str, Any] = {}
    for name, (option, _) in API_FIELDS[api].items():
        value = body.get(name)
        if value is None:
            continue
        if option is None:
            warn_unsupported(name)
            continue
        typed = _TYPED[_SUPPORTED[option].type](value)  # the option's type: topK 40.0 -> 40
        if typed != ():  # an empty list of stops asks for none: the model's own stay
            given[option] = typed
    return Sampling(**given)


def options_schema() -> dict[str, Any]:
    """options.json: Ollama's options as a JSON Schema, from the tables above."""
    properties = {name: limit.schema() for name, limit in {**_SUPPORTED, **_UNSUPPORTED}.items()}
    return {
        "$id": "options.json",
        "title": "Ollama options",
        "description": "Sampling and runner options (Ollama names). Unknown names are logged "
        "and ignored; options the engine cannot honour are accepted and logged.",
        "type": "object",
        "properties": properties,
    }


def sampling_schema() -> dict[str, Any]:
    """sampling.json: each API's sampling fields, `$defs/<api>_<field>`, from API_FIELDS.

    The request schemas refer to these rather than writing a range of their own.
    """
    defs = {f"{api}_{name}": limit.schema()
            for api, table in API_FIELDS.items() for name, (_, limit) in table.items()}  # fmt: skip
    return {"$id": "sampling.json", "title": "Sampling fields of the OpenAI, Anthropic and "
            "Gemini APIs, with their limits", "$defs": defs}  # fmt: skip


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
    "stops": stop_strings,
}
# A schema-checked value's Python type (JSON has one number type: 2.0 may be an integer).
_TYPED: dict[str, Callable[[Any], Any]] = {
    "number": float,
    "integer": int,
    "boolean": bool,
    "stop": lambda value: stop_strings(value, ""),
}


def in_range(value: float, low: float | None, high: float | None, param: str) -> float:
    if (low is not None and value < low) or (high is not None and value > high):
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
