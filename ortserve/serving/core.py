"""The one pipeline every generation endpoint runs, whatever its protocol.

resolve the model and check its capability -> lease it (released when the exchange closes,
a client disconnect included) -> render each prompt (template, tools, thinking) -> start
the turns (plain, guided or tool turns) -> one stream of (choice index, event), each event
also recorded in its Choice, so a protocol either streams the events or reads the choices.

Events: serving/events.py's vocabulary (TextChunk, ThinkingChunk, ToolCallEvent, Retry,
Finished), the one every protocol renders.

A client that goes away is noticed by the HTTP layer (api/hangup.py), which calls
Exchange.hang_up from its own thread: every turn is cancelled, whatever its kind.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ortserve.engine.guided import Retry
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.errors import InvalidRequest, OrtServeError, ServerBusy
from ortserve.library import ModelInfo
from ortserve.serving import images
from ortserve.serving.events import ThinkingChunk
from ortserve.serving.priority import is_background
from ortserve.serving.prompting import Rendered, render
from ortserve.serving.requests import GenerationRequest
from ortserve.serving.structured import GuidedTurn, attempt_usages, start_turn
from ortserve.serving.thinking import AnswerStops, ThinkingSplitter
from ortserve.serving.tools import ToolCallEvent, model_format, start_tool_turn


@dataclass(frozen=True)
class Usage:
    """Tokens of a whole request: every attempt counted, a prompt shared by n choices once."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a kept turn

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(eq=False)
class Choice:
    """One choice's output so far; a Retry starts it afresh."""

    prompt: int  # the index of the prompt it continues
    turn: Any
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    calls: list = field(default_factory=list)  # toolcalls.ToolCall, validated
    logprobs: list = field(default_factory=list)  # engine.types.TokenLogprob
    finished: Finished | None = None

    @property
    def content(self) -> str:
        return "".join(self.text)

    @property
    def thoughts(self) -> str:
        return "".join(self.thinking)

    @property
    def attempts(self) -> int | None:
        """How many attempts a structured answer took (None for a plain turn)."""
        return self.turn.attempts if isinstance(self.turn, GuidedTurn) else None

    def record(self, event: Any) -> None:
        if isinstance(event, TextChunk):
            self.text.append(event.text)
            self.logprobs.extend(getattr(event, "logprobs", ()) or ())
        elif isinstance(event, ThinkingChunk):
            self.thinking.append(event.text)
        elif isinstance(event, ToolCallEvent):
            self.calls.append(event.call)
        elif isinstance(event, Retry):
            self.text, self.thinking, self.calls, self.logprobs = [], [], [], []
        elif isinstance(event, Finished):
            self.finished = event


class ClientGone(OrtServeError):
    """The client closed its connection: its turns were cancelled (Ollama's 499)."""

    status = 499
    type = "cancelled"


class Exchange:
    """One request's turns, their events as they come, and the clean-up (exactly once)."""

    def __init__(self, runtime, loaded, request: GenerationRequest, started_ns: int | None = None):
        self.runtime = runtime
        self.loaded = loaded
        self.request = request
        # From before the model was acquired: a request's total time includes its load, as
        # Ollama's total_duration does.
        self.started_ns = time.perf_counter_ns() if started_ns is None else started_ns
        # Read now: the next request to acquire the model resets it.
        self.load_duration_ns: int = loaded.load_duration_ns
        self.choices: list[Choice] = []
        self._splitters: dict[int, ThinkingSplitter] = {}
        self._stops: dict[int, AnswerStops] = {}  # stop strings cut here, on the answer only
        self._rendered: list[Rendered] = []
        self._closed = False
        self._gone = False  # hang_up was called: the client left

    @functools.cached_property
    def prompt_tokens(self) -> int:
        """The rendered prompts' tokens, known before any output (each prompt once), their
        pictures' image tokens included (what usage() will say)."""
        return sum(self.loaded.prompt_length(r.tokens, r.images) for r in self._rendered)

    @property
    def attempts(self) -> int | None:
        """The most attempts any structured choice took (None for plain text)."""
        guided = [c.attempts for c in self.choices if c.attempts is not None]
        return max(guided) if guided else None

    @property
    def closed(self) -> bool:
        return self._closed

    def events(self) -> Iterator[tuple[int, Any]]:
        """(choice index, event) as they come, each recorded in its Choice first."""
        try:
            for index, event in _merged([c.turn for c in self.choices]):
                for item in self._split(index, event):
                    if isinstance(item, Finished) and item.reason == "cancelled":
                        raise ServerBusy("generation was cancelled: the model was unloaded or "
                                         "the server is stopping")  # fmt: skip
                    self.choices[index].record(item)
                    yield index, item
        except OrtServeError:
            if self._gone:  # whatever the cancelled turn raised, the cause is the client
                raise ClientGone("request canceled: the client closed the connection") from None
            raise
        if any(c.finished is None for c in self.choices):
            raise OrtServeError("generation ended without finishing")

    def finish(self) -> list[Choice]:
        """Run every choice to its end (stream:false); closes the exchange."""
        try:
            for _ in self.events():
                pass
            return self.choices
        finally:
            self.close()

    def usage(self) -> Usage:
        """The engine's counts of every attempt; a prompt shared by n choices counts once."""
        prompts: dict[int, int] = {}
        cached: dict[int, int] = {}
        retried = 0  # a retry prefilled the prompt again: it counts
        for choice in self.choices:
            if choice.finished is None:
                continue
            attempts = attempt_usages(choice.turn, choice.finished)
            prompts[choice.prompt] = attempts[0].prompt_tokens
            cached[choice.prompt] = attempts[0].cached_prompt_tokens
            retried += sum(u.prompt_tokens for u in attempts[1:])
        completion = sum(c.finished.usage.generated_tokens for c in self.choices if c.finished)
        return Usage(sum(prompts.values()) + retried, completion, sum(cached.values()))

    def close(self, *, failed: bool = False) -> None:
        """Cancel unfinished turns (the client left, or a choice failed); release the model."""
        if self._closed:
            return
        self._closed = True
        try:
            self._cancel_turns()
        finally:
            self.runtime.release(self.loaded, self.request.keep_alive, failed=failed)

    def hang_up(self) -> None:
        """The client is gone: cancel every unfinished turn now (from any thread).

        The request thread, waiting on the turns, then sees them end and closes the exchange
        (which releases the model) as it would after any cancellation.
        """
        self._gone = True
        self._cancel_turns()

    def _cancel_turns(self) -> None:
        for choice in list(self.choices):
            if choice.finished is None:
                choice.turn.cancel()

    # ---- internals ---------------------------------------------------------------------

    def _start(self, rendered: list[Rendered], options: GenerationOptions, settings) -> None:
        """Submit every turn before reading any, so that the batch runs them side by side."""
        request = self.request
        self._rendered = rendered
        spec = request.tools
        if spec is not None:
            spec = replace(spec, fmt=model_format(self.loaded))
        for group, prompt in enumerate(rendered):
            # A plain turn that may think: its stops apply to the answer (see AnswerStops).
            answer_stops = (prompt.thinking is not None and bool(options.stop)
                            and request.schema is None and (spec is None or spec.choice == "none"))  # fmt: skip
            turn_options = replace(options, stop=()) if answer_stops else options
            for _ in range(request.n):
                if spec is not None:
                    turn = start_tool_turn(self.loaded, prompt.tokens, turn_options, spec,
                                           settings.format_retries, prompt.images)  # fmt: skip
                else:
                    turn = start_turn(self.loaded, prompt.tokens, turn_options, request.schema,
                                      settings, prompt.images)  # fmt: skip
                if prompt.thinking is not None:
                    self._splitters[len(self.choices)] = prompt.thinking.splitter()
                if answer_stops:
                    self._stops[len(self.choices)] = AnswerStops(options.stop)
                self.choices.append(Choice(group, turn))

    def _split(self, index: int, event: Any) -> list[Any]:
        """Text into thinking and answer, where the prompt's template has a thinking section."""
        splitter = self._splitters.get(index)
        if splitter is None:
            return [event]
        if isinstance(event, TextChunk):
            pieces = splitter.feed(event.text)
        elif isinstance(event, Finished):
            pieces = splitter.finish()
        else:
            if isinstance(event, Retry):  # the next attempt starts where the prompt ends
                self._splitters[index] = self._thinking_of(index).splitter()
            return [event]
        hidden = self._thinking_of(index).hidden  # think: false, yet the model thinks
        out: list[Any] = [_piece(kind, text, event) for kind, text in pieces
                          if text and not (hidden and kind == "thinking")]  # fmt: skip
        if isinstance(event, Finished):
            out.append(event)
        elif not out and getattr(event, "logprobs", ()):
            out.append(TextChunk("", event.tokens, logprobs=event.logprobs))  # held text's
        stops = self._stops.get(index)
        return out if stops is None else self._cut_at_stop(index, stops, out)

    def _cut_at_stop(self, index: int, stops: AnswerStops, items: list[Any]) -> list[Any]:
        """The answer up to its first stop string; the turn is cancelled there, and its end
        reads as a stop (as the engine's own stop cut does)."""
        kept: list[Any] = []
        for item in items:
            if isinstance(item, Finished):
                tail = stops.flush()
                if tail:
                    kept.append(TextChunk(tail))
                kept.append(replace(item, reason="stop") if stops.stopped else item)
            elif stops.stopped:
                continue  # generated after the stop, before the cancel landed
            elif isinstance(item, TextChunk):
                shown = stops.feed(item.text)
                if stops.stopped:
                    self.choices[index].turn.cancel()
                if shown or item.logprobs:
                    kept.append(replace(item, text=shown))
            else:
                kept.append(item)
        return kept

    def _thinking_of(self, index: int):
        return self._rendered[self.choices[index].prompt].thinking


def _piece(kind: str, text: str, source: Any) -> Any:
    if kind == "thinking":
        return ThinkingChunk(text)
    logprobs = getattr(source, "logprobs", ()) if isinstance(source, TextChunk) else ()
    if logprobs:
        return TextChunk(text, getattr(source, "tokens", 0), logprobs=logprobs)
    return TextChunk(text)


def start(state, request: GenerationRequest) -> Exchange:
    """Resolve, lease, render and start: the Exchange of `request` (its turns submitted).

    `state` gives the library, the runtime and the settings (api/state.ServerState, or any
    object with those three). Errors before the turns start release the lease. A `state`
    with a `watch` method (the HTTP layer's) is handed the exchange, to hang it up if its
    client goes away.
    """
    check_combinations(request)
    info = require(state.library, request.model, "completion", request.kind)
    check_images(info, request, state.settings)
    started_ns = time.perf_counter_ns()
    runtime = state.runtime
    loaded = runtime.acquire(info, request.keep_alive)
    exchange = Exchange(runtime, loaded, request, started_ns)
    try:
        options = _options(loaded, request, state.settings)
        rendered = [render(loaded, prompt, request, options) for prompt in request.prompts]
        exchange._start(rendered, options, state.settings)
    except BaseException:
        exchange.close(failed=True)
        raise
    watch = getattr(state, "watch", None)
    if watch is not None:
        watch(exchange)
    return exchange


def count_tokens(state, request: GenerationRequest) -> int:
    """The tokens of the request's rendered prompts, without generating (count_tokens).

    A prompt of any length is counted: the context only limits generation.
    """
    info = require(state.library, request.model, "completion", request.kind)
    check_images(info, request, state.settings)
    loaded = state.runtime.acquire(info, request.keep_alive)
    try:
        unlimited = GenerationOptions(num_ctx=2**31 - 1)
        rendered = [render(loaded, p, request, unlimited) for p in request.prompts]
        return sum(loaded.prompt_length(r.tokens, r.images) for r in rendered)
    finally:
        state.runtime.release(loaded, request.keep_alive, failed=True)  # no keep-alive change


def require(library, name: str, capability: str, kind: str) -> ModelInfo:
    """The model's library entry, resolved once for the request and checked before loading:
    it must have `capability`. What follows (the runtime, the backend) takes this entry."""
    info = library.get(name)
    if capability not in info.capabilities:
        raise InvalidRequest(f'"{info.name}" does not support {kind}', param="model")
    return info


def check_images(info: ModelInfo, request: GenerationRequest, settings) -> None:
    """Images only for a model with the vision capability (before it loads), and no more of
    them than one request may hold (a stored conversation adds its own)."""
    total = images.count(request.prompts)
    if not total:
        return
    param = request.field("images")
    if "vision" not in info.capabilities:
        raise InvalidRequest(f'{param}: "{info.name}" does not support images (it has no '
                             "vision capability)", param=param)  # fmt: skip
    if total > settings.max_images:
        raise InvalidRequest(f"{param}: too many images: {total}, at most {settings.max_images} "
                             "per request", param=param)  # fmt: skip


def load(state, name: str, keep_alive: float | None, kind: str) -> None:
    """Load a model (and start its keep-alive) without generating: Ollama's empty prompt."""
    info = require(state.library, name, "completion", kind)
    loaded = state.runtime.acquire(info, keep_alive)
    state.runtime.release(loaded, keep_alive)


def unload(state, model: str | ModelInfo) -> None:
    """Unload a model now if it is loaded (404 for a name that does not exist)."""
    info = model if isinstance(model, ModelInfo) else state.library.get(model)
    if state.started_runtime is not None:
        state.started_runtime.unload(info)


def check_combinations(request: GenerationRequest) -> None:
    """The rules between a request's fields, for every protocol (errors in its field names).

    A grammar forces either a schema's JSON or tool calls, never both; and it leaves no room
    for a thinking section. tool_choice "none" is a plain turn: it may think, and take a
    schema.
    """
    guided_tools = request.tools is not None and request.tools.choice != "none"
    if guided_tools and request.schema is not None:
        tools, schema = request.field("tools"), request.field("schema")
        raise InvalidRequest(f"{tools} and {schema} cannot be combined", param=tools)
    if request.think and (request.schema is not None or guided_tools):
        think = request.field("think")
        other = request.field("schema" if request.schema is not None else "tools")
        raise InvalidRequest(f"{think} cannot be combined with {other}: the grammar that "
                             "enforces the answer leaves no room for a thinking section",
                             param=think)  # fmt: skip


def _options(loaded, request: GenerationRequest, settings) -> GenerationOptions:
    from ortserve.engine.sampling import resolve

    options = resolve(request.sampling, loaded.parameters,
                      context_length=loaded.context_length, max_tokens=settings.max_tokens,
                      default_context=settings.context_length)  # fmt: skip
    if request.logprobs is not None:
        options = replace(options, logprobs=request.logprobs)
    if is_background():  # a batch job's line: it yields to interactive turns
        options = replace(options, background=True)
    return options


def _merged(turns: list[Any]) -> Iterator[tuple[int, Any]]:
    """(choice index, event) of every turn as they come: one thread reads each of several."""
    if len(turns) == 1:
        yield from ((0, event) for event in turns[0])
        return
    inbox: queue.Queue = queue.Queue()
    for index, turn in enumerate(turns):
        threading.Thread(target=_pump, args=(index, turn, inbox), daemon=True).start()
    running = len(turns)
    while running:
        index, event = inbox.get()
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Finished):
            running -= 1
        yield index, event


def _pump(index: int, turn, inbox: queue.Queue) -> None:
    """Read one turn into `inbox` (a thread's work), ending with Finished or an exception."""
    try:
        for event in turn:
            inbox.put((index, event))
            if isinstance(event, Finished):
                return
        inbox.put((index, OrtServeError("generation ended without finishing")))
    except BaseException as exc:  # handed to the request thread, which answers it
        inbox.put((index, exc))
