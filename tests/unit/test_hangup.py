"""api/hangup.py: a closed client is told from a quiet one or a pipelined request, and its
exchange is hung up; a guided turn cancelled between attempts starts no other."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ortserve.api.hangup import HangupWatch, closed_by_peer
from ortserve.engine.guided import Retry
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.errors import OrtServeError
from ortserve.serving.structured import GuidedTurn


class FakeExchange:
    def __init__(self):
        self.closed = False
        self.hung_up = threading.Event()

    def hang_up(self):
        self.hung_up.set()


def test_only_a_closed_or_reset_peer_counts_as_gone():
    quiet, quiet_peer = socket.socketpair()
    talking, talking_peer = socket.socketpair()
    closed, closed_peer = socket.socketpair()
    talking_peer.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a pipelined request: not an end
    closed_peer.close()
    try:
        assert closed_by_peer([quiet, talking, closed]) == [closed]
        assert talking.recv(100).startswith(b"GET")  # peeked, never consumed
    finally:
        for sock in (quiet, quiet_peer, talking, talking_peer, closed):
            sock.close()


def test_a_socket_closed_here_is_skipped():
    sock, peer = socket.socketpair()
    sock.close()
    assert closed_by_peer([sock]) == []
    peer.close()


def test_the_watch_hangs_up_within_its_interval_and_forgets_closed_exchanges():
    watch = HangupWatch(interval=0.05)
    gone, gone_peer = socket.socketpair()
    done, done_peer = socket.socketpair()
    leaving, finished = FakeExchange(), FakeExchange()
    watch.watch(gone, leaving)
    watch.watch(done, finished)
    finished.closed = True  # answered: no longer watched, even once its client closes
    done_peer.close()
    started = time.monotonic()
    gone_peer.close()
    assert leaving.hung_up.wait(2) and time.monotonic() - started < 1
    time.sleep(0.1)
    assert not finished.hung_up.is_set() and watch.watching() == 0
    gone.close()
    done.close()


class CountingTurn:
    """An attempt that writes "{" and ends: cut at its length, or cancelled if it was."""

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __iter__(self):
        yield TextChunk("{")
        yield Finished("cancelled" if self.cancelled else "length")


class FakeLoaded:
    def __init__(self):
        self.turns: list[CountingTurn] = []

    def generate(self, tokens, options, **kwargs):
        self.turns.append(CountingTurn())
        return self.turns[-1]


def test_a_guided_turn_cancelled_between_attempts_ends_its_next_one_at_once():
    """The hang-up thread may cancel while no attempt runs: the next one must not run on."""
    loaded = FakeLoaded()
    turn = GuidedTurn(loaded, [1, 2], GenerationOptions(num_ctx=64), {"type": "object"}, 5)
    events = iter(turn)
    while not isinstance(next(events), Retry):  # attempt 1 ran and failed its schema
        pass
    turn.cancel()  # before attempt 2 starts
    with pytest.raises(OrtServeError, match="cancelled"):
        list(events)
    assert len(loaded.turns) == 2 and loaded.turns[1].cancelled  # not 6 attempts
