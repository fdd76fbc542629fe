"""Run the HTTP server: gunicorn (one gthread worker) on POSIX, waitress on Windows.

One worker because the models live in the worker's memory: a second worker would load a
second copy of every model. Concurrency comes from threads, and scale from replicas.

A thread is given a request only once it has arrived: waitress reads whole requests in its
main loop, and ortserve's gunicorn worker does the same for the head and bodies up to 1 MiB
(gthread alone hands a connection to a thread that then waits on the client, so 32 idle or
half-sent connections stalled 32 threads). A client that sends nothing, or half a request,
for ORTSERVE_READ_TIMEOUT is cut off, and while it waits it holds no thread.

One client address holds at most ORTSERVE_MAX_CONNECTIONS_PER_CLIENT of the worker's
connections (1000 idle ones from one client stalled /healthz for 30 s); errors gunicorn
answers before the app sees a request are JSON, as the app's are.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ortserve.config import Settings

# The arbiter kills workers this long after the grace period, so the worker has time to
# cancel what is left, write the streams' last lines and exit cleanly first.
_EXIT_MARGIN_S = 5
SERVERS = ("gunicorn", "waitress")
# What the gunicorn worker's main loop reads before a thread takes the request: the head
# (a longer one is refused with 431, as nginx's default buffers would) and a body up to
# _BODY_BUFFER (a larger one, or one sent after `Expect: 100-continue`, is read by the
# thread, each read waiting ORTSERVE_READ_TIMEOUT at most); all requests together hold
# at most _BUFFER_BUDGET, beyond which complete heads go to threads at once.
_MAX_HEAD = 64 * 1024
_BODY_BUFFER = 1 << 20
_BUFFER_BUDGET = 64 << 20
_RECV = 64 * 1024
# Connections the worker holds at once (reading, running or kept alive); more wait in
# the socket backlog. Each one reading holds at most _MAX_HEAD + _BODY_BUFFER.
WORKER_CONNECTIONS = 1000
# gunicorn's largest request line (its default, 4094, refused a long GET with 414).
REQUEST_LINE_LIMIT = 8190
# The signals that stop a worker: held back from fork until the worker's handlers are set.
_STOP_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGQUIT") if hasattr(signal, name)
)


def serve(settings: Settings, *, server: str | None = None, runtime: Any = None) -> None:
    """Serve the API until stopped (SIGTERM: graceful; Ctrl+C: now)."""
    server = server or ("waitress" if os.name == "nt" else "gunicorn")
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}: use one of {', '.join(SERVERS)}")
    check_port_free(settings)
    import logging

    from ortserve import logs

    logs.configure(settings.log_format)
    for note in settings.env_notes:  # OLLAMA_* variables read in place of unset ORTSERVE_* ones
        logging.getLogger("ortserve.config").info(note)
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
    server = waitress.create_server(app, **waitress_options(settings))
    announce(settings)
    _stop_on_sigterm()
    try:
        server.run()  # returns after Ctrl+C, having given running requests a few seconds
    finally:
        app.extensions["ortserve"].shutdown(0)


def waitress_options(settings: Settings) -> dict[str, Any]:
    """waitress reads whole requests before a thread takes them; idle ones end at the timeout."""
    return {
        "host": settings.host,
        "port": settings.port,
        "threads": settings.threads,
        # A connection with no request in progress that sent nothing for this long closes;
        # the check runs every cleanup_interval, so the two together bound the wait.
        "channel_timeout": max(1, math.ceil(settings.read_timeout)),
        "cleanup_interval": max(1, min(30, math.ceil(settings.read_timeout / 2))),
    }


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
        "worker_connections": WORKER_CONNECTIONS,
        "limit_request_line": REQUEST_LINE_LIMIT,
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

    arbiter_class = _arbiter_class()

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

        def run(self):
            try:
                arbiter_class(self).run()
            except RuntimeError as exc:  # what gunicorn's own run() does with a bad config
                raise SystemExit(f"Error: {exc}") from None

    return OrtServeApplication()


def _arbiter_class():
    """gunicorn's arbiter, forking workers with the stop signals blocked.

    Between fork and the worker's own handlers, a SIGTERM (a deploy stopping a server that
    is just starting) reached the arbiter's handler copied into the child, which queued it
    where nothing reads it: the worker booted on and the arbiter waited the whole graceful
    timeout for it. Blocked, the signal stays pending until the worker can act on it."""
    from gunicorn.arbiter import Arbiter

    class OrtServeArbiter(Arbiter):
        def spawn_worker(self):
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                return super().spawn_worker()  # the worker never returns from here
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    return OrtServeArbiter


def _graceful_worker():
    """gthread, plus: requests are read before a thread takes them, one client address
    holds a bounded share of the connections, gunicorn's own error pages are JSON (see the
    module's docstring), and on SIGTERM turns get the grace period to finish, then are
    cancelled."""
    from gunicorn import util
    from gunicorn.workers.gthread import TConn, ThreadWorker

    class ClientConn(TConn):
        """A connection, counted against its client address until it closes."""

        def __init__(self, *args, on_close=None):
            super().__init__(*args)
            self.on_close = on_close

        def close(self, graceful=False):
            on_close, self.on_close = self.on_close, None  # gthread may close twice
            if on_close is not None:
                on_close()
            super().close(graceful)

    class GracefulThreadWorker(ThreadWorker):
        def init_process(self):
            self.read_timeout = self.app.settings.read_timeout
            self.arriving: dict[Any, Arriving] = {}
            self.buffered = 0  # bytes the main loop holds for requests still arriving
            self.clients = ClientCounts(self.app.settings.max_connections_per_client)
            # What gunicorn answers itself (a request line over the limit, a duplicate Host)
            # it writes with util.write_error, as an HTML page: this process writes JSON.
            util.write_error = write_json_error
            super().init_process()

        def init_signals(self):
            super().init_signals()
            # A stop signal that came while booting (see _arbiter_class) is handled now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)  # stop accepting; wait for open connections
            state = _state_of(self)
            if state is not None:
                grace = self.app.settings.grace_period
                threading.Thread(target=state.shutdown, args=(grace,), daemon=True).start()

        # ---- main loop: new and kept-alive connections are read here, not in a thread ----

        def accept(self, listener):
            try:
                client, address = listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            peer = address[0] if isinstance(address, tuple) else None  # None: a unix socket
            if not self.clients.admit(peer):
                refuse(client, _too_many(self.clients.cap))
                return
            self.nr_conns += 1
            conn = ClientConn(self.cfg, client, address, listener.getsockname(),
                              on_close=partial(self.clients.release, peer))  # fmt: skip
            self.await_request(conn)

        def on_client_socket_readable(self, conn, client):
            self.poller.unregister(client)
            self.keepalived_conns.remove(conn)
            self.await_request(conn)

        def await_request(self, conn) -> None:
            if self.cfg.is_ssl:
                self.enqueue_req(conn)  # TLS: the handshake runs in the thread (gthread's way)
                return
            conn.sock.setblocking(False)
            arriving = Arriving(conn, time.monotonic() + self.read_timeout)
            self.arriving[conn] = arriving
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_data, arriving))

        def on_data(self, arriving: Arriving, sock) -> None:
            try:
                data = sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the client went away
                self.drop(arriving)
                return
            arriving.data += data
            self.buffered += len(data)
            verdict = arriving.verdict(over_budget=self.buffered > _BUFFER_BUDGET)
            if verdict == "ready":
                self.dispatch(arriving)
            elif verdict == "too large":
                self.drop(arriving, _TOO_LARGE)

        def dispatch(self, arriving: Arriving) -> None:
            """The request is in (or its body is for the thread to read): a thread takes it."""
            self.forget(arriving)
            arriving.conn.ortserve_received = bytes(arriving.data)
            self.enqueue_req(arriving.conn)

        def drop(self, arriving: Arriving, answer: bytes = b"") -> None:
            self.forget(arriving)
            if answer:
                _send_quietly(arriving.conn.sock, answer)
            self.nr_conns -= 1
            arriving.conn.close()

        def forget(self, arriving: Arriving) -> None:
            self.poller.unregister(arriving.conn.sock)
            del self.arriving[arriving.conn]
            self.buffered -= len(arriving.data)

        def murder_pending(self):
            """Also: cut off requests past their deadline (and idle ones when stopping)."""
            super().murder_pending()
            now = time.monotonic()
            for arriving in list(self.arriving.values()):  # in deadline order: as they came
                if now >= arriving.deadline:
                    answer = _TIMED_OUT if arriving.data else b""
                    self.drop(arriving, answer)
                elif not self.alive and not arriving.data:
                    self.drop(arriving)
                elif self.alive:
                    break

        # ---- thread: parse what the main loop read; later reads wait read_timeout at most ----

        def handle(self, conn):
            received = conn.__dict__.pop("ortserve_received", None)
            if received is not None:
                conn.init()  # the parser, on a blocking socket (idempotent)
                conn.parser.unreader.unread(received)
                if not isinstance(conn.parser.unreader.sock, PatientReader):
                    conn.parser.unreader.sock = PatientReader(conn.sock, self.read_timeout)
            return super().handle(conn)

    return GracefulThreadWorker


class ClientCounts:
    """Open connections per client address, each address capped at `cap` (0: no cap).

    The worker holds WORKER_CONNECTIONS at most and stops accepting at the limit, so one
    client that opened them all (idle, each waiting for its read timeout) kept every other
    client out, health checks included. Behind a proxy every client has the proxy's
    address: raise the cap there, or set 0 and let the proxy limit its clients.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.open: dict[str, int] = {}
        self._lock = threading.Lock()  # connections close on the main loop, but cheaply safe

    def admit(self, peer: str | None) -> bool:
        """Count a new connection from `peer`; False (not counted) when it is at its cap."""
        if peer is None or not self.cap:
            return True
        with self._lock:
            if self.open.get(peer, 0) >= self.cap:
                return False
            self.open[peer] = self.open.get(peer, 0) + 1
            return True

    def release(self, peer: str | None) -> None:
        if peer is None or not self.cap:
            return
        with self._lock:
            left = self.open.get(peer, 0) - 1
            if left > 0:
                self.open[peer] = left
            else:
                self.open.pop(peer, None)


def refuse(sock, answer: bytes) -> None:
    """Answer a connection the worker will not take, without waiting on it, and close it.

    What the client sent already is read first (as much as has come): closing a socket
    with unread data resets the connection, and the client could lose the answer."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.recv(_RECV)
    _send_quietly(sock, answer)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's util.write_error, answering {"error": ...} in place of an HTML page."""
    from gunicorn import util

    answer = _answer(f"{status_int} {reason}", mesg or reason.lower())
    util.write_nonblock(sock, answer)


@dataclass
class Arriving:
    """A request the worker's main loop is reading: what came so far, and its deadline."""

    conn: Any
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    chunks_at: int = 0  # where the next unscanned chunk of a chunked body starts

    def verdict(self, *, over_budget: bool = False) -> str:
        """What to do next: `ready` (for a thread), `more` (wait) or `too large` (431)."""
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            return "too large" if len(self.data) > _MAX_HEAD else "more"
        head, body = bytes(self.data[: end + 4]), self.data[end + 4 :]
        if over_budget or len(body) > _BODY_BUFFER:
            return "ready"
        framing = _framing(head)
        if framing is None:
            return "ready"  # no body, or one for the thread (large, 100-continue, unknown)
        if framing == "chunked":
            try:
                self.chunks_at, done = scan_chunks(body, self.chunks_at)
            except ValueError:
                return "ready"  # malformed: gunicorn's parser answers it
            return "ready" if done else "more"
        return "ready" if len(body) >= framing else "more"


def _framing(head: bytes) -> int | str | None:
    """How the main loop waits for the body: "chunked", a length, or None (it does not)."""
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "100-continue" in headers.get("expect", "").lower():
        return None  # the client waits for "100 Continue", which the thread sends
    if "transfer-encoding" in headers:
        return "chunked" if headers["transfer-encoding"].lower().endswith("chunked") else None
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) == 0 or int(length) > _BODY_BUFFER:
        return None
    return int(length)


def scan_chunks(body: bytes | bytearray, start: int = 0) -> tuple[int, bool]:
    """Walk the complete chunks of a chunked body from `start`: (where the first incomplete
    one starts, whether the last chunk and its trailers are in). ValueError: malformed."""
    at = start
    while True:
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            return at, False
        size = int(bytes(body[at:line_end]).split(b";")[0].strip(), 16)
        if size < 0:
            raise ValueError("negative chunk size")
        if size == 0:  # the last chunk; then trailers, up to an empty line
            rest = line_end + 2
            done = body[rest : rest + 2] == b"\r\n" or body.find(b"\r\n\r\n", rest) >= 0
            return at, done
        next_chunk = line_end + 2 + size + 2
        if next_chunk > len(body):
            return at, False
        at = next_chunk


class PatientReader:
    """A connection's socket as gunicorn's request parser reads it: each read waits at most
    `timeout` for data, so a client that stops half-way through a body frees its thread.
    (Writes use the socket itself: a slow reader of a long stream is not cut off.)"""

    def __init__(self, sock, timeout: float):
        self.sock = sock
        self.default = timeout
        self.timeout: float | None = timeout

    def recv(self, size: int) -> bytes:
        self.sock.settimeout(self.timeout)
        try:
            return self.sock.recv(size)
        finally:
            with contextlib.suppress(OSError):  # blocking again, as gthread's thread expects
                self.sock.settimeout(None)

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, value: float | None) -> None:
        """gunicorn's body drain bounds its reads through this."""
        self.timeout = self.default if value is None else value


def _answer(status: str, message: str, headers: str = "") -> bytes:
    """A whole HTTP/1.1 error response in Ollama's shape, written before the worker closes.
    `headers`: more header lines, each ending in CRLF."""
    body = (json.dumps({"error": message}) + "\n").encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _too_many(cap: int) -> bytes:
    return _answer("503 Service Unavailable", f"too many connections from your address (at "
                   f"most {cap}: ORTSERVE_MAX_CONNECTIONS_PER_CLIENT); close idle ones and "
                   "try again", "Retry-After: 1\r\n")  # fmt: skip


# What the main loop answers a request it gives up on, before closing.
_TIMED_OUT = _answer("408 Request Timeout", "request not received within ORTSERVE_READ_TIMEOUT")
_TOO_LARGE = _answer("431 Request Header Fields Too Large", "request head over 64 KiB")


def _send_quietly(sock, data: bytes) -> None:
    """Best effort, never blocking the main loop: the client may be gone or not reading."""
    with contextlib.suppress(OSError):
        sock.send(data)


def _worker_exit(arbiter, worker) -> None:
    """The worker is leaving: cancel anything still running so its threads can end."""
    state = _state_of(worker)
    if state is not None:
        state.shutdown(0)


def _state_of(worker):
    app = getattr(worker.app, "flask_app", None)
    return app.extensions.get("ortserve") if app is not None else None
