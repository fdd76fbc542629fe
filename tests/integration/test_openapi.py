"""The OpenAPI document: every route in it, served equal to docs/openapi.json, and schemathesis
fuzzing a real `ortserve serve` with it (no 5xx, responses as documented)."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from ortserve.api import create_app
from ortserve.api.openapi import ROUTES
from ortserve.config import Settings
from tests.integration.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "docs" / "openapi.json"
# Routes being built elsewhere: their rows come with them (then drop them from here).
# Cases per operation and generation mode (positive, negative); raise it to fuzz longer.
EXAMPLES = int(os.environ.get("ORTSERVE_FUZZ_EXAMPLES", "100"))
MODELS = ("tiny-chat", "tiny-llama", "all-minilm")  # not "broken": it is meant to fail loading
GENERATORS, EMBEDDERS = ("tiny-chat", "tiny-llama"), ("all-minilm",)
# Operations whose bodies name a model that must embed, or a model that must generate: a
# schema cannot tell the two apart, so the positive cases name one that can.
_EMBEDDING_PATHS = ("/api/embed", "/api/embeddings", "/v1/embeddings")
_GENERATION_PATHS = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions",
                     "/v1/responses", "/v1/messages", "/v1/messages/count_tokens")  # fmt: skip
# A schema-valid request may still be refused for what no schema can say. Each entry: the
# operation ("*": any), the status, a regular expression its message matches, and why. Every
# other 4xx answer to a positive case is the document promising more than the server accepts
# ("schema-valid request rejected"), and fails the test.
SEMANTIC_REFUSALS = [
    ("POST /api/pull", 404, "", "the stand-in hub has no repositories"),
    ("DELETE /api/delete", 404, "", "the served models are never deleted: no other name exists"),
    ("GET /v1/responses/{response_id}", 404, "", "no stored response has a generated id"),
    ("DELETE /v1/responses/{response_id}", 404, "", "no stored response has a generated id"),
    ("HEAD /api/blobs/{digest}", 404, "", "documented: the file is absent"),
    ("POST /api/blobs/{digest}", 400, "", "the generated body does not hash to its digest"),
    ("POST /api/create", 400, "is not on the server", "no generated digest was uploaded"),
    ("POST /api/create", 400, "quantize: ", "the base model's own precision"),
    ("*", 400, r"\d\.0 is not of type 'integer'",
     "2.0 for an integer is refused, as Ollama's Go structs do (said in the document's info)"),
    ("*", 400, "dimensions must be between", "the embedding model's width"),
    ("*", 400, "prompt is too long", "the model's context length"),
    ("POST /v1/completions", 400, "at most 8 choices", "prompts times n: a product"),
    ("*", 400, "names unknown function|No tool call found",
     "a name or id that must match another part of the request"),
    ("*", 400, "not valid JSON|must be a JSON object", "JSON text inside a string"),
    ("*", 400, "not a valid JSON Schema|uses an |has no finite instance|too large|too deep",
     "a JSON Schema inside the request: checked against the meta-schema and the guidance"),
    ("*", 400, "prefill", "the last message's role"),
    ("*", 400, "does not support thinking", "the model's chat template has no thinking section"),
    ("POST /v1/responses", 404, "Previous response", "no stored response has a generated id"),
    ("POST /api/push", 404, "", "the stand-in hub has no repositories"),
    ("*", 422, "", "documented: a random-weight model's output failed the schema or tools"),
]  # fmt: skip


def test_every_route_of_the_app_is_in_the_table(tmp_path):
    app = create_app(Settings(models=tmp_path))
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        if rule.endpoint == "static":
            continue
        implicit = {"OPTIONS"} | ({"HEAD"} if "GET" in rule.methods else set())
        routes |= {(method, path) for method in rule.methods - implicit}
    table = [(route.method, route.path) for route in ROUTES]
    assert len(table) == len(set(table))
    assert routes == set(table)


def test_the_served_document_is_the_published_one(server):
    served = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert served["openapi"] == "3.1.0"
    regenerate = "python -m ortserve.api.openapi > docs/openapi.json"
    assert served == json.loads(PUBLISHED.read_text()), f"run `{regenerate}`"
    printed = subprocess.run([sys.executable, "-m", "ortserve.api.openapi"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(printed) == served


def test_the_document_is_valid_openapi_and_its_requests_are_the_enforced_schemas():
    import schemathesis

    document = json.loads(PUBLISHED.read_text())
    schema = schemathesis.openapi.from_dict(document)
    labels = [result.ok().label for result in schema.get_all_operations()]  # ok(): it resolved
    assert len(labels) == len(ROUTES)
    chat = document["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]
    assert chat["schema"] == {"$ref": "#/components/schemas/chat"}
    options = document["components"]["schemas"]["chat"]["properties"]["options"]
    assert options == {"$ref": "#/components/schemas/options"}


# ---- schemathesis against a real server ---------------------------------------------------------


class _NoSuchRepo(BaseHTTPRequestHandler):
    """A stand-in Hugging Face Hub that has no repositories (pulls end in 404, not 502)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_POST = do_GET  # a push's create_repo too

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def empty_hub():
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{hub.server_address[1]}"
    hub.shutdown()


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, served_library, empty_hub):
    """A server on a copy of the served library (fuzzing copies and creates models), its turns
    capped at 8 tokens so that thousands of generation requests stay quick."""
    from ortserve.library import Library

    root = tmp_path_factory.mktemp("fuzzed") / "models"
    shutil.copytree(served_library.root, root)
    server = Server(Library(root), ORTSERVE_MAX_TOKENS="8", HF_ENDPOINT=empty_hub,
                    HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    yield server
    server.stop()


def test_schemathesis_finds_no_server_errors_and_answers_as_documented(fuzzed_server):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    fuzz = _Fuzz(fuzzed_server.url)
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz.operation(result.ok(), mode)
    statuses = dict(sorted(fuzz.statuses.items()))
    print(f"schemathesis: {fuzz.cases} cases over {len(ROUTES)} operations, statuses {statuses}, "
          f"{fuzz.server_errors} 5xx, {len(fuzz.failures)} failures, "
          f"{len(fuzz.rejected)} schema-valid requests rejected")  # fmt: skip
    for label, counts in fuzz.by_operation.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    for rejected in fuzz.rejected:
        print(f"schema-valid request rejected: {rejected}")
    assert fuzz.cases >= len(ROUTES) * 10
    log = fuzzed_server.output()[-20000:]
    assert not fuzz.failures, "\n\n".join(fuzz.failures[:10]) + f"\n\nserver log:\n{log}"
    assert fuzz.server_errors == 0
    # the document says what the server accepts: no positive case gets a 4xx it cannot explain
    rejected = "\n\n".join(fuzz.rejected[:40])
    assert fuzz.rejected_count == 0, (
        f"{fuzz.rejected_count} schema-valid requests rejected:\n{rejected}"
    )


class _Fuzz:
    """Runs schemathesis cases one operation at a time and keeps every failure (no shrinking:
    the curl command of each failing case is the reproduction)."""

    def __init__(self, base_url: str):
        from schemathesis.checks import not_a_server_error
        from schemathesis.specs.openapi.checks import (
            content_type_conformance,
            response_schema_conformance,
            status_code_conformance,
        )

        self.base_url = base_url
        self.checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                       response_schema_conformance]  # fmt: skip
        self.session = requests.Session()
        self.cases = 0
        self.server_errors = 0
        self.statuses: collections.Counter = collections.Counter()
        self.by_operation: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self.failures: list[str] = []
        self.kinds: set[tuple] = set()
        self.rejected: list[str] = []  # one example of each kind of rejected positive case
        self.rejected_count = 0
        self.rejected_kinds: set[tuple] = set()

    def operation(self, operation, mode) -> None:
        from hypothesis import HealthCheck, Phase, given, settings

        names = _model_names(operation, mode)

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode), model=names)
        def run(case, model):
            self.case(_with_model(case, model))

        try:
            run()
        except Exception as exc:  # hypothesis could not generate (e.g. no negative case)
            if "Unsatisfiable" not in type(exc).__name__:
                raise

    def case(self, case) -> None:
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=60)
        except requests.RequestException as exc:
            self.failures.append(f"{case.operation.label}: no answer ({exc})\n"
                                 f"{case.as_curl_command()}")  # fmt: skip
            return
        self.cases += 1
        self.statuses[response.status_code] += 1
        self.by_operation[case.operation.label][response.status_code] += 1
        self.server_errors += response.status_code >= 500
        problems = []
        try:
            case.validate_response(response, checks=self.checks)
        except (AssertionError, BaseExceptionGroup) as exc:
            problems.append(str(exc))
        problems += _ndjson_problems(response)
        self._rejected_positive(case, response)
        kind = (case.operation.label, response.status_code, _title(problems))
        if problems and kind not in self.kinds:  # one example of each kind of failure
            self.kinds.add(kind)
            self.failures.append(f"{case.operation.label} -> {response.status_code}\n"
                                 f"{case.as_curl_command()}\n{''.join(problems)[:2000]}")  # fmt: skip

    def _rejected_positive(self, case, response) -> None:
        """Count a positive case answered 4xx for a reason SEMANTIC_REFUSALS does not give."""
        if not case.meta.generation.mode.is_positive or not 400 <= response.status_code < 500:
            return
        for operation, status, said, _why in SEMANTIC_REFUSALS:
            if (operation in ("*", case.operation.label) and status == response.status_code
                    and re.search(said, response.text)):  # fmt: skip
                return
        self.rejected_count += 1
        said = response.text[:300]
        # the kind of refusal: its message without the values it quotes
        kind = (case.operation.label, response.status_code, _QUOTED.sub("…", said)[:80])
        if kind not in self.rejected_kinds:
            self.rejected_kinds.add(kind)
            self.rejected.append(f"{case.operation.label} -> {response.status_code}: {said}\n"
                                 f"{case.as_curl_command()}")  # fmt: skip


_QUOTED = re.compile(r"'[^']*'|\\\"[^\\]*\\\"")


def _model_names(operation, mode):
    """Served models for positive cases (one that can do what the operation asks); negative
    cases keep the generated name 3 times in 4 (None), to reach the 404s too."""
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    if mode != GenerationMode.POSITIVE:
        return st.sampled_from((None, None, None, *MODELS))
    if operation.path in _EMBEDDING_PATHS:
        return st.sampled_from(EMBEDDERS)
    if operation.path in _GENERATION_PATHS:
        return st.sampled_from(GENERATORS)
    return st.sampled_from(MODELS)


def _with_model(case, model: str | None):
    """Point half the cases at real models, so that they get past the 404 into the engine."""
    if model is None:
        return case
    if case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = model
    if not isinstance(case.body, dict) or case.operation.path == "/api/delete":
        return case
    if case.operation.path == "/api/pull" and "model" in case.body:
        case.body["model"] = f"ortserve-test/{model}"  # asks the empty hub: 404
        return case
    if case.operation.path == "/api/push" and "destination" not in case.body:
        return case  # the model's name is its destination: a served name is not a repository
    # /api/create's model is the name it makes: the served ones are never overwritten
    keys = ("from",) if case.operation.path == "/api/create" else ("model", "from", "source")
    for key in keys:
        if key in case.body:
            case.body[key] = model
    return case


def _title(problems: list[str]) -> str:
    """The kind of a failure: its first `- ` line (schemathesis's title) or its first line."""
    text = "".join(problems)
    titles = [line for line in text.splitlines() if line.startswith("- ")]
    return titles[0] if titles else text.split("\n", 1)[0]


def _ndjson_problems(response) -> list[str]:
    """schemathesis has no NDJSON reader: each line must be one JSON object."""
    if not response.headers.get("content-type", [""])[0].startswith("application/x-ndjson"):
        return []
    problems = []
    for line in response.content.decode("utf-8").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            problems.append(f"NDJSON line is not a JSON object: {line[:200]!r}\n")
    return problems
