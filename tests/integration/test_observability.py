"""/metrics, access and model log lines (text and JSON), and X-Request-Id, on a real server."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def _samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_count_requests_tokens_and_first_tokens(make_server):
    server = make_server()
    body = {"model": "tiny-chat", "prompt": "hi", "stream": False, "options": {"num_predict": 6}}
    generated = 0
    for _ in range(3):
        response = httpx.post(server.url + "/api/generate", json=body, timeout=60)
        assert response.status_code == 200
        generated += response.json()["eval_count"]  # up to 6: the model may stop sooner
    assert httpx.post(server.url + "/api/generate", json={"model": "nope"}).status_code == 404
    samples = _samples(server)
    model = ("model", "tiny-chat:latest")
    requests = ("ortserve_requests_total",
                (("endpoint", "/api/generate"), ("method", "POST"), ("status", "200")))  # fmt: skip
    assert samples[requests] == 3
    assert samples[("ortserve_tokens_total", (("kind", "generated"), model))] == generated
    assert samples[("ortserve_tokens_total", (("kind", "prompt"), model))] > 0
    assert samples[("ortserve_time_to_first_token_seconds_count", (model,))] == 3
    assert samples[("ortserve_model_load_seconds_count", (model,))] == 1
    assert samples[("ortserve_loaded_models", ())] == 1
    assert samples[("ortserve_running_turns", (model,))] == 0
    assert samples[("ortserve_errors_total", (("type", "not_found_error"),))] >= 1


def test_json_logs_carry_access_lines_with_the_request_id_and_model_loads(make_server):
    server = make_server(ORTSERVE_LOG_FORMAT="json")
    body = {"model": "tiny-chat", "prompt": "hi", "options": {"num_predict": 4}}
    response = httpx.post(server.url + "/api/generate", json=body, timeout=60,
                          headers={"X-Request-Id": "trace-42"})  # fmt: skip
    assert response.headers["X-Request-Id"] == "trace-42"
    generated = httpx.get(server.url + "/api/tags", headers={"X-Request-Id": "bad id<script>"})
    assert len(generated.headers["X-Request-Id"]) == 32  # an unsafe id is replaced
    server.stop()
    records = [json.loads(line) for line in server.output().splitlines()
               if line.startswith("{")]  # fmt: skip
    access = [r for r in records if r["logger"] == "ortserve.access"]
    streamed = next(r for r in access if r["http"]["request_id"] == "trace-42")
    assert streamed["http"]["path"] == "/api/generate" and streamed["http"]["status"] == 200
    assert streamed["http"]["duration_s"] > 0 and streamed["http"]["key"] is None
    loads = [r["message"] for r in records if r["logger"] == "ortserve.engine"]
    assert any(m.startswith("loaded tiny-chat:latest on cpu in ") for m in loads)


def test_the_access_log_names_the_key_never_the_key_itself(make_server):
    key = "sk-observed-0123456789"
    server = make_server(ORTSERVE_API_KEYS=f"dashboard:{key}")
    httpx.get(server.url + "/api/tags", headers={"Authorization": f"Bearer {key}"})
    server.stop()
    output = server.output()
    line = next(line for line in output.splitlines() if "GET /api/tags 200" in line)
    assert "key=dashboard" in line
    assert key not in output
