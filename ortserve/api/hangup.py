"""Noticing clients that go away while their turn runs, and cancelling the turn.

A streamed turn notices a closed connection when it next writes, but guided and forced-tool
turns hold their output until an attempt ends, a queued turn writes nothing until it starts,
and `stream: false` writes once at the end: eight abandoned tool streams went on generating
for ~27 s. So every exchange started in a request served by gunicorn (whose WSGI environ
carries the connection's socket) is watched here: one thread looks at the watched sockets
every POLL_INTERVAL, and a socket its client has closed (readable, with nothing to read)
hangs its exchange up, which cancels the turns and frees their batch rows.

As with Go's net/http (Ollama), a client that half-closes its side after sending the request
counts as gone. waitress does not expose the socket: there the next write still notices.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterable
from typing import Any

POLL_INTERVAL = 0.25  # seconds between looks: a disconnect is noticed within ~0.3 s
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


class HangupWatch:
    """Exchanges and their clients' sockets, looked at by one daemon thread while any are."""

    def __init__(self, interval: float = POLL_INTERVAL):
        self.interval = interval
        self._watched: dict[Any, socket.socket] = {}  # exchange -> its client's socket
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, exchange: Any) -> None:
        """Hang `exchange` up if `sock`'s client closes before the exchange is closed."""
        with self._changed:
            self._watched[exchange] = sock
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ortserve-hangups",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._changed.notify()

    def watching(self) -> int:
        with self._changed:
            return len(self._watched)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._watched)
            self.check()
            with self._changed:  # a new watch may wake it early: only an earlier look
                self._changed.wait(self.interval)

    def check(self) -> None:
        """One look: forget closed exchanges, hang up those whose client has gone."""
        with self._changed:
            for exchange in [e for e in self._watched if e.closed]:
                del self._watched[exchange]
            watched = list(self._watched.items())
        by_socket: dict[socket.socket, list[Any]] = {}
        for exchange, sock in watched:
            by_socket.setdefault(sock, []).append(exchange)
        for sock in closed_by_peer(by_socket):
            for exchange in by_socket[sock]:
                with self._changed:
                    self._watched.pop(exchange, None)
                exchange.hang_up()


def closed_by_peer(sockets: Iterable[socket.socket]) -> list[socket.socket]:
    """The sockets whose client has closed or reset the connection, without reading them:
    readable, and a peek finds the end of the stream (a pipelined request is not an end)."""
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            with contextlib.suppress(ValueError, KeyError, OSError):  # closed here already
                selector.register(sock, selectors.EVENT_READ)
        ready = [key.fileobj for key, _ in selector.select(0)]
    return [sock for sock in ready if _at_end(sock)]  # type: ignore[misc]


def _at_end(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, _PEEK) == b""
    except (BlockingIOError, InterruptedError, ValueError):  # ValueError: TLS, no peeking
        return False
    except OSError:  # reset by the peer
        return True
