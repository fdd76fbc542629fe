"""The request thread's view of a turn: token events in, text chunks out."""

from __future__ import annotations

from collections.abc import Iterator

from ortserve.engine.scheduler import Job, Scheduler
from ortserve.engine.types import Finished, TextChunk
from ortserve.errors import OrtServeError


class Turn:
    """Iterate for TextChunk ... Finished; stop strings are cut here, then the turn cancelled."""

    def __init__(self, scheduler: Scheduler, job: Job, decoder):
        self._scheduler = scheduler
        self._job = job
        self._decoder = decoder
        self._done = False
        self._cancel_sent = False

    def __iter__(self) -> Iterator[TextChunk | Finished]:
        stopped = False
        try:
            while True:
                kind, *payload = self._job.events.get()
                if kind == "token":
                    if stopped:
                        continue  # tokens after a stop string, before the cancel lands
                    text, stopped = self._decoder.push(payload[0])
                    if text:
                        yield TextChunk(text)
                    if stopped:
                        self.cancel()
                elif kind == "done":
                    self._done = True
                    tail = "" if stopped else self._decoder.flush()
                    if tail:
                        yield TextChunk(tail)
                    yield self._finished("stop" if stopped else payload[0], payload[1])
                    return
                else:
                    self._done = True
                    error = payload[0]
                    raise error if isinstance(error, OrtServeError) else OrtServeError(str(error))
        finally:
            if not self._done:
                self.cancel()  # the consumer went away (client disconnect): free the slot

    def cancel(self) -> None:
        if not self._cancel_sent and not self._job.finished:
            self._cancel_sent = True
            self._scheduler.cancel(self._job)

    def _finished(self, reason: str, usage) -> Finished:
        job = self._job
        first = job.first_token_at or job.finished_at
        return Finished(
            reason=reason,
            usage=usage,
            prompt_eval_duration_ns=_ns(first - job.begun_at) if job.begun_at else 0,
            eval_duration_ns=_ns(job.finished_at - first) if job.begun_at else 0,
        )


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
