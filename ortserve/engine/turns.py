"""The request thread's view of a turn: token events in, text chunks out."""

from __future__ import annotations

from collections.abc import Iterator

from ortserve.engine.scheduler import Job, Scheduler
from ortserve.engine.types import Finished, TextChunk, TokenLogprob
from ortserve.errors import OrtServeError


class Turn:
    """Iterate for TextChunk ... Finished; stop strings are cut here, then the turn cancelled.

    A turn whose options ask for logprobs gets each token's TokenLogprob on the chunk that
    completes its text (TextDecoder.completed_tokens); the final flush carries the rest, in
    a chunk of its own even when it adds no text.
    """

    def __init__(self, scheduler: Scheduler, job: Job, decoder):
        self._scheduler = scheduler
        self._job = job
        self._decoder = decoder
        self._done = False
        self._cancel_sent = False
        # logprob turns only: TokenLogprobs of pushed tokens, how many went out, the texts
        self._scores: list[TokenLogprob] | None = None
        if job.options.logprobs is not None:
            self._scores = []
        self._attached = 0
        self._texts = None

    def __iter__(self) -> Iterator[TextChunk | Finished]:
        stopped = False
        try:
            while True:
                kind, *payload = self._job.events.get()
                if kind == "token":
                    if stopped:
                        continue  # tokens after a stop string, before the cancel lands
                    text, stopped = self._decoder.push(payload[0])
                    chunk = self._chunk(text, payload)
                    if chunk is not None:
                        yield chunk
                    if stopped:
                        self.cancel()
                elif kind == "done":
                    self._done = True
                    tail = "" if stopped else self._decoder.flush()
                    chunk = self._chunk(tail, ())
                    if chunk is not None:
                        yield chunk
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

    def _chunk(self, text: str, payload) -> TextChunk | None:
        """The chunk to yield for `text` (None: nothing to say yet)."""
        if self._scores is None:  # a plain turn: text only, as it always was
            return TextChunk(text) if text else None
        if len(payload) > 1 and payload[1] is not None:
            self._scores.append(self._resolve(payload[0], payload[1]))
        ready = min(self._decoder.completed_tokens, len(self._scores))
        logprobs = tuple(self._scores[self._attached : ready])
        self._attached = max(self._attached, ready)
        if not text and not logprobs:
            return None
        return TextChunk(text, len(logprobs), logprobs=logprobs)

    def _resolve(self, token_id: int, step) -> TokenLogprob:
        """The scheduler's numbers for a token -> a TokenLogprob with texts and bytes."""
        if self._texts is None:
            from ortserve.engine.logprobs import TokenTexts

            self._texts = TokenTexts(self._decoder.tokenizer)
        return self._texts.resolve(token_id, step)

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
