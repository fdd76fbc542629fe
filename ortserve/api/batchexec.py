"""Run one batch line through the app itself, in-process: the same validation, limits,
protocol shapes and error bodies as over HTTP, with no socket and no second code path.

The call carries security.BATCH_OWNER in its WSGI environ (the key that made the batch; HTTP
cannot set it), and runs at batch priority (serving/priority.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from flask import Flask

from ortserve.api.security import BATCH_OWNER
from ortserve.api.state import EXTENSION
from ortserve.errors import OrtServeError
from ortserve.serving.batchlines import BatchLine, answer_record
from ortserve.serving.priority import background


class LineExecutor:
    """Calls `app` for each line, as the key named `owner` (None: no keys configured).

    `background=False` runs the lines at interactive priority: `ortserve batch` has no
    interactive turns to leave a slot for, so its lines take all ORTSERVE_NUM_PARALLEL."""

    def __init__(self, app: Flask, owner: str | None = None, *, background: bool = True):
        self.app = app
        self.owner = owner
        self.background = background
        state = app.extensions.get(EXTENSION)
        self.prefix = getattr(state, "url_prefix", "")

    def preload(self, names: Iterable[str]) -> None:
        """Load these models now and keep them (a model that cannot load is left for its
        lines to fail on, alone, with the error a request would get)."""
        runtime = self.app.extensions[EXTENSION].runtime
        for name in names:
            with contextlib.suppress(OrtServeError):
                runtime.preload(name)

    def __call__(self, line: BatchLine) -> dict[str, Any]:
        environ = {BATCH_OWNER: self.owner or "", "REMOTE_ADDR": "127.0.0.1"}
        priority = background() if self.background else contextlib.nullcontext()
        with priority, self.app.test_client() as client:
            response = client.post(self.prefix + line.url, json=line.body, environ_base=environ)
            try:
                body = response.get_json(silent=True)
                if body is None:  # not JSON: keep the text, as the error file must say something
                    body = {"error": {"message": response.get_data(as_text=True)[:2000]}}
            finally:
                response.close()
        return answer_record(line, response.status_code, body, response.headers.get("X-Request-Id"))
