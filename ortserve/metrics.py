"""Prometheus metrics: defined once here, recorded by the API and the engine, served at /metrics.

A registry of ortserve's own, so that mounting ortserve in an app that has its own
prometheus-client metrics (or creating several apps in one process) never collides.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "ortserve_requests", "HTTP requests answered", ["endpoint", "method", "status"],
    registry=REGISTRY,
)  # fmt: skip
REQUEST_SECONDS = Histogram(
    "ortserve_request_duration_seconds", "Time from request to the end of the response",
    ["endpoint"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)  # fmt: skip
ERRORS = Counter("ortserve_errors", "Error responses by type", ["type"], registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "ortserve_time_to_first_token_seconds", "From submission to the first generated token",
    ["model"], registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
TOKENS = Counter(
    "ortserve_tokens", "Tokens read (prompt) and written (generated)", ["model", "kind"],
    registry=REGISTRY,
)  # fmt: skip
LOAD_SECONDS = Histogram(
    "ortserve_model_load_seconds", "Time to load a model", ["model"], registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)  # fmt: skip
LOADED_MODELS = Gauge("ortserve_loaded_models", "Models in memory", registry=REGISTRY)
QUEUED_TURNS = Gauge(
    "ortserve_queued_turns", "Turns waiting for a batch slot", ["model"], registry=REGISTRY
)
RUNNING_TURNS = Gauge("ortserve_running_turns", "Turns generating", ["model"], registry=REGISTRY)
# One number per replica, what an autoscaler scales on (an HPA through prometheus-adapter, a
# KEDA ScaledObject: deploy/kubernetes): the two gauges above summed over every model.
PENDING_TURNS = Gauge(
    "ortserve_pending_turns", "Turns queued or generating, all models together", registry=REGISTRY
)
