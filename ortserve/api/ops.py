"""Operations endpoints: liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import os

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ortserve import metrics
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response

ops_bp = Blueprint("ops", __name__)


@ops_bp.get("/healthz")
def healthz():
    """The process answers HTTP."""
    return json_response({"status": "ok"})


@ops_bp.get("/readyz")
def readyz():
    """Ready when the model library can be read (a missing or unreadable volume is not)."""
    root = current_state().library.root
    if not root.is_dir():
        return json_response({"status": "not ready", "error": f"{root} is not a directory"}, 503)
    if not os.access(root, os.R_OK | os.X_OK):
        return json_response({"status": "not ready", "error": f"{root} is not readable"}, 503)
    return json_response({"status": "ready"})


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
    return Response(generate_latest(metrics.REGISTRY), mimetype=CONTENT_TYPE_LATEST)
