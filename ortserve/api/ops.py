"""Operations endpoints: liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import os

from flask import Blueprint

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
