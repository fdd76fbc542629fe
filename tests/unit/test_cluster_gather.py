"""The cluster's /api/ps and /metrics: every replica's answer merged (cluster/gather.py).
tests/integration/test_cluster_state.py gathers them from real replicas on Ray."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ortserve.cluster.gather import Answer, merge_metrics, merge_ps


def exposition(pending: int, requests: int) -> bytes:
    """A replica's /metrics, as its app writes it (a registry of its own)."""
    registry = CollectorRegistry()
    Gauge("ortserve_pending_turns", "Turns queued or generating", registry=registry).set(pending)
    counter = Counter("ortserve_requests", "HTTP requests answered", ["status"], registry=registry)
    counter.labels("200").inc(requests)
    Histogram("ortserve_model_load_seconds", "Time to load a model", ["model"],
              registry=registry, buckets=(1, 10)).labels("m").observe(2)  # fmt: skip
    return generate_latest(registry)


def answer(replica: str, body: bytes) -> Answer:
    return Answer(replica, 200, [], body)


def test_ps_lists_every_replicas_models_each_naming_its_replica():
    one = {"models": [{"name": "a:latest", "size": 1}]}
    two = {"models": [{"name": "a:latest", "size": 1}, {"name": "b:latest", "size": 2}]}
    merged = json.loads(merge_ps([answer("r1", json.dumps(one).encode()),
                                  answer("r2", json.dumps(two).encode())]))  # fmt: skip
    assert merged == {"models": [{"name": "a:latest", "size": 1, "replica": "r1"},
                                 {"name": "a:latest", "size": 1, "replica": "r2"},
                                 {"name": "b:latest", "size": 2, "replica": "r2"}]}  # fmt: skip
    assert json.loads(merge_ps([])) == {"models": []}


def test_metrics_are_one_exposition_with_a_replica_label_on_every_sample():
    text = merge_metrics([answer("r1", exposition(2, 5)), answer("r2", exposition(1, 7))]).decode()
    for family in ("ortserve_pending_turns", "ortserve_requests_total",
                   "ortserve_model_load_seconds"):  # fmt: skip
        assert text.count(f"# HELP {family} ") == 1 and text.count(f"# TYPE {family} ") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    pending = {s.labels["replica"]: s.value for s in families["ortserve_pending_turns"].samples}
    assert pending == {"r1": 2, "r2": 1}
    requests = [s for s in families["ortserve_requests"].samples if s.name.endswith("_total")]
    assert {(s.labels["replica"], s.labels["status"], s.value) for s in requests} == {
        ("r1", "200", 5), ("r2", "200", 7)}  # fmt: skip
    buckets = [s for s in families["ortserve_model_load_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["le"] == "10.0"]  # fmt: skip
    assert sorted(s.labels["replica"] for s in buckets) == ["r1", "r2"]
    assert all("replica" in s.labels for f in families.values() for s in f.samples)


def test_a_family_only_one_replica_has_is_kept():
    only = CollectorRegistry()
    Gauge("ortserve_loaded_models", "Models in memory", registry=only).set(3)
    text = merge_metrics([answer("r1", exposition(0, 1)), answer("r2", generate_latest(only))])
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert [(s.labels, s.value) for s in families["ortserve_loaded_models"].samples] == [
        ({"replica": "r2"}, 3)]  # fmt: skip


def test_the_cluster_stores_responses_in_the_library_unless_told_otherwise(monkeypatch):
    pytest.importorskip("ray.serve")
    from ortserve.cluster.deployments import build

    def replica_env(app) -> dict:
        replica = app._bound_deployment.init_args[0]
        return replica._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]

    monkeypatch.delenv("ORTSERVE_RESPONSES_STORE", raising=False)
    assert replica_env(build())["ORTSERVE_RESPONSES_STORE"] == "library"
    monkeypatch.setenv("ORTSERVE_RESPONSES_STORE", "memory")
    assert replica_env(build())["ORTSERVE_RESPONSES_STORE"] == "memory"
