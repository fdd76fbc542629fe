"""Plain data passed between the engine and its callers (the HTTP API, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    num_ctx: int = 4096
    guidance: tuple[str, str] | None = None  # (kind, data) for TurnOptions.set_guidance

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text (stop strings already cut out)."""

    text: str
    tokens: int = 1


@dataclass(frozen=True)
class Finished:
    """The turn ended. reason: 'stop' (EOS or a stop string), 'length', or 'cancelled'."""

    reason: str
    usage: Usage = field(default_factory=Usage)
    prompt_eval_duration_ns: int = 0
    eval_duration_ns: int = 0
