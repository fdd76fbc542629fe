"""Ollama options and OpenAI sampling fields -> GenerationOptions."""

from __future__ import annotations

import logging
from dataclasses import fields

import pytest

from ortserve import options as checks
from ortserve.api.openai import sampling as openai_sampling
from ortserve.api.validation import validate
from ortserve.engine import sampling
from ortserve.engine.sampling import resolve_options
from ortserve.engine.types import GenerationOptions
from ortserve.errors import InvalidRequest, LibraryCorrupt
from ortserve.options import SUPPORTED_OPTIONS, UNSUPPORTED_OPTIONS


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees a process that has warned about nothing yet."""
    monkeypatch.setattr(checks, "_warned", set())


def resolve(request=None, parameters=None, context_length=8192, **kwargs):
    return resolve_options(request, parameters, context_length=context_length, **kwargs)


def test_defaults_are_ollamas():
    options = resolve()
    assert options == GenerationOptions()
    assert (options.temperature, options.top_k, options.top_p) == (0.8, 40, 0.9)
    assert (options.repeat_penalty, options.num_predict, options.num_ctx) == (1.1, -1, 4096)
    assert options.seed is None and options.stop == ()


def test_request_over_model_parameters_over_defaults():
    parameters = {"temperature": 0.5, "top_k": 10, "stop": ["<|user|>"]}
    options = resolve({"temperature": 0.2, "seed": 7}, parameters)
    assert options.temperature == 0.2  # request
    assert options.top_k == 10  # model
    assert options.stop == ("<|user|>",)  # model
    assert options.seed == 7  # request
    assert options.top_p == 0.9  # default


def test_request_stop_replaces_the_models():
    options = resolve({"stop": ["###"]}, {"stop": ["<|user|>", "<|end|>"]})
    assert options.stop == ("###",)


def test_num_ctx_capped_at_context_length():
    assert resolve(context_length=2048).num_ctx == 2048
    assert resolve({"num_ctx": 100000}, context_length=2048).num_ctx == 2048
    assert resolve({"num_ctx": 512}, context_length=2048).num_ctx == 512
    assert resolve(None, {"num_ctx": 16384}, context_length=32768).num_ctx == 16384


@pytest.mark.parametrize("value", [-1, -2, -100])
def test_negative_num_predict_is_unlimited(value):
    assert resolve({"num_predict": value}).num_predict == -1


def test_num_predict_zero_and_positive_kept():
    assert resolve({"num_predict": 0}).num_predict == 0
    assert resolve({"num_predict": 64}).num_predict == 64


def test_temperature_zero_is_greedy():
    assert resolve({"temperature": 0}).greedy
    assert not resolve({"temperature": 0.1}).greedy


def test_stop_string_or_list():
    assert resolve({"stop": "END"}).stop == ("END",)
    assert resolve({"stop": ["a", "b", "a", ""]}).stop == ("a", "b")


def test_negative_seed_is_random():
    assert resolve({"seed": -1}).seed is None
    assert resolve({"seed": 0}).seed == 0


def test_floats_accept_ints_and_integral_floats_are_ints():
    options = resolve({"temperature": 1, "top_p": 1, "top_k": 5.0, "num_predict": 3.0})
    assert options.temperature == 1.0 and isinstance(options.temperature, float)
    assert options.top_k == 5 and isinstance(options.top_k, int)
    assert options.num_predict == 3 and isinstance(options.num_predict, int)


def test_null_means_not_given():
    assert resolve({"temperature": None}, {"temperature": 0.3}).temperature == 0.3


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("temperature", "hot", "number"),
        ("temperature", True, "number"),
        ("top_p", [0.5], "number"),
        ("num_predict", 1.5, "integer"),
        ("num_predict", "10", "integer"),
        ("top_k", False, "integer"),
        ("seed", 1.25, "integer"),
        ("num_ctx", {}, "integer"),
        ("stop", 3, "string or array of strings"),
        ("stop", ["ok", 3], "string or array of strings"),
    ],
)
def test_wrong_type_is_400(name, value, expected):
    with pytest.raises(InvalidRequest) as info:
        resolve({name: value})
    assert info.value.status == 400
    assert info.value.param == f"options.{name}"
    assert str(info.value).startswith(f"invalid type for options.{name}: expected {expected}")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("top_p", -0.01),
        ("top_k", -1),
        ("num_ctx", 0),
        ("repeat_penalty", 0),
        ("temperature", float("nan")),
        ("top_p", float("inf")),
    ],
)
def test_out_of_range_is_400(name, value):
    with pytest.raises(InvalidRequest) as info:
        resolve({name: value})
    assert info.value.param == f"options.{name}"


def test_param_prefix_names_the_field():
    with pytest.raises(InvalidRequest) as info:
        checks.parse_options({"top_k": "x"}, "body.options")
    assert info.value.param == "body.options.top_k"
    assert "body.options.top_k" in str(info.value)


@pytest.mark.parametrize("request_", ["temperature=1", [1, 2], 3, True])
def test_options_not_an_object_is_400(request_):
    with pytest.raises(InvalidRequest) as info:
        resolve(request_)
    assert info.value.param == "options"
    assert "expected object" in str(info.value)


def test_an_unknown_option_is_ignored_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="ortserve.engine")
    for _ in range(3):
        assert resolve({"temprature": 0.5, "top_k": 3}) == resolve({"top_k": 3})
    warned = [r.getMessage() for r in caplog.records if "temprature" in r.getMessage()]
    assert warned == ['invalid option provided: "temprature" is not an option and is ignored']


def test_an_unknown_parameter_of_a_modelfile_is_400():
    with pytest.raises(InvalidRequest) as info:
        checks.parse_options({"temprature": 0.5}, "parameters", strict=True)
    assert str(info.value) == 'unknown option "temprature"'
    assert info.value.param == "parameters.temprature"


def test_unsupported_options_accepted_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="ortserve.engine")
    for _ in range(3):
        options = resolve({"mirostat": 2, "min_p": 0.05, "use_mmap": False, "temperature": 0.1})
    assert options == resolve({"temperature": 0.1})
    messages = [r.getMessage() for r in caplog.records if r.name == "ortserve.engine"]
    assert sorted(messages) == [
        'option "min_p" is not supported by ortserve and is ignored',
        'option "mirostat" is not supported by ortserve and is ignored',
        'option "use_mmap" is not supported by ortserve and is ignored',
    ]


@pytest.mark.parametrize(("name", "value"), [("min_p", "low"), ("use_mmap", 1), ("num_gpu", [])])
def test_unsupported_options_type_checked_loosely(name, value):
    with pytest.raises(InvalidRequest) as info:
        resolve({name: value})
    assert info.value.param == f"options.{name}"


def test_unsupported_options_accept_any_number():
    resolve({"num_gpu": 1.0, "num_thread": 4, "mirostat_tau": 5, "numa": False, "num_keep": None})


def test_option_sets_cover_ollamas_names():
    # Every field of GenerationOptions is an option a request can set, and nothing else is.
    # guidance comes from a request's format, logprobs from its own fields, background from
    # the batch runner (serving/priority.py), never options.
    internal = ("guidance", "logprobs", "background")
    names = [f.name for f in fields(GenerationOptions) if f.name not in internal]
    assert sorted(SUPPORTED_OPTIONS) == sorted(names)
    assert not SUPPORTED_OPTIONS & UNSUPPORTED_OPTIONS
    assert {"num_keep", "typical_p", "mirostat_eta", "embedding_only", "num_thread"} <= (
        UNSUPPORTED_OPTIONS
    )


def test_bad_model_parameter_is_a_broken_manifest():
    with pytest.raises(LibraryCorrupt) as info:
        resolve(None, {"temperature": "warm"})
    assert "parameters.temperature" in str(info.value)


# --- OpenAI fields ---


def openai_options(body, parameters, context_length, max_tokens=None):
    """OpenAI's fields as api/openai.py reads them, resolved as the serving core does."""
    return sampling.resolve(openai_sampling(body), sampling.model_sampling(parameters),
                            context_length=context_length, max_tokens=max_tokens)  # fmt: skip


def oai(body, parameters=None, context_length=8192):
    return openai_options(body, parameters, context_length=context_length)


def test_openai_fields_map():
    options = oai({"temperature": 0, "top_p": 0.5, "max_tokens": 32, "stop": "\n", "seed": 3})
    assert options.temperature == 0.0 and options.greedy
    assert options.top_p == 0.5
    assert options.num_predict == 32
    assert options.stop == ("\n",)
    assert options.seed == 3


def test_openai_omitted_fields_keep_the_models_parameters():
    parameters = {"temperature": 0.6, "top_p": 0.95, "stop": ["<end>"], "num_ctx": 2048}
    options = oai({"model": "m", "messages": [], "temperature": None}, parameters)
    assert (options.temperature, options.top_p, options.stop) == (0.6, 0.95, ("<end>",))
    assert options.num_ctx == 2048
    assert oai({"temperature": 1.5}, parameters).temperature == 1.5


def test_openai_max_completion_tokens_wins():
    assert oai({"max_completion_tokens": 10}).num_predict == 10
    assert oai({"max_tokens": 20, "max_completion_tokens": 10}).num_predict == 10
    assert oai({}).num_predict == -1


def test_openai_penalties_accepted_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="ortserve.engine")
    oai({"presence_penalty": 0.5, "frequency_penalty": 0.5})
    oai({"presence_penalty": 1})
    messages = [r.getMessage() for r in caplog.records if r.name == "ortserve.engine"]
    assert sorted(messages) == [
        'option "frequency_penalty" is not supported by ortserve and is ignored',
        'option "presence_penalty" is not supported by ortserve and is ignored',
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "1"),
        ("temperature", 2.5),
        ("top_p", 1.1),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_completion_tokens", "5"),
        ("stop", [1]),
        ("seed", True),
        ("presence_penalty", 3),
        ("frequency_penalty", "x"),
    ],
)
def test_openai_bad_fields_are_400(field, value):
    # checked once, at the boundary: by the schema, whose limits options.API_FIELDS writes
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(InvalidRequest) as info:
        validate("chat_completions", body)
    assert info.value.param.split("[")[0] == field


@pytest.mark.parametrize(("api", "schema", "field", "value", "path"), [
    ("openai", "chat_completions", "temperature", 2.01, ()),
    ("openai", "responses", "max_output_tokens", 0, ()),
    ("anthropic", "messages", "temperature", 1.01, ()),
    ("anthropic", "messages", "top_k", -1, ()),
    ("gemini", "gemini_generate", "topP", 1.5, ("generationConfig",)),
    ("gemini", "gemini_generate", "stopSequences", ["x"] * 17, ("generationConfig",)),
])  # fmt: skip
def test_every_apis_limits_come_from_the_one_table(api, schema, field, value, path):
    limit = checks.API_FIELDS[api][field][1]
    assert limit.schema() == checks.sampling_schema()["$defs"][f"{api}_{field}"]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "input": "hi", "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}  # fmt: skip
    target = body
    for key in path:
        target = target.setdefault(key, {})
    target[field] = value
    with pytest.raises(InvalidRequest):
        validate(schema, body)


@pytest.mark.parametrize(
    ("options", "param"),
    [({"top_k": 2147483648}, "options.top_k"), ({"temperature": 1e308}, "options.temperature"),
     ({"repeat_penalty": 1e-320}, "options.repeat_penalty"), ({"num_ctx": 2**40}, "options.num_ctx"),
     ({"num_predict": 2**40}, "options.num_predict"), ({"seed": 2**64}, "options.seed")],
)  # fmt: skip
def test_values_beyond_what_the_engine_takes_are_400_naming_the_field(options, param):
    with pytest.raises(InvalidRequest) as info:
        resolve(options)
    assert info.value.param == param
    assert info.value.message.startswith(f"{param} must be between ")


def test_ortserve_max_tokens_caps_every_turn_no_limit_included():
    assert resolve({}, max_tokens=10).num_predict == 10
    assert resolve({"num_predict": -1}, max_tokens=10).num_predict == 10
    assert resolve({"num_predict": 50}, max_tokens=10).num_predict == 10
    assert resolve({"num_predict": 5}, max_tokens=10).num_predict == 5
    capped = openai_options({"max_tokens": 99}, None, context_length=64, max_tokens=7)
    assert capped.num_predict == 7
