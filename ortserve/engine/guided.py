"""Guided JSON output: schema checks, bounded guidance schemas, validation and bounded retry."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema import Draft7Validator, Draft202012Validator

from ortserve.engine.types import Finished, Guidance, Usage
from ortserve.errors import InvalidRequest, OrtServeError


class InvalidOutput(OrtServeError):
    """Generated output that still fails its schema after every retry."""

    status = 422
    type = "invalid_output"

    def __init__(self, message: str, *, attempts: int = 0):
        super().__init__(message)
        self.attempts = attempts


class OutputRejected(Exception):  # a verdict on one attempt, not an HTTP error
    """One attempt's output that does not parse or validate; truncated when it ended early."""

    def __init__(self, reason: str, truncated: bool):
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated


# Keywords llguidance cannot enforce (parser/src/json/README.md, "Supported JSON schema
# features"): the grammar would silently ignore them or fail at set_guidance, so the caller
# hears it as a 400 before generation rather than getting output the schema forbids.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "patternProperties",
        "dependentSchemas",
        "dependentRequired",
        "dependencies",
        "if",
        "then",
        "else",
        "not",
        "contains",
        "minContains",
        "maxContains",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
    }
)

# String formats llguidance implements; any other format is an error inside llguidance.
# "uri" is not in its documented list, so it is refused here too.
SUPPORTED_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)

# Draft-07 is what many clients still send ($schema of draft-07); everything else is 2020-12.
_VALIDATORS = {
    "http://json-schema.org/draft-07/schema": Draft7Validator,
    "https://json-schema.org/draft/2020-12/schema": Draft202012Validator,
}

# Keywords whose value is one subschema, a list of subschemas, or a name -> subschema map.
_ONE_SCHEMA = ("additionalProperties", "items")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf", "items")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")

# Any JSON value, spelt out by type so bounded_schema can bound every string, array and number.
JSON_OBJECT_SCHEMA: dict = {
    "type": "object",
    "additionalProperties": {"$ref": "#/$defs/value"},
    "$defs": {
        "value": {
            "anyOf": [
                {"type": "null"},
                {"type": "boolean"},
                {"type": "number"},
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/$defs/value"}},
                {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
            ]
        }
    },
}


def _validator_class(schema: dict) -> type:
    """The jsonschema validator class for the schema's $schema (2020-12 when absent)."""
    declared = schema.get("$schema")
    if declared is None:
        return Draft202012Validator
    if not isinstance(declared, str):
        raise ValueError("$schema must be a string")
    cls = _VALIDATORS.get(declared.rstrip("#"))
    if cls is None:
        raise ValueError(f"unsupported $schema {declared!r}: use draft 2020-12 or draft-07")
    return cls


def _subschemas(node: dict, path: str):
    """Yield (subschema, path) for every subschema position in one schema node."""
    for key in _ONE_SCHEMA:
        if isinstance(node.get(key), dict):
            yield node[key], f"{path}/{key}"
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, child in enumerate(node[key]):
                yield child, f"{path}/{key}/{i}"
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, child in node[key].items():
                yield child, f"{path}/{key}/{name}"


def _unsupported(node: Any, path: str) -> str | None:
    """Describe the first feature llguidance cannot enforce in node or below, else None."""
    if not isinstance(node, dict):
        return None
    for key in node:
        if key in UNSUPPORTED_KEYWORDS:
            return f"unsupported keyword '{key}' at {path}"
    if node.get("uniqueItems") is True:
        return f"unsupported keyword 'uniqueItems' at {path}"
    if isinstance(node.get("items"), list):
        return f"unsupported keyword 'items' as a list (use prefixItems) at {path}"
    if ("minProperties" in node or "maxProperties" in node) and not _all_required(node):
        return f"unsupported keyword 'maxProperties'/'minProperties' with optional properties at {path}"
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return f"unsupported keyword '$ref' (only local '#...' references) at {path}"
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS:
        return f"unsupported keyword 'format' value {fmt!r} at {path}"
    for child, child_path in _subschemas(node, path):
        found = _unsupported(child, child_path)
        if found:
            return found
    return None


# The grammar llguidance builds from a schema is parsed Earley-style, and og's parser refuses a
# row of more than 2000 items mid-generation (the batch fails and the engine is rebuilt). A row
# holds about one item per alternative still open at a position, so a schema is refused before
# generation when it could open more than this many at once, or has a list past this length.
MAX_SCHEMA_ALTERNATIVES = 1000
# $ref links followed one inside another (a chain of $defs), like JSON's own nesting limit.
MAX_REF_DEPTH = 64
# Lists whose length alone makes grammar rows or lexer states (enum is one token pattern
# when its values are scalars: only its objects and arrays count, as alternatives).
_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems", "required", "type")
_MAP_KEYWORDS = ("properties", "$defs", "definitions")


def check_size(schema: dict, param: str) -> None:
    """400 for a schema whose grammar would pass og's parser limits (see above)."""
    for node, path in _nodes_with_paths(schema, "#"):
        for key in (*_LIST_KEYWORDS, *_MAP_KEYWORDS):
            value = node.get(key)
            if isinstance(value, (list, dict)) and len(value) > MAX_SCHEMA_ALTERNATIVES:
                raise InvalidRequest(
                    f"{param} is too large to enforce: {path}/{key} has {len(value)} entries "
                    f"(at most {MAX_SCHEMA_ALTERNATIVES})",
                    param=param,
                )
    try:
        width = alternatives(schema)
    except ValueError as exc:
        raise InvalidRequest(f"{param} is too large to enforce: {exc}", param=param) from None
    if width > MAX_SCHEMA_ALTERNATIVES:
        raise InvalidRequest(
            f"{param} is too large to enforce: it can leave more than "
            f"{MAX_SCHEMA_ALTERNATIVES} alternatives open at once (anyOf/oneOf branches, "
            "nested ones multiplied, enum objects or arrays, optional properties); "
            "use fewer",
            param=param,
        )


def alternatives(root: Any) -> int:
    """An upper estimate of the alternatives a schema's grammar keeps open at one position.

    anyOf/oneOf branches add up (branches that share a prefix, like objects with the same
    key, are all open at once, and so are the alternatives inside them); allOf members and
    sibling anyOf/oneOf multiply (their intersection is built branch by branch); an object
    opens its optional properties (the next key) or the widest of its values; an array the
    widest of its items. Capped just past the limit, and each $ref counted once, so the
    work stays linear in the schema's size.
    """
    cap = MAX_SCHEMA_ALTERNATIVES + 1
    refs: dict[str, int] = {}

    def width(node: Any, stack: frozenset[str]) -> int:
        if not isinstance(node, dict):
            return 1
        if len(stack) > MAX_REF_DEPTH:  # each link is a grammar rule, and a Python frame
            raise ValueError(f"$ref links nest more than {MAX_REF_DEPTH} deep")
        found = [_own_width(node, cap), _composed(node, stack), _inner(node, stack)]
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in stack:
            if ref not in refs:
                refs[ref] = width(_resolve_pointer(root, ref), stack | {ref})
            found.append(refs[ref])
        return min(cap, max(found))

    def _composed(node: dict, stack: frozenset[str]) -> int:
        total = 1
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                total *= max(1, sum(width(child, stack) for child in node[key]))
        for member in _as_list(node.get("allOf")):
            total = min(cap, total * width(member, stack))
        return min(cap, total)

    def _inner(node: dict, stack: frozenset[str]) -> int:
        children = [child for key in (*_ONE_SCHEMA, "prefixItems") for child in
                    _as_list(node.get(key))]  # fmt: skip
        properties = node.get("properties")
        if isinstance(properties, dict):
            children.extend(properties.values())
        return max((width(child, stack) for child in children), default=1)

    return width(root, frozenset())


def _own_width(node: dict, cap: int) -> int:
    """Alternatives a node opens by itself: enum objects/arrays, types, optional keys."""
    enum = node.get("enum") if isinstance(node.get("enum"), list) else []
    compound = sum(isinstance(v, (dict, list)) for v in enum)
    types = node.get("type")
    properties = node.get("properties")
    required = node.get("required") if isinstance(node.get("required"), list) else []
    optional = 0
    if isinstance(properties, dict):
        optional = sum(name not in required for name in properties) + 1
    return min(cap, max(compound + (compound < len(enum)),
                        len(types) if isinstance(types, list) else 1, optional))  # fmt: skip


def _as_list(value: Any) -> list:
    if isinstance(value, dict):
        return [value]
    return value if isinstance(value, list) else []


def _nodes_with_paths(node: Any, path: str):
    """Every schema node under (and including) node, with its JSON pointer."""
    pending = [(node, path)]
    while pending:
        current, where = pending.pop()
        if isinstance(current, dict):
            yield current, where
            pending.extend(_subschemas(current, where))


def check_schema(schema: Any, param: str) -> dict:
    """Return the caller's schema if it is valid JSON Schema the guidance can enforce."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    check_size(schema, param)  # first: checking a huge schema's validity takes seconds
    try:
        _validator_class(schema).check_schema(schema)
    except ValueError as exc:
        raise InvalidRequest(f"{param} is not a valid JSON Schema: {exc}", param=param) from exc
    except jsonschema.SchemaError as exc:
        where = "#/" + "/".join(str(p) for p in exc.absolute_path)
        raise InvalidRequest(
            f"{param} is not a valid JSON Schema: {exc.message} at {where}", param=param
        ) from exc
    problem = _unsupported(schema, "#")
    if problem:
        raise InvalidRequest(f"{param} uses an {problem}", param=param)
    if not _has_finite_instance(schema):
        # the grammar of such a schema never ends: llguidance gives up mid-batch
        raise InvalidRequest(
            f"{param} has no finite instance: a $ref cycle runs through required properties "
            "(or non-empty arrays) with no way out; make a link optional",
            param=param,
        )
    return schema


def _has_finite_instance(root: dict) -> bool:
    """Whether some finite JSON value fits the schema's shape, $ref cycles considered.

    Conservative: only a cycle that every instance must follow (through required properties,
    arrays with minItems > 0, allOf) counts as infinite; any alternative (anyOf, oneOf, a
    type list with a scalar) is a way out.
    """
    finite_refs: set[str] = set()

    def finite(node: Any, stack: frozenset[str]) -> bool:
        if not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in finite_refs:
            if ref in stack:
                return False
            target = _resolve_pointer(root, ref)
            if target is not None and not finite(target, stack | {ref}):
                return False
            finite_refs.add(ref)
        if not all(finite(child, stack) for child in node.get("allOf") or []):
            return False
        for key in ("anyOf", "oneOf"):
            if node.get(key) and not any(finite(child, stack) for child in node[key]):
                return False
        types = node.get("type")
        if isinstance(types, list) and any(t not in ("object", "array") for t in types):
            return True
        properties = node.get("properties") or {}
        for name in node.get("required") or []:
            if name in properties and not finite(properties[name], stack):
                return False
        if (node.get("minItems") or 0) > 0 and isinstance(node.get("items"), dict):
            return finite(node["items"], stack)
        return True

    return finite(root, frozenset())


def _resolve_pointer(root: dict, ref: str) -> Any:
    """The subschema a local '#/a/b' reference names (None when it names nothing)."""
    node: Any = root
    for part in ref.removeprefix("#").strip("/").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _types(node: dict) -> set[str]:
    """The node's declared types, plus object/array when implied by their keywords."""
    declared = node.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or ())
    if "properties" in node or "additionalProperties" in node:
        types.add("object")
    if "items" in node or "prefixItems" in node:
        types.add("array")
    return types


def _bound_string(node: dict, max_string: int) -> None:
    """Cap a free string's length; enum/const/pattern/format already limit it."""
    if any(k in node for k in ("maxLength", "enum", "const", "pattern", "format")):
        return
    # Never below the caller's minLength: a bound must not make the schema unsatisfiable.
    node["maxLength"] = max(max_string, node.get("minLength", 0))


def _bound_number(node: dict, max_number: float) -> None:
    """Give a number a range, keeping (and never crossing) the caller's own bounds."""
    limit = int(max_number) if float(max_number).is_integer() else max_number
    low = node.get("minimum", node.get("exclusiveMinimum"))
    high = node.get("maximum", node.get("exclusiveMaximum"))
    if high is None:
        node["maximum"] = limit if low is None else max(limit, low)
    if low is None:
        node["minimum"] = -limit if high is None else min(-limit, high)


def _all_required(node: dict) -> bool:
    """Whether every property listed in properties is also in required."""
    required = node.get("required", [])
    return all(name in required for name in node.get("properties", {}))


# Keywords beside which closing an object's declared properties could change what it accepts
# (allOf members each declare part of the properties; patterns name more of them).
_OPEN_BY_COMPOSITION = ("allOf", "anyOf", "oneOf", "$ref", "patternProperties",
                        "unevaluatedProperties", "additionalProperties")  # fmt: skip


def _close_declared_objects(root: dict) -> None:
    """Guided output keeps to an object's declared `properties` unless the schema asks for
    more, as Ollama's grammar (llama.cpp's json-schema-to-grammar) does: a weak model would
    otherwise append keys nobody asked for. Validation still uses the client's schema."""
    members = {id(m) for node in _walk(root) for m in node.get("allOf", []) if isinstance(m, dict)}
    for node in _walk(root):
        declared = isinstance(node.get("properties"), dict) and node["properties"]
        if (
            declared
            and id(node) not in members
            and not any(k in node for k in _OPEN_BY_COMPOSITION)
        ):
            node["additionalProperties"] = False


def _walk(node: Any):
    """Every schema node under (and including) node."""
    if isinstance(node, dict):
        yield node
        for child, _ in _subschemas(node, "#"):
            yield from _walk(child)


def _bound_object(node: dict, max_properties: int) -> None:
    """Cap the property count of an object that allows additional properties."""
    if node.get("additionalProperties") is False or "maxProperties" in node:
        return
    if not _all_required(node):
        return  # llguidance refuses a property count unless every listed property is required
    floor = max(len(node.get("properties", {})), node.get("minProperties", 0))
    node["maxProperties"] = max(max_properties, floor)


def _bound_node(node: Any, limits: dict) -> None:
    """Add bounds to one schema node and, recursively, to all its subschemas."""
    if not isinstance(node, dict):
        return
    if "enum" not in node and "const" not in node:
        types = _types(node)
        if "string" in types:
            _bound_string(node, limits["max_string"])
        if types & {"number", "integer"}:
            _bound_number(node, limits["max_number"])
        if "array" in types and "maxItems" not in node:
            node["maxItems"] = max(limits["max_items"], node.get("minItems", 0))
        if "object" in types:
            _bound_object(node, limits["max_properties"])
    for child, _ in _subschemas(node, "#"):
        _bound_node(child, limits)


def bounded_schema(
    schema: dict,
    *,
    max_string: int = 256,
    max_items: int = 16,
    max_number: float = 1e9,
    max_properties: int = 32,
) -> dict:
    """A copy of schema with bounds wherever the caller left them open, and compact JSON."""
    bounded = copy.deepcopy(schema)
    limits = {
        "max_string": max_string,
        "max_items": max_items,
        "max_number": max_number,
        "max_properties": max_properties,
    }
    _close_declared_objects(bounded)
    _bound_node(bounded, limits)
    # A weak model can emit whitespace forever inside valid JSON: allow none.
    guidance = dict(bounded.get("x-guidance") or {})
    guidance["whitespace_flexible"] = False
    bounded["x-guidance"] = guidance
    return bounded


def guidance_for(schema: dict) -> Guidance:
    """The guidance that constrains a turn's output to `schema` (bounded for llguidance)."""
    return Guidance("json_schema", json.dumps(bounded_schema(schema)))


def _parse(text: str, finish_reason: str | None) -> Any:
    """json.loads, raising OutputRejected that says whether the text merely ended early."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # An error at the very end (or an unclosed string) means a prefix of valid JSON.
        ended_early = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated")
        truncated = ended_early or finish_reason == "length"
        raise OutputRejected(f"invalid JSON: {exc}", truncated) from exc


def validate_output(text: str, schema: dict, finish_reason: str | None = None) -> Any:
    """The parsed value of text if it validates against the caller's original schema."""
    value = _parse(text, finish_reason)
    cls = _validator_class(schema)
    error = jsonschema.exceptions.best_match(
        cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value)
    )
    if error is not None:
        where = "$" + "".join(f"[{p!r}]" for p in error.absolute_path)
        raise OutputRejected(f"{where}: {error.message}", finish_reason == "length")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a guided request gets and how its token cap grows."""

    attempts: int = 3
    growth: float = 2.0

    def __post_init__(self):
        """Refuse a policy that could never produce an answer."""
        if self.attempts < 1 or self.growth < 1:
            raise ValueError("RetryPolicy needs attempts >= 1 and growth >= 1")

    def next_max_tokens(self, current: int, rejected: OutputRejected, ceiling: int) -> int:
        """A larger cap when the cap cut the output short; otherwise the same cap."""
        if not rejected.truncated:
            return current
        return min(ceiling, max(current + 1, int(current * self.growth)))

    def next_seed(self, attempt: int, base: int | None) -> int:
        """A different seed for each attempt, reproducible when the caller gave one."""
        if base is None:
            return random.randrange(2**31)
        # A large odd stride so retries of neighbouring seeds do not collide.
        return (base + attempt * 0x9E3779B1) % 2**31


def retries_from_env(retries: int) -> RetryPolicy:
    """The policy for ORTSERVE_FORMAT_RETRIES (retries after the first attempt)."""
    if retries < 0:
        raise ValueError("ORTSERVE_FORMAT_RETRIES must be 0 or more")
    return RetryPolicy(attempts=retries + 1)


@dataclass(frozen=True)
class GuidedResult:
    """A validated value, the text it came from and the attempts it took."""

    value: Any
    text: str
    attempts: int


@dataclass(frozen=True)
class Retry:
    """Between attempts: attempt `attempt` begins because the previous one failed (`reason`)."""

    attempt: int
    reason: str


# attempt(max_tokens, seed): a generator that yields what it streams and returns
# (text, finish_reason) once its turn is over.
Attempt = Callable[[int, int | None], Generator[Any, None, tuple[str, str]]]


# check(text, finish_reason): the accepted value of one attempt's text, or OutputRejected.
Check = Callable[[str, str | None], Any]


def _checker(check: dict | Check) -> Check:
    """A check function: given one, or validation against a JSON Schema."""
    if callable(check):
        return check
    return lambda text, finish_reason: validate_output(text, check, finish_reason)


def guided_steps(
    attempt: Attempt,
    check: dict | Check,
    *,
    max_tokens: int,
    ceiling: int,
    policy: RetryPolicy,
    seed: int | None,
    failure: str = "output failed its schema",
) -> Generator[Any, None, GuidedResult]:
    """The attempt loop: yield each attempt's items and a Retry between attempts.

    `check` is a JSON Schema or a Check (tool calls bring their own). Returns the
    GuidedResult of the first accepted attempt; InvalidOutput ("<failure> after N attempts")
    when all fail.
    """
    accept = _checker(check)
    attempt_seed = seed
    rejected: OutputRejected | None = None
    for number in range(1, policy.attempts + 1):
        if rejected is not None:
            yield Retry(number, rejected.reason)
        text, finish_reason = yield from attempt(max_tokens, attempt_seed)
        try:
            return GuidedResult(accept(text, finish_reason), text, number)
        except OutputRejected as exc:
            rejected = exc
        max_tokens = policy.next_max_tokens(max_tokens, rejected, ceiling)
        attempt_seed = policy.next_seed(number, seed)
    cause = "truncated at the token limit: " if rejected and rejected.truncated else ""
    raise InvalidOutput(
        f"{failure} after {policy.attempts} attempts ({cause}{rejected})",
        attempts=policy.attempts,
    )


def run_guided(
    generate: Callable[[int, int | None], tuple[str, str]],
    schema: dict | Check,
    *,
    max_tokens: int,
    ceiling: int,
    policy: RetryPolicy,
    seed: int | None,
) -> GuidedResult:
    """Generate and validate up to policy.attempts times; InvalidOutput when all fail."""

    def attempt(tokens: int, attempt_seed: int | None):
        return generate(tokens, attempt_seed)
        yield  # a generator that streams nothing

    steps = guided_steps(attempt, schema, max_tokens=max_tokens, ceiling=ceiling,
                         policy=policy, seed=seed)  # fmt: skip
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def all_attempts(finishes: list[Finished]) -> Finished:
    """One Finished for several attempts: the last one's reason, every attempt's usage and time.

    Every attempt processed its prompt and generated its tokens, so usage counts them all.
    """
    usages = [f.usage for f in finishes]
    return Finished(
        reason=finishes[-1].reason,
        usage=Usage(
            prompt_tokens=sum(u.prompt_tokens for u in usages),
            generated_tokens=sum(u.generated_tokens for u in usages),
            cached_prompt_tokens=sum(u.cached_prompt_tokens for u in usages),
        ),
        prompt_eval_duration_ns=sum(f.prompt_eval_duration_ns for f in finishes),
        eval_duration_ns=sum(f.eval_duration_ns for f in finishes),
    )
