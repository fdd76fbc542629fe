"""Per-request bookkeeping: X-Request-Id, the access log line, and request metrics.

The access line is written when the response is done, streams included (call_on_close), so
its duration is the whole exchange; it names the API key by its name, never the key.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from flask import Flask, Response, g, request

from ortserve import metrics

access_log = logging.getLogger("ortserve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a client's id is echoed: keep it tame


def install(app: Flask, is_ours: Callable[[], bool]) -> None:
    """Request ids, access lines and metrics for ortserve's routes on `app`; once per app."""
    if app.extensions.get("ortserve.observe"):
        return
    app.extensions["ortserve.observe"] = True

    @app.before_request
    def _start():
        if is_ours():
            given = request.headers.get("X-Request-Id", "")
            g.ortserve_request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
            g.ortserve_started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        started = g.get("ortserve_started")
        if started is None:
            return response
        response.headers["X-Request-Id"] = g.ortserve_request_id
        line = _Line(request.method, request.path, _endpoint(), response.status_code,
                     g.ortserve_request_id, g.get("ortserve_key_name"), started)  # fmt: skip
        response.call_on_close(line.write)
        return response


def _endpoint() -> str:
    """The route's rule (bounded label values), not the raw path."""
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


class _Line:
    """One request's access record, written once its response has been sent."""

    def __init__(self, method, path, endpoint, status, request_id, key_name, started):
        self.fields = (method, path, endpoint, status, request_id, key_name)
        self.started = started

    def write(self) -> None:
        method, path, endpoint, status, request_id, key_name = self.fields
        seconds = time.perf_counter() - self.started
        metrics.REQUESTS.labels(endpoint, method, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(endpoint).observe(seconds)
        access_log.info(
            '%s %s %d %.3fs id=%s key=%s', method, path, status, seconds, request_id,
            key_name or "-",
            extra={"http": {"method": method, "path": path, "status": status,
                            "duration_s": round(seconds, 6), "request_id": request_id,
                            "key": key_name}},
        )  # fmt: skip
