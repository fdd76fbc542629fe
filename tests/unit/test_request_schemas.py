"""The request schemas say what the server accepts: their patterns admit only values the code's
parsers take, and rules the code enforces itself are in the published document too."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortserve.api.openapi import document
from ortserve.api.validation import CHECKED_BY_CODE, SCHEMA_DIR
from ortserve.config import parse_duration
from ortserve.library.names import ModelName
from ortserve.models.create import safe_filename

COMMON = json.loads((SCHEMA_DIR / "common.json").read_text())["$defs"]
BLOBS = json.loads((SCHEMA_DIR / "create.json").read_text())["$defs"]["blobs"]


def _pattern(schema: dict) -> str:
    return next(part["pattern"] for part in schema["allOf"] if "pattern" in part)


@pytest.mark.parametrize(
    ("pattern", "parse"),
    [
        (_pattern(COMMON["model_name"]), ModelName.parse),
        (_pattern(COMMON["keep_alive"]), parse_duration),
        (_pattern(BLOBS["propertyNames"]), lambda name: safe_filename(name, "files")),
    ],
    ids=["model name", "keep_alive", "file name"],
)
def test_every_value_a_pattern_admits_is_one_the_code_takes(pattern, parse):
    @settings(max_examples=300, deadline=None, database=None)
    @given(st.from_regex(pattern, fullmatch=True))
    def check(value):
        parse(value)  # raises on a value the server would refuse

    check()


@pytest.mark.parametrize(
    "value", ["", "../x", "a..b", "/etc", "x:", "a/b/c/d", "tiny chat", "x:../y", "ü"]
)
def test_the_model_name_pattern_refuses_what_the_library_refuses(value):
    import re

    assert not re.search(_pattern(COMMON["model_name"]), value)


@pytest.mark.parametrize("value", ["", "soon", "5m3", "1 h", "5mh", "-"])
def test_the_keep_alive_pattern_refuses_what_parse_duration_refuses(value):
    import re

    assert not re.search(_pattern(COMMON["keep_alive"]), value)
    with pytest.raises(ValueError):
        parse_duration(value)


def test_rules_the_code_enforces_are_in_the_document():
    schemas = document()["components"]["schemas"]
    images = schemas["generate"]["properties"]["images"]
    assert images["allOf"] == [{"maxItems": 8, CHECKED_BY_CODE: True}]  # images.MAX_IMAGES
    model = schemas["chat"]["properties"]["model"]
    assert model == {"$ref": "#/components/schemas/common/$defs/model_name"}
    needs_tools = schemas["messages"]["$defs"]["tool_choice_needs_tools"]
    assert needs_tools["then"]["required"] == ["tools"]
    keep_alive = schemas["embed"]["properties"]["keep_alive"]
    assert keep_alive == {"$ref": "#/components/schemas/common/$defs/keep_alive"}


@pytest.mark.parametrize(("schema", "body"), [
    ("chat", {"model": "m", "messages": [], "options": {"num_predict": 90.0}}),  # options.json
    ("generate", {"model": "m", "options": {"top_k": 2.0}}),
])  # fmt: skip
def test_integers_stay_strict_behind_a_ref_to_another_schema(schema, body):
    """Schemas reached through a $ref are checked by the same strict validator: 90.0 is not
    an integer there either (jsonschema switched to its stock class on the other file's
    $schema, which takes 90.0)."""
    from ortserve.api.validation import validator

    assert [
        "is not of type 'integer'" in e.message for e in validator(schema).iter_errors(body)
    ] == [True]
