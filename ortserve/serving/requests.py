"""Typed generation requests: what every protocol builds once, at its boundary.

A protocol module reads its HTTP body (checked against its JSON Schema), converts messages,
tools and sampling fields into these types, and hands one GenerationRequest to the core.
Nothing below the protocol layer sees an HTTP dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ortserve.errors import InvalidRequest
from ortserve.options import Sampling
from ortserve.serving.tools import ToolSpec

# One render of a chat template (engine/sandbox.py holds it to these): its loop steps, plus a
# share for each message and tool that templates loop over; its wall time; and its text, up
# to twice what the model's context can hold (its pre-tokenization bound), or this floor.
TEMPLATE_ITERATIONS = 100_000
TEMPLATE_ITERATIONS_PER_ITEM = 64
TEMPLATE_SECONDS = 5.0
TEMPLATE_MIN_CHARS = 1_000_000
# Texts in one embedding request (OpenAI's limit); each is cut or refused at the model's
# character bound before it is tokenized (engine/embeddings.py).
EMBED_MAX_INPUTS = 2048


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered with the model's chat template.

    `messages` are template-ready: role, content as a string, tool_calls with arguments as
    objects, name / tool_call_id on tool results, thinking on assistant turns, and `images`
    (encoded bytes, already bounded by serving/images.py) on a message that shows pictures.
    """

    messages: list[dict[str, Any]]
    truncate: bool = True  # drop the oldest turns to fit (Ollama); False: refuse (OpenAI)


@dataclass(frozen=True)
class TextPrompt:
    """One prompt: raw, or wrapped in the template as a single user message (Ollama's generate)."""

    text: str
    system: str | None = None  # overrides the model's system prompt
    raw: bool = False  # no template, no system prompt, no Modelfile MESSAGEs
    param: str = "prompt"  # the request field errors name
    images: tuple[bytes, ...] = ()  # encoded, bounded (serving/images.py); before the text


Prompt = ChatPrompt | TextPrompt


@dataclass
class GenerationRequest:
    """One request for text: the model, its prompts, and how to generate each choice."""

    model: str
    prompts: list[Prompt]
    kind: str = "chat"  # what a capability error names: chat, generate, completions
    sampling: Sampling = field(default_factory=Sampling)  # checked values, Ollama's names
    n: int = 1  # choices per prompt
    keep_alive: float | None = None  # seconds; None: the server's default; <0: forever
    schema: dict | None = None  # structured output: guided, validated, retried
    tools: ToolSpec | None = None
    think: bool | None = None  # None: the template's default
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k
    # The protocol's name for each of the core's fields, for the core's errors (the rules
    # that combine fields are checked once, in serving/core.check_combinations).
    fields: dict[str, str] = field(default_factory=dict)

    def field(self, name: str) -> str:
        """The request field a client knows `name` ("schema", "tools", "think") by."""
        return self.fields.get(name) or _FIELDS.get(name, name)


# The core's field names as Ollama's API spells them: the default of every protocol.
_FIELDS = {"schema": "format", "images": "images"}
# reasoning_effort / reasoning.effort levels that turn thinking off (every other one is on).
NO_REASONING = ("none", "minimal")


def logprob_count(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """Ollama's and OpenAI's logprobs (a switch) and top_logprobs (0..20) as the core's
    GenerationRequest.logprobs: None when not asked for."""
    if top_logprobs and not logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def think_from_effort(effort: str | None) -> bool | None:
    """OpenAI's reasoning effort as the core's think: None (not given) keeps the template's."""
    return None if effort is None else effort not in NO_REASONING
