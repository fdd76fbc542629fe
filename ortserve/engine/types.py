"""Plain data passed between the engine and its callers (the HTTP API, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ortserve.config import DEFAULT_CONTEXT_LENGTH


@dataclass(frozen=True)
class Guidance:
    """A constraint on a turn's output, whatever backend enforces it.

    kind: "json_schema" (data: a JSON Schema as text), "regex" (a regular expression) or
    "lark_grammar" (a Lark grammar). Each backend maps it to its own form (og: the
    `(kind, data)` arguments of TurnOptions.set_guidance).
    """

    kind: Literal["json_schema", "regex", "lark_grammar"]
    data: str


@dataclass(frozen=True)
class GenerationOptions:
    """Resolved options of one turn (request options > model parameters > defaults)."""

    num_predict: int = -1  # -1: until the context is full
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.1
    num_ctx: int = DEFAULT_CONTEXT_LENGTH  # the server's is ORTSERVE_CONTEXT_LENGTH
    guidance: Guidance | None = None  # constrained decoding (structured output, tool calls)
    # None: no log probabilities; k >= 0: each generated token's, plus its top k alternatives
    # (OpenAI allows 0..20). Such a turn runs unbatched on an og.Generator (engine.md).
    logprobs: int | None = None
    # A batch job's turn (serving/priority.py): it starts only when no interactive turn waits,
    # and leaves one of the model's parallel slots free for them.
    background: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability (natural log, from the model's raw logits).

    token: the token's own text (its bytes as UTF-8; U+FFFD where it holds only part of a
    character). raw: its exact bytes, which such partial tokens need to be joined again.
    top: the most likely tokens at that position, most likely first (empty for those).
    """

    token_id: int
    token: str
    logprob: float
    top: tuple[TokenLogprob, ...] = ()
    raw: bytes | None = None  # None: the UTF-8 of `token`

    @property
    def utf8(self) -> list[int]:
        """The token's bytes as a list of ints (OpenAI's and Ollama's `bytes`)."""
        return list(self.token.encode("utf-8") if self.raw is None else self.raw)


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text (stop strings already cut out).

    logprobs: one per generated token whose text this chunk completes, in order (a token
    held back with its text, an incomplete character or a possible stop string, comes with
    the chunk that releases it); empty unless the turn asked for them.
    """

    text: str
    tokens: int = 1
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The turn ended. reason: 'stop' (EOS or a stop string), 'length', or 'cancelled'."""

    reason: str
    usage: Usage = field(default_factory=Usage)
    prompt_eval_duration_ns: int = 0
    eval_duration_ns: int = 0
