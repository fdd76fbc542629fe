"""Operations endpoints: liveness and readiness probes, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

import os

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ortserve import metrics
from ortserve.api.openapi import document
from ortserve.api.protocol import Protocol, Route, json_body, text
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response

ops_bp = Blueprint("ops", __name__)


@ops_bp.get("/healthz")
def healthz():
    """The process answers HTTP."""
    return json_response({"status": "ok"})


@ops_bp.get("/readyz")
def readyz():
    """Ready when the model library can be read (a missing or unreadable volume is not) and
    the models ORTSERVE_PRELOAD names are loaded: 503 "loading" until then, 503 "failed"
    naming the model whose load failed."""
    state = current_state()
    root = state.library.root
    # /readyz answers without a key: the message names no server path
    if not root.is_dir():
        return json_response({"status": "not ready", "error": "the model library is missing"}, 503)
    if not os.access(root, os.R_OK | os.X_OK):
        return json_response({"status": "not ready", "error": "the model library is not readable"},
                             503)  # fmt: skip
    if state.preload is None:
        return json_response({"status": "ready"})
    report = state.preload.report()
    body = {"status": report.status, "models": report.models}
    if report.error:
        body["error"] = report.error
    return json_response(body, 200 if report.status == "ready" else 503)


@ops_bp.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3.1 document of every route (docs/openapi.json is a copy)."""
    return json_response(document())


@ops_bp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format; per-model gauges are read from the runtime as it is now."""
    runtime = current_state().started_runtime
    counts = runtime.turn_counts() if runtime is not None else {}
    metrics.LOADED_MODELS.set(len(counts))
    for gauge in (metrics.QUEUED_TURNS, metrics.RUNNING_TURNS):
        gauge.clear()  # unloaded models leave the gauges
    for name, (queued, running) in counts.items():
        metrics.QUEUED_TURNS.labels(name).set(queued)
        metrics.RUNNING_TURNS.labels(name).set(running)
    metrics.PENDING_TURNS.set(sum(queued + running for queued, running in counts.values()))
    return Response(generate_latest(metrics.REGISTRY), mimetype=CONTENT_TYPE_LATEST)


PROTOCOL = Protocol(
    "ops", ops_bp, rank=0,
    routes=(
        Route("GET", "/healthz", "Liveness: the process answers HTTP", None, json_body("Status")),
        Route("GET", "/readyz", "Readiness: the model library can be read and the models "
              "ORTSERVE_PRELOAD names are loaded", None,
              {**json_body("Status"), **json_body("Status", "not ready", 503)}),
        Route("GET", "/metrics", "Prometheus metrics", None,
              text("text/plain", "Prometheus text")),
        Route("GET", "/openapi.json", "This document", None, json_body("OpenAPI")),
    ),
)  # fmt: skip
