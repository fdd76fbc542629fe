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

    do_HEAD = do_GET

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
          f"{fuzz.server_errors} 5xx, {len(fuzz.failures)} failures")  # fmt: skip
    for label, counts in fuzz.by_operation.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert fuzz.cases >= len(ROUTES) * 10
    log = fuzzed_server.output()[-20000:]
    assert not fuzz.failures, "\n\n".join(fuzz.failures[:10]) + f"\n\nserver log:\n{log}"
    assert fuzz.server_errors == 0


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

    def operation(self, operation, mode) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st

        names = st.sampled_from((None, None, None, *MODELS))  # None: keep the generated name

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
        kind = (case.operation.label, response.status_code, _title(problems))
        if problems and kind not in self.kinds:  # one example of each kind of failure
            self.kinds.add(kind)
            self.failures.append(f"{case.operation.label} -> {response.status_code}\n"
                                 f"{case.as_curl_command()}\n{''.join(problems)[:2000]}")  # fmt: skip


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
    for key in ("model", "from", "source"):
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
