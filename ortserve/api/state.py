"""The state ortserve's blueprints share, kept in app.extensions["ortserve"].

A leaf, as flaskr's get_db: blueprints import current_state from here, and app.py (which
imports the blueprints) never needs to be imported by them.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import current_app, has_request_context, request

from ortserve.config import Settings

EXTENSION = "ortserve"


class ServerState:
    """What the blueprints share, kept in app.extensions["ortserve"]."""

    def __init__(self, settings: Settings, runtime: Any = None, *, url_prefix: str = ""):
        self.settings = settings
        self.url_prefix = url_prefix.rstrip("/")
        self.owns_app = False
        self._runtime = runtime
        self._lock = threading.Lock()
        self._responses = None
        self._hangups = None
        self.preload = None  # engine.preload.Preload, once start_preload() has started it
        self._batches = None
        self.batch_runner = None  # serving.batches.BatchRunner, once start_batches() started it

    def start_preload(self) -> None:
        """Load ORTSERVE_PRELOAD's models in the background (/readyz waits for them)."""
        with self._lock:
            if not self.settings.preload or self.preload is not None:
                return
            from ortserve.engine.preload import Preload

            # the runtime is made in the preload's thread: importing onnxruntime takes a while
            self.preload = Preload(lambda name: self.runtime.preload(name), self.settings.preload)
        self.preload.start()

    @property
    def batches(self):
        """The Batch API's files and batches (serving/batches.py), under the library root."""
        with self._lock:
            if self._batches is None:
                from ortserve.serving.batches import BatchStore

                self._batches = BatchStore(
                    self.settings.models, max_file_bytes=self.settings.max_batch_file_bytes
                )
            return self._batches

    def start_batches(self, execute_factory, *, only_if_pending: bool = False) -> None:
        """Start the thread that runs batches (once); with only_if_pending, only when some
        batch is unfinished (a server starting resumes them; an app with none has no thread)."""
        store = self.batches
        with self._lock:
            if self.batch_runner is None:
                if only_if_pending and not store.pending():
                    return
                from ortserve.serving.batches import BatchRunner

                self.batch_runner = BatchRunner(
                    store, execute_factory, concurrency=self.settings.batch_lines_at_once
                )
        self.batch_runner.start()
        self.batch_runner.wake()

    @property
    def runtime(self):
        """The engine runtime, created on first use (loading onnxruntime is not free)."""
        with self._lock:  # two threads' first requests must not build two runtimes
            if self._runtime is None:
                from ortserve.engine.runtime import Runtime
                from ortserve.library import Library

                self._runtime = Runtime(self.settings, Library(self.settings.models))
            return self._runtime

    @property
    def library(self):
        """The runtime's library; no runtime is created just to read the library."""
        if self._runtime is not None:
            return self._runtime.library
        from ortserve.library import Library

        return Library(self.settings.models)

    @property
    def responses(self):
        """Stored Responses API answers, created on first use: in memory (bounded), or with
        ORTSERVE_RESPONSES_STORE=library as files under the library root, which every process
        sharing the library sees (the cluster's replicas)."""
        with self._lock:
            if self._responses is None:
                if self.settings.responses_store == "library":
                    from ortserve.serving.response_files import LibraryResponseStore

                    self._responses = LibraryResponseStore(self.settings.models)
                else:
                    from ortserve.serving.store import ResponseStore

                    self._responses = ResponseStore()
            return self._responses

    def watch(self, exchange) -> None:
        """Hang `exchange` up when the current request's client goes away (serving/core.start
        calls this; api/hangup.py says why). Only gunicorn hands the app its socket."""
        sock = request.environ.get("gunicorn.socket") if has_request_context() else None
        if sock is None:
            return
        with self._lock:
            if self._hangups is None:
                from ortserve.api.hangup import HangupWatch

                self._hangups = HangupWatch()
        self._hangups.watch(sock, exchange)

    @property
    def started_runtime(self):
        """The runtime if one exists; None rather than creating one."""
        return self._runtime

    def shutdown(self, grace: float = 0.0) -> None:
        """Let in-flight turns finish for `grace` seconds, then cancel what is left."""
        if self.preload is not None:
            self.preload.stop()
        if self.batch_runner is not None:  # first: a line cut short now is not its answer
            self.batch_runner.stop()
        runtime = self._runtime
        if runtime is not None:
            runtime.shutdown(grace)


def current_state() -> ServerState:
    """The ServerState of the current app; a bare runtime placed there is wrapped."""
    state = current_app.extensions.get(EXTENSION)
    if state is None:
        raise RuntimeError("ortserve is not set up on this app: call ortserve.api.init_app(app)")
    if not isinstance(state, ServerState):
        state = ServerState(Settings.from_env(), state)
        current_app.extensions[EXTENSION] = state
    return state
