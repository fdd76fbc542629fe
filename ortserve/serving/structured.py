"""Structured output for every protocol: turns retried until valid (each protocol module in
api/ reads its own request field into a schema)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from ortserve.engine.guided import (
    GuidedResult,
    Retry,
    all_attempts,
    guidance_for,
    guided_steps,
    retries_from_env,
    validate_output,
)
from ortserve.engine.types import Finished, GenerationOptions, Guidance, TextChunk, Usage
from ortserve.errors import OrtServeError

# The token cap of a structured answer when the request gives none.
DEFAULT_MAX_TOKENS = 512


def start_turn(loaded, tokens: list[int], options: GenerationOptions, schema: dict | None,
               settings, images: tuple[bytes, ...] = ()) -> Any:  # fmt: skip
    """A plain turn, or a GuidedTurn when the request asks for a schema."""
    if schema is None:
        return loaded.generate(tokens, options, **image_args(images))
    return GuidedTurn(loaded, tokens, options, schema, settings.format_retries, images=images)


def image_args(images: tuple[bytes, ...]) -> dict[str, Any]:
    """generate()'s images argument, given only when there are images: a backend that takes
    none keeps its signature."""
    return {"images": images} if images else {}


class GuidedTurn:
    """Turns repeated until the output validates; iterates like a Turn.

    Yields each attempt's TextChunks, a Retry before every new attempt, and last one
    Finished whose usage and timings count every attempt; raises InvalidOutput when every
    attempt failed. Subclasses (tool calls) change what is checked and what is shown.
    """

    failure = "output failed its schema"  # the InvalidOutput message's start
    skip_special_tokens = True
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: the context left

    def __init__(self, loaded, tokens: list[int], options: GenerationOptions, schema: dict | None,
                 retries: int, *, guidance: Guidance | None = None,
                 images: tuple[bytes, ...] = ()):  # fmt: skip
        room = max(1, options.num_ctx - len(tokens))
        cap = options.num_predict if options.num_predict > 0 else self.default_max_tokens or room
        self.loaded, self.tokens, self.schema = loaded, tokens, schema
        self.images = images  # every attempt shows them again
        self.options = replace(options, guidance=guidance or guidance_for(schema))
        self.max_tokens, self.ceiling = min(cap, room), room
        self.policy = retries_from_env(retries)
        self.attempts = 0
        self.result: GuidedResult | None = None
        self.finishes: list[Finished] = []  # one per attempt that ran to its end
        self._turn = None
        self._cancelled = False  # cancel() came (maybe from another thread): no more attempts

    @property
    def usages(self) -> list[Usage]:
        """Each finished attempt's usage, in order."""
        return [f.usage for f in self.finishes]

    def __iter__(self) -> Iterator[TextChunk | Retry | Finished]:
        steps = guided_steps(self._attempt, self.check, max_tokens=self.max_tokens,
                             ceiling=self.ceiling, policy=self.policy,
                             seed=self.options.seed, failure=self.failure)  # fmt: skip
        self.result = yield from steps
        yield from self.accepted(self.result)
        yield all_attempts(self.finishes)

    def cancel(self) -> None:
        self._cancelled = True  # set first: _attempt checks it after starting its turn
        if self._turn is not None:
            self._turn.cancel()

    def check(self, text: str, finish_reason: str | None) -> Any:
        """The value of an attempt's text; OutputRejected when it does not validate."""
        assert self.schema is not None
        return validate_output(text, self.schema, finish_reason)

    def shown(self, chunk: TextChunk) -> Iterable[TextChunk]:
        """What the client sees of one generated chunk while an attempt runs."""
        return (chunk,)

    def held(self) -> Iterable[TextChunk]:
        """What shown() held back, once the attempt's text is complete."""
        return ()

    def accepted(self, result: GuidedResult) -> Iterable[Any]:
        """Events that follow the accepted attempt's text, before Finished."""
        return ()

    def _attempt(self, max_tokens: int, seed: int | None):
        """One whole turn: yield its text as it comes, return (text, finish_reason)."""
        self.attempts += 1
        options = replace(self.options, num_predict=max_tokens, seed=seed)
        special = {} if self.skip_special_tokens else {"skip_special_tokens": False}
        self._turn = self.loaded.generate(self.tokens, options, **special,
                                          **image_args(self.images))  # fmt: skip
        if self._cancelled:  # cancelled between two attempts: this one ends at once
            self._turn.cancel()
        parts: list[str] = []
        for event in self._turn:
            if isinstance(event, TextChunk):
                parts.append(event.text)
                yield from self.shown(event)
            elif event.reason == "cancelled":
                yield event  # the caller stops here
                raise OrtServeError("generation was cancelled")
            else:
                self.finishes.append(event)
                yield from self.held()
                return "".join(parts), event.reason
        raise OrtServeError("generation ended without finishing")


def attempt_usages(turn: Any, finished: Finished) -> list[Usage]:
    """The usage of each attempt a turn made: several for a retried GuidedTurn, else one."""
    return turn.usages if isinstance(turn, GuidedTurn) and turn.finishes else [finished.usage]
