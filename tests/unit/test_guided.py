"""Guided JSON output: schema checks, bounds, validation and the bounded retry loop."""

from __future__ import annotations

import json
from datetime import date
from enum import Enum
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from ortserve.engine.guided import (
    JSON_OBJECT_SCHEMA,
    InvalidOutput,
    OutputRejected,
    RetryPolicy,
    all_attempts,
    bounded_schema,
    check_schema,
    guidance_for,
    guided_steps,
    retries_from_env,
    run_guided,
    validate_output,
)
from ortserve.engine.types import Finished, Usage
from ortserve.errors import InvalidRequest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

ORDINARY = [
    PERSON,
    {"type": "array", "items": {"type": "number"}, "maxItems": 3},
    {"enum": ["red", "green", "blue"]},
    {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
    },
    {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"id": {"type": "string", "format": "uuid"}},
        "type": "object",
        "properties": {"id": {"$ref": "#/definitions/id"}},
    },
    {"type": "array", "uniqueItems": False, "prefixItems": [{"type": "boolean"}]},
    JSON_OBJECT_SCHEMA,
]


@pytest.mark.parametrize("schema", ORDINARY)
def test_check_schema_accepts_ordinary_schemas(schema):
    assert check_schema(schema, "format") is schema


@pytest.mark.parametrize(
    "schema",
    [
        ["not", "a", "dict"],
        "string",
        {"type": "strnig"},
        {"type": "object", "properties": {"a": {"minLength": -1}}},
        {"$schema": "http://json-schema.org/draft-03/schema#"},
    ],
)
def test_check_schema_rejects_invalid_schemas(schema):
    with pytest.raises(InvalidRequest) as info:
        check_schema(schema, "response_format")
    assert info.value.param == "response_format"
    assert info.value.status == 400


def _nested(fragment: dict) -> dict:
    """fragment placed two levels down, at #/properties/outer/items."""
    return {"type": "object", "properties": {"outer": {"type": "array", "items": fragment}}}


@pytest.mark.parametrize(
    "fragment, keyword",
    [
        ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
        ({"dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
        ({"then": {"minLength": 1}}, "then"),
        ({"else": {"minLength": 1}}, "else"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"type": "string"}}, "contains"),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
        ({"$dynamicRef": "#meta"}, "$dynamicRef"),
        ({"$ref": "https://example.com/schema.json"}, "$ref"),
        ({"type": "string", "format": "iri-reference"}, "format"),
        ({"type": "string", "format": "uri"}, "format"),
        ({"type": "object", "properties": {"a": {}}, "maxProperties": 2}, "maxProperties"),
    ],
)
def test_check_schema_rejects_unsupported_keyword_naming_it_and_path(fragment, keyword):
    with pytest.raises(InvalidRequest) as info:
        check_schema(_nested(fragment), "format")
    assert f"'{keyword}'" in info.value.message
    assert "#/properties/outer/items" in info.value.message
    assert info.value.param == "format"


def test_check_schema_finds_keywords_inside_defs_and_anyof():
    schema = {
        "$defs": {"x": {"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}},
        "$ref": "#/$defs/x",
    }
    with pytest.raises(InvalidRequest, match=r"'not' at #/\$defs/x/anyOf/1"):
        check_schema(schema, "format")


def test_check_schema_ignores_keyword_names_used_as_property_names():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "null"}}}
    assert check_schema(schema, "format") is schema


class Colour(str, Enum):  # noqa: UP042 (the str mixin is what is tested)
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    zip_code: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    born: date | None = None
    colour: Colour
    kind: Literal["human", "robot"] = "human"
    addresses: list[Address] = []
    scores: dict[str, float] = {}


def test_pydantic_schemas_pass_check_schema():
    for model in (Person, Address):
        schema = model.model_json_schema()
        assert check_schema(schema, "format") is schema
        check_schema(bounded_schema(schema), "format")


def test_bounded_schema_adds_bounds_everywhere():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "n": {"type": "number"},
            "i": {"type": "integer"},
            "list": {"type": "array", "items": {"type": "string"}},
            "tuple": {"type": "array", "prefixItems": [{"type": "integer"}]},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "one": {"oneOf": [{"type": "string"}]},
            "all": {"allOf": [{"type": "string"}]},
            "ref": {"$ref": "#/$defs/d"},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "$defs": {"d": {"type": "string"}},
        "definitions": {"e": {"type": "integer"}},
    }
    original = json.loads(json.dumps(schema))
    out = bounded_schema(schema, max_string=10, max_items=4, max_number=100, max_properties=8)
    props = out["properties"]
    assert schema == original  # a copy: the caller's schema is untouched
    assert out["x-guidance"] == {"whitespace_flexible": False}
    # llguidance bounds a property count only when every listed property is required
    assert "maxProperties" not in out
    assert props["s"]["maxLength"] == 10
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (-100, 100)
    assert (props["i"]["minimum"], props["i"]["maximum"]) == (-100, 100)
    assert props["list"]["maxItems"] == 4
    assert props["list"]["items"]["maxLength"] == 10
    assert props["tuple"]["maxItems"] == 4
    assert props["tuple"]["prefixItems"][0]["maximum"] == 100
    assert props["either"]["anyOf"][0]["maxLength"] == 10
    assert props["either"]["anyOf"][1]["minimum"] == -100
    assert props["one"]["oneOf"][0]["maxLength"] == 10
    assert props["all"]["allOf"][0]["maxLength"] == 10
    assert out["$defs"]["d"]["maxLength"] == 10
    assert out["definitions"]["e"]["maximum"] == 100
    assert props["map"]["maxProperties"] == 8
    assert props["map"]["additionalProperties"]["maxLength"] == 10


def test_bounded_schema_caps_property_count_when_all_listed_are_required():
    schema = {"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"],
              "additionalProperties": True}  # fmt: skip
    assert bounded_schema(schema, max_properties=1)["maxProperties"] == 2


def test_guided_objects_keep_to_their_declared_properties_as_ollama_s_grammar_does():
    """No key nobody asked for (llama.cpp closes declared properties unless told otherwise);
    the schema's own word wins, and allOf members, which each declare a part, stay open."""
    inner = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "at": inner,
                                               "free": {"type": "object"}},
              "required": ["city"]}  # fmt: skip
    out = bounded_schema(schema)
    assert out["additionalProperties"] is False and "maxProperties" not in out
    assert out["properties"]["at"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["free"]  # declares nothing: any keys
    assert "additionalProperties" not in schema  # the caller's schema is left as it came
    open_ = bounded_schema({**schema, "additionalProperties": {"type": "string"}})
    assert open_["additionalProperties"]["type"] == "string"
    parts = bounded_schema({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}],
                            "required": ["a", "b"]})  # fmt: skip
    assert all("additionalProperties" not in part for part in parts["allOf"])
    assert bounded_schema({"type": "object"})["maxProperties"] == 32


def test_bounded_schema_keeps_the_callers_bounds_and_enums():
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "s": {"type": "string", "maxLength": 3},
            "long": {"type": "string", "minLength": 500},
            "e": {"type": "string", "enum": ["a", "b"]},
            "c": {"const": "x", "type": "string"},
            "p": {"type": "string", "pattern": "^[a-z]+$"},
            "f": {"type": "string", "format": "date"},
            "n": {"type": "number", "minimum": 5},
            "x": {"type": "integer", "exclusiveMaximum": 10},
            "big": {"type": "integer", "minimum": 5_000_000_000},
            "a": {"type": "array", "maxItems": 100, "minItems": 1},
            "m": {"type": "object", "maxProperties": 2},
        },
    }
    props = bounded_schema(schema)["properties"]
    assert props["s"] == {"type": "string", "maxLength": 3}
    assert props["long"]["maxLength"] == 500  # never below the caller's minimum
    for key in ("e", "c", "p", "f"):
        assert props[key] == schema["properties"][key]
    assert props["n"] == {"type": "number", "minimum": 5, "maximum": 1_000_000_000}
    assert props["x"] == {"type": "integer", "exclusiveMaximum": 10, "minimum": -1_000_000_000}
    assert props["big"]["maximum"] >= props["big"]["minimum"]
    assert props["a"] == {"type": "array", "maxItems": 100, "minItems": 1}
    assert props["m"] == {"type": "object", "maxProperties": 2}
    assert "maxProperties" not in bounded_schema(schema)


def test_bounded_json_object_schema_bounds_every_value_type():
    values = bounded_schema(JSON_OBJECT_SCHEMA)["$defs"]["value"]["anyOf"]
    by_type = {v["type"]: v for v in values}
    assert by_type["string"]["maxLength"] == 256
    assert by_type["number"]["maximum"] == 1_000_000_000
    assert by_type["array"]["maxItems"] == 16
    assert by_type["object"]["maxProperties"] == 32


def test_guidance_for_gives_a_json_schema_guidance():
    guidance = guidance_for(PERSON)
    assert guidance.kind == "json_schema"
    assert json.loads(guidance.data) == bounded_schema(PERSON)


def test_json_object_schema_accepts_any_object_only():
    assert validate_output('{"a": [1, {"b": null}], "c": "d"}', JSON_OBJECT_SCHEMA)
    with pytest.raises(OutputRejected):
        validate_output("[1, 2]", JSON_OBJECT_SCHEMA)


def test_validate_output_ok():
    assert validate_output('{"name":"Ada","age":36}', PERSON) == {"name": "Ada", "age": 36}


def test_validate_output_wrong_type_quotes_path_and_message():
    with pytest.raises(OutputRejected) as info:
        validate_output('{"name":"Ada","age":"old"}', PERSON)
    assert "['age']" in info.value.reason
    assert "is not of type 'integer'" in info.value.reason
    assert info.value.truncated is False


def test_validate_output_missing_required():
    with pytest.raises(OutputRejected, match="'age' is a required property") as info:
        validate_output('{"name":"Ada"}', PERSON)
    assert info.value.truncated is False


@pytest.mark.parametrize("text", ['{"name":"Ada","age":3', '{"name":"Ad', "", '{"name":'])
def test_validate_output_truncated_json(text):
    with pytest.raises(OutputRejected, match="invalid JSON") as info:
        validate_output(text, PERSON)
    assert info.value.truncated is True


def test_validate_output_garbage_is_not_truncation():
    with pytest.raises(OutputRejected) as info:
        validate_output('{"name":"Ada","age":3}}', PERSON)
    assert info.value.truncated is False


def test_validate_output_finish_reason_length_marks_truncation():
    with pytest.raises(OutputRejected) as info:
        validate_output('{"name":"Ada"}', PERSON, finish_reason="length")
    assert info.value.truncated is True
    assert validate_output('{"name":"A","age":1}', PERSON, finish_reason="length")["age"] == 1


class Scripted:
    """A generate callable that replays texts and records its arguments."""

    def __init__(self, *outputs: tuple[str, str]):
        self.outputs = list(outputs)
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, max_tokens: int, seed: int | None) -> tuple[str, str]:
        self.calls.append((max_tokens, seed))
        return self.outputs.pop(0)


def test_run_guided_succeeds_first_time():
    generate = Scripted(('{"name":"Ada","age":36}', "stop"))
    result = run_guided(generate, PERSON, max_tokens=64, ceiling=512, policy=RetryPolicy(), seed=7)
    assert (result.value, result.attempts) == ({"name": "Ada", "age": 36}, 1)
    assert result.text == '{"name":"Ada","age":36}'
    assert generate.calls == [(64, 7)]


def test_run_guided_retries_truncation_with_larger_cap_and_new_seed():
    generate = Scripted(('{"name":"Ada","ag', "length"), ('{"name":"Ada","age":36}', "stop"))
    result = run_guided(generate, PERSON, max_tokens=64, ceiling=100, policy=RetryPolicy(), seed=7)
    assert result.attempts == 2
    (first_cap, first_seed), (second_cap, second_seed) = generate.calls
    assert (first_cap, first_seed) == (64, 7)
    assert second_cap == 100  # doubled, then held at the ceiling
    assert second_seed not in (None, 7)
    assert second_seed == RetryPolicy().next_seed(1, 7)


def test_run_guided_keeps_the_cap_when_output_was_invalid_not_truncated():
    generate = Scripted(('{"name":"Ada"}', "stop"), ('{"name":"Ada","age":1}', "stop"))
    run_guided(generate, PERSON, max_tokens=64, ceiling=512, policy=RetryPolicy(), seed=None)
    assert [cap for cap, _ in generate.calls] == [64, 64]
    assert generate.calls[0][1] is None
    assert isinstance(generate.calls[1][1], int)


def test_run_guided_raises_invalid_output_after_all_attempts():
    generate = Scripted(*[('{"name":"Ada","age":"x"}', "stop")] * 3)
    with pytest.raises(InvalidOutput) as info:
        run_guided(generate, PERSON, max_tokens=64, ceiling=512, policy=RetryPolicy(), seed=1)
    assert len(generate.calls) == 3
    assert len({seed for _, seed in generate.calls}) == 3
    error = info.value
    assert (error.status, error.type, error.attempts) == (422, "invalid_output", 3)
    assert "3 attempts" in error.message
    assert "is not of type 'integer'" in error.message


def test_retry_policy_growth_and_seeds():
    policy = RetryPolicy(attempts=3, growth=1.5)
    truncated, invalid = OutputRejected("cut", True), OutputRejected("bad", False)
    assert policy.next_max_tokens(100, truncated, 1000) == 150
    assert policy.next_max_tokens(100, truncated, 120) == 120
    assert policy.next_max_tokens(100, invalid, 1000) == 100
    seeds = [policy.next_seed(n, 42) for n in range(1, 5)]
    assert len(set(seeds)) == 4
    assert seeds == [policy.next_seed(n, 42) for n in range(1, 5)]
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_retries_from_env():
    assert retries_from_env(2) == RetryPolicy(attempts=3)
    assert retries_from_env(0).attempts == 1
    with pytest.raises(ValueError):
        retries_from_env(-1)


def test_run_guided_takes_a_check_function_and_names_the_failure():
    def check(text, finish_reason):
        if not text.startswith("ok"):
            raise OutputRejected(f"not ok: {text}", finish_reason == "length")
        return text.upper()

    generate = Scripted(("o", "length"), ("ok", "stop"))
    result = run_guided(generate, check, max_tokens=8, ceiling=64, policy=RetryPolicy(), seed=3)
    assert (result.value, result.attempts) == ("OK", 2)
    assert [cap for cap, _ in generate.calls] == [8, 16]  # truncated: a larger cap

    def attempt(max_tokens, seed):
        return "no", "stop"
        yield

    steps = guided_steps(attempt, check, max_tokens=8, ceiling=64, policy=RetryPolicy(2),
                         seed=None, failure="tool call failed validation")  # fmt: skip
    with pytest.raises(InvalidOutput) as info:
        list(steps)
    assert info.value.message == "tool call failed validation after 2 attempts (not ok: no)"


def test_all_attempts_counts_every_attempt():
    first = Finished("length", Usage(10, 4, 0), prompt_eval_duration_ns=5, eval_duration_ns=7)
    last = Finished("stop", Usage(10, 6, 10), prompt_eval_duration_ns=1, eval_duration_ns=2)
    total = all_attempts([first, last])
    assert total.reason == "stop"
    assert total.usage == Usage(prompt_tokens=20, generated_tokens=10, cached_prompt_tokens=10)
    assert (total.prompt_eval_duration_ns, total.eval_duration_ns) == (6, 9)
    assert all_attempts([last]) == last


@pytest.mark.parametrize(
    ("schema", "finite"),
    [
        ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, False),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}}, True),
        ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                          "required": ["next"]}}, "$ref": "#/$defs/n"}, False),
        ({"$defs": {"n": {"type": ["object", "null"], "properties": {"next": {"$ref": "#/$defs/n"}},
                          "required": ["next"]}}, "$ref": "#/$defs/n"}, True),
        ({"$defs": {"n": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["next"],
                                     "properties": {"next": {"$ref": "#/$defs/n"}}}]}},
          "$ref": "#/$defs/n"}, True),
        ({"type": "object", "required": ["kids"],
          "properties": {"kids": {"type": "array", "minItems": 1, "items": {"$ref": "#"}}}}, False),
        ({"type": "object", "required": ["kids"],
          "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}, True),
    ],
)  # fmt: skip
def test_a_schema_without_a_finite_instance_is_refused_before_generation(schema, finite):
    if finite:
        assert check_schema(schema, "format") is schema
        return
    with pytest.raises(InvalidRequest) as info:
        check_schema(schema, "format")
    assert info.value.param == "format"
    assert info.value.message.startswith("format has no finite instance")


# ---- schemas too large for og's parser (issue 20) ---------------------------------------------


def _keyed(i: int) -> dict:
    """An object branch: every branch shares the prefix {"k": and stays open past it."""
    return {"type": "object", "properties": {"k": {"const": i}}, "required": ["k"]}


def _props(n: int, required: bool) -> dict:
    names = [f"p{i}" for i in range(n)]
    schema = {"type": "object", "properties": {name: {"type": "integer"} for name in names}}
    return {**schema, "required": names} if required else schema


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"anyOf": [_keyed(i) for i in range(5000)]}, "#/anyOf has 5000 entries"),
        ({"oneOf": [_keyed(i) for i in range(1001)]}, "#/oneOf has 1001 entries"),
        ({"allOf": [{"type": "object"}] * 1001}, "#/allOf has 1001 entries"),
        (_props(1001, required=True), "#/required has 1001 entries"),
        (_props(1001, required=False), "#/properties has 1001 entries"),
        ({"type": "array", "prefixItems": [{"type": "integer"}] * 1001}, "#/prefixItems has"),
        ({"$defs": {f"d{i}": {"type": "integer"} for i in range(1001)}}, "#/$defs has 1001"),
        # what they hold, nested: inside a property, through a $ref, as array items
        ({"type": "object", "properties": {"a": {"anyOf": [_keyed(i) for i in range(2001)]}}},
         "#/properties/a/anyOf has 2001"),
        ({"type": "array", "items": {"anyOf": [_keyed(i) for i in range(2001)]}},
         "#/items/anyOf has 2001"),
        # no one list too long, but more alternatives open at once than the parser takes
        ({"anyOf": [{"type": "object", "properties": {"k": {"anyOf": [_keyed(j) for j in
                                                                       range(50)]}},
                     "required": ["k"]} for _ in range(50)]}, "alternatives open at once"),
        ({"enum": [{"k": i} for i in range(1001)]}, "alternatives open at once"),
        ({"allOf": [{"anyOf": [_keyed(i) for i in range(40)]},
                    {"anyOf": [_keyed(i) for i in range(40)]}]}, "alternatives open at once"),
        ({"$defs": {"many": {"anyOf": [_keyed(i) for i in range(600)]}},
          "anyOf": [{"$ref": "#/$defs/many"}, {"$ref": "#/$defs/many"}]}, "open at once"),
        ({"$defs": {f"d{i}": {"type": "object", "properties": {"n": {"$ref": f"#/$defs/d{i + 1}"}}}
                    for i in range(100)}, "$ref": "#/$defs/d0"}, "$ref links nest more than 64"),
    ],
)  # fmt: skip
def test_a_schema_too_large_for_the_parser_is_refused_before_generation(schema, where):
    """og's parser fails a batch mid-generation on a grammar row of over 2000 items (the
    engine is rebuilt; the request was a 500): refused here first, naming the field."""
    with pytest.raises(InvalidRequest) as info:
        check_schema(schema, "response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema"
    assert info.value.message.startswith("response_format.json_schema.schema is too large")
    assert where in info.value.message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "enum": [f"v{i}" for i in range(5000)]},  # one token pattern: fine
        {"anyOf": [_keyed(i) for i in range(1000)]},
        _props(1000, required=True),
        {"type": "array", "items": {"anyOf": [_keyed(i) for i in range(30)]}},
        JSON_OBJECT_SCHEMA,
        {"$defs": {"node": {"type": "object", "properties": {
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
         "$ref": "#/$defs/node"},
    ],
)  # fmt: skip
def test_large_schemas_within_the_parsers_limits_pass(schema):
    assert check_schema(schema, "format") is schema


def test_an_oversized_schema_is_refused_before_its_slow_validity_check(monkeypatch):
    """jsonschema's own check of 5000 branches takes seconds: the size check comes first."""
    import ortserve.engine.guided as guided

    def never(schema):
        raise AssertionError("the validity check ran on an oversized schema")

    monkeypatch.setattr(guided, "_validator_class", never)
    with pytest.raises(InvalidRequest, match="too large"):
        check_schema({"anyOf": [_keyed(i) for i in range(5000)]}, "format")
