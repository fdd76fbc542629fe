"""Run the HTTP server: gunicorn (one gthread worker) on POSIX, waitress on Windows.

One worker because the models live in the worker's memory: a second worker would load a
second copy of every model. Concurrency comes from threads, and scale from replicas.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

from ortserve.config import Settings

# The arbiter kills workers this long after the grace period, so the worker has time to
# cancel what is left, write the streams' last lines and exit cleanly first.
_EXIT_MARGIN_S = 5
SERVERS = ("gunicorn", "waitress")


def serve(settings: Settings, *, server: str | None = None, runtime: Any = None) -> None:
    """Serve the API until stopped (SIGTERM: graceful; Ctrl+C: now)."""
    server = server or ("waitress" if os.name == "nt" else "gunicorn")
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}: use one of {', '.join(SERVERS)}")
    check_port_free(settings)
    from ortserve import logs

    logs.configure(settings.log_format)
    settings.models.mkdir(parents=True, exist_ok=True)  # an empty library is a ready one
    if server == "waitress":
        serve_waitress(settings, runtime=runtime)
    else:
        serve_gunicorn(settings, runtime=runtime)


def check_port_free(settings: Settings) -> None:
    """Stop with one line when the port is taken, saying by whom and how to pick another."""
    from ortserve.errors import OrtServeError
    from ortserve.ports import who_listens

    host = settings.reachable_host
    holder = who_listens(host, settings.port)
    if holder is None:
        return
    already = (
        " (already serving: `ortserve ps` talks to it)" if holder.startswith("ortserve") else ""
    )
    raise OrtServeError(
        f"{settings.address} is in use by {holder}{already}; serve on another port with "
        f"ORTSERVE_HOST={settings.host}:{settings.port + 1}"
    )


def announce(settings: Settings) -> None:
    """The one start-up line, printed once the socket is bound (and a warning when exposed)."""
    from ortserve.api.security import is_loopback

    print(f"ortserve listening on {url(settings)} (models: {settings.models})", flush=True)
    if not is_loopback(settings.host) and not settings.api_keys:
        print(
            f"warning: ortserve is reachable beyond this machine ({settings.host}) and asks for "
            "no API key: anyone who can reach the port can use and change the library; "
            "set ORTSERVE_API_KEYS (docs/deployment.md)",
            flush=True,
        )


def url(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


# ---- waitress (Windows, or on request) ---------------------------------------------------------


def serve_waitress(settings: Settings, *, runtime: Any = None) -> None:
    """waitress, same app; on Ctrl+C it stops and what is still generating is cancelled."""
    import waitress

    from ortserve.api import create_app

    app = create_app(settings, runtime=runtime)
    server = waitress.create_server(
        app, host=settings.host, port=settings.port, threads=settings.threads
    )
    announce(settings)
    _stop_on_sigterm()
    try:
        server.run()  # returns after Ctrl+C, having given running requests a few seconds
    finally:
        app.extensions["ortserve"].shutdown(0)


def _stop_on_sigterm() -> None:
    """SIGTERM stops waitress the way Ctrl+C does (only the main thread may set handlers)."""
    if os.name == "nt" or threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


# ---- gunicorn (POSIX) -------------------------------------------------------------------------


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings: one gthread worker, no request timeout (streams can be long)."""
    return {
        "bind": [url(settings).removeprefix("http://")],
        "workers": 1,
        "worker_class": _graceful_worker(),
        "threads": settings.threads,
        "timeout": 0,
        "graceful_timeout": math.ceil(settings.grace_period + _EXIT_MARGIN_S),
        "keepalive": 5,
        "when_ready": lambda arbiter: announce(settings),
        "worker_exit": _worker_exit,
        "control_socket_disable": True,  # gunicorn >= 25: one shared default path otherwise
    }


def serve_gunicorn(settings: Settings, *, runtime: Any = None) -> None:
    """gunicorn running create_app(settings) in this process (no subprocess, no argv)."""
    gunicorn_application(settings, runtime=runtime).run()


def gunicorn_application(settings: Settings, *, runtime: Any = None):
    """A gunicorn BaseApplication for ortserve (built here: gunicorn is POSIX-only)."""
    from gunicorn.app.base import BaseApplication

    class OrtServeApplication(BaseApplication):
        def __init__(self):
            self.settings = settings
            self.flask_app = None
            super().__init__()

        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                if key in self.cfg.settings:  # settings differ between gunicorn versions
                    self.cfg.set(key, value)

        def load(self):
            """Runs in the worker after the fork: the runtime is created there, never shared."""
            from ortserve.api import create_app

            self.flask_app = create_app(settings, runtime=runtime)
            return self.flask_app

    return OrtServeApplication()


def _graceful_worker():
    """gthread, plus: on SIGTERM, turns get the grace period to finish, then are cancelled."""
    from gunicorn.workers.gthread import ThreadWorker

    class GracefulThreadWorker(ThreadWorker):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)  # stop accepting; wait for open connections
            state = _state_of(self)
            if state is not None:
                grace = self.app.settings.grace_period
                threading.Thread(target=state.shutdown, args=(grace,), daemon=True).start()

    return GracefulThreadWorker


def _worker_exit(arbiter, worker) -> None:
    """The worker is leaving: cancel anything still running so its threads can end."""
    state = _state_of(worker)
    if state is not None:
        state.shutdown(0)


def _state_of(worker):
    app = getattr(worker.app, "flask_app", None)
    return app.extensions.get("ortserve") if app is not None else None
