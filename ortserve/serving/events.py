"""The one event vocabulary of a generation, as the core streams it to every protocol.

A protocol's renderer imports its events from here, whatever layer makes them:

- TextChunk: answer text (with logprobs when asked), from the engine;
- ThinkingChunk: text of the model's thinking section, split out by the core;
- ToolCallEvent: a complete, validated tool call (serving/tools.py);
- Retry: a structured or tool attempt failed, the choice's output so far is void;
- Finished: the turn's end, its reason ("stop", "length", "cancelled") and usage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ortserve.engine.guided import Retry
from ortserve.engine.types import Finished, TextChunk
from ortserve.serving.tools import ToolCallEvent


@dataclass(frozen=True)
class ThinkingChunk:
    """Text the model wrote in its thinking section, separated from the answer."""

    text: str


Event = TextChunk | ThinkingChunk | ToolCallEvent | Retry | Finished

__all__ = ["Event", "Finished", "Retry", "TextChunk", "ThinkingChunk", "ToolCallEvent"]
