"""Generation with LoRA adapters: og.Generator lanes, since og.Engine cannot activate adapters.

In onnxruntime-genai 0.18 an adapter is activated on a Generator
(`generator.set_active_adapter(adapters, name)`); og.Engine's Requests, RequestOptions and
TurnOptions have no such call. A model with adapters is therefore served by
GeneratorEngine: the part of og.Engine's interface the scheduler drives (create_request,
run, create_event_buffer; Request.begin_turn / cancel_turn / close; events with flags,
token, finish_reason, usage), implemented over one og.Generator per turn. A lane runs one
turn at a time, so a model with adapters generates as many turns at once as it has lanes,
each unbatched.

The same lanes serve turns that ask for log probabilities (og.Engine gives no logits):
a turn with `set_logprobs(k)` reads the Generator's raw logits before each step and its
events carry them (engine/logprobs.py). A model without adapters gets such a lane when a
logprob turn first arrives (scheduler.py).

And they serve vision-language models, which og.Engine refuses (docs/vision.md): a turn with
pictures goes through og's multimodal processor when it begins (the prompt's text and the
pictures -> input ids with each image token repeated to its picture's count, pixel values,
grids), and its Generator takes them with `set_inputs`; og runs the vision and embedding
graphs in the prefill. A turn without pictures appends its tokens as any other.

Everything here runs on the model's scheduler thread, like every other og call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ortserve.engine.logprobs import StepLogprobs, step_logprobs
from ortserve.errors import InvalidRequest, ModelLoadError
from ortserve.library.bundle import genai_config


def load_adapters(model, files: list[tuple[str, Path]]):
    """og.Adapters for `model` holding every (name, .onnx_adapter path)."""
    import onnxruntime_genai as og

    adapters = og.Adapters(model)
    for name, path in files:
        if not Path(path).is_file():
            raise ModelLoadError(f"adapter {name!r} is missing from the library ({path})")
        try:
            adapters.load(str(path), name)
        except Exception as exc:
            raise ModelLoadError(f"cannot load adapter {name!r}: {exc}") from exc
    return adapters


@dataclass(frozen=True)
class GeneratorUsage:
    """og.TurnUsage's fields."""

    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class GeneratorEvent:
    """og.EngineEvent's fields the scheduler reads."""

    request: Any
    flags: int
    token: int | None
    finish_reason: Any  # og.FinishReason
    usage: GeneratorUsage | None = None
    error_code: int = 0
    logprobs: StepLogprobs | None = None  # only for a turn that asked for them
    error: str | None = None  # why a FAILED turn failed (og's message)


class GeneratorTurn:
    """og.TurnOptions' setters (those apply_turn_options calls), recorded for GeneratorParams."""

    def __init__(self, request: GeneratorRequest | None = None):
        self.max_generated = 1
        self.search: dict[str, Any] = {"do_sample": False}
        self.guidance: tuple | None = None
        self.logprobs: int | None = None  # None: none; k: the chosen token's + top k
        self.images = None  # scheduler.ImageInput of a vision turn
        self.session_tokens = 0  # its prompt, pictures expanded, and output fit in this many

    def set_images(self, images, session_tokens: int) -> None:
        """Not an og.TurnOptions setter: a vision turn's pictures for og's processor."""
        self.images, self.session_tokens = images, int(session_tokens)

    def set_logprobs(self, k: int | None) -> None:
        """Not an og.TurnOptions setter: only Generator lanes can see the logits."""
        self.logprobs = None if k is None else int(k)

    def set_max_generated_tokens(self, n: int) -> None:
        self.max_generated = int(n)

    def set_do_sample(self, value: bool) -> None:
        self.search["do_sample"] = bool(value)

    def set_temperature(self, value: float) -> None:
        self.search["temperature"] = float(value)

    def set_top_k(self, value: int) -> None:
        self.search["top_k"] = int(value)

    def set_top_p(self, value: float) -> None:
        self.search["top_p"] = float(value)

    def set_repetition_penalty(self, value: float) -> None:
        self.search["repetition_penalty"] = float(value)

    def set_guidance(self, kind: str, data: str) -> None:
        self.guidance = (kind, data)


class GeneratorRequest:
    """One conversation's turn on a GeneratorEngine (og.Request's interface)."""

    def __init__(self, engine: GeneratorEngine):
        self._engine = engine
        self.prompt: list[int] = []
        self.turn: GeneratorTurn | None = None
        self.generator = None
        self.generated = 0
        self.cancelled = False
        self.turn_id = 0
        self.inputs = None  # a vision turn's og.NamedTensors, until its Generator takes them

    def begin_turn(self, tokens: np.ndarray, turn: GeneratorTurn) -> int:
        self.prompt = [int(t) for t in np.asarray(tokens).reshape(-1)]
        self.turn = turn
        if turn.images is not None:  # InvalidRequest here: the turn never starts
            self.inputs, self.prompt = self._engine.process(self.prompt, turn)
        self.turn_id += 1
        self._engine.pending.append(self)
        return self.turn_id

    def cancel_turn(self, turn_id: int) -> None:
        self.cancelled = True

    def close(self) -> None:
        self.generator = self.inputs = None
        if self in self._engine.pending:
            self._engine.pending.remove(self)


class GeneratorEngine:
    """og.Engine's interface over og.Generators with every adapter of the model active."""

    def __init__(self, model, adapters, names: list[str], bundle: Path, processor=None):
        """`adapters` None and `names` empty: a plain Generator lane (for logprob turns).
        `processor`: a vision model's og.MultiModalProcessor (None: turns take no pictures)."""
        self.model = model
        self.adapters = adapters
        self.names = list(names)
        self.processor = processor
        self.pending: list[GeneratorRequest] = []
        config = genai_config(bundle)
        eos = config["model"].get("eos_token_id", [])
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.context_length = int(config["model"]["context_length"])
        self.image_token = config["model"].get("image_token_id")

    def process(self, prompt: list[int], turn: GeneratorTurn) -> tuple[Any, list[int]]:
        """og's processor over a vision turn: its inputs, and the prompt's ids with each image
        token repeated to its picture's token count. 400s naming `images`: pictures that do
        not match the placeholders, or an expanded prompt that does not fit the context."""
        inputs, ids, counts = processed(self.processor, prompt, turn.images, self.image_token)
        room = turn.session_tokens - len(ids)
        if room < 1:
            raise InvalidRequest(
                f"prompt is too long with its images: {len(ids)} tokens ({sum(counts)} of them "
                f"for {len(counts)} images) exceed the context length of {turn.session_tokens}",
                param="images",
                code="context_length_exceeded",
            )
        turn.max_generated = max(1, min(turn.max_generated, room))
        return inputs, ids

    def create_event_buffer(self, size: int) -> None:
        return None

    def create_request(self, options=None) -> GeneratorRequest:
        return GeneratorRequest(self)

    def turn_options(self, request: GeneratorRequest) -> GeneratorTurn:
        """What og.TurnOptions(request) is for an og.Engine."""
        return GeneratorTurn(request)

    def run(self, buffer=None) -> Iterator[GeneratorEvent]:
        """One step of every turn: prefill and the first token, or the next token."""
        events = []
        for request in list(self.pending):
            try:
                event = self._step(request)
            except Exception as exc:  # this turn fails alone: each has its own Generator
                request.close()  # never stepped again
                events.append(self._failed(request, exc))
                continue
            if event.finish_reason.name != "NONE":
                self.pending.remove(request)
            events.append(event)
        return iter(events)

    def _step(self, request: GeneratorRequest) -> GeneratorEvent:
        import onnxruntime_genai as og

        if request.cancelled:
            return self._finish(request, og.FinishReason.CANCELLED, token=None)
        if request.generator is None:
            request.generator = self._start(request)
        generator = request.generator
        k = request.turn.logprobs
        # before the step: the raw logits the token is chosen from (after it, the next ones)
        logits = None if k is None else np.array(generator.get_logits(), copy=True)
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in self.eos:
            return self._finish(request, og.FinishReason.EOS, token=None)
        request.generated += 1
        scores = None if logits is None else step_logprobs(logits, token, k)
        if generator.is_done() or request.generated >= request.turn.max_generated:
            return self._finish(request, og.FinishReason.MAX_GENERATED_TOKENS, token, scores)
        flags = int(og.EngineEventFlags.TOKEN)
        return GeneratorEvent(request, flags, token, og.FinishReason.NONE, logprobs=scores)

    def _start(self, request: GeneratorRequest):
        """A Generator for the turn, adapters active, prompt prefilled."""
        import onnxruntime_genai as og

        turn = request.turn
        params = og.GeneratorParams(self.model)
        limit = min(len(request.prompt) + turn.max_generated, self.context_length)
        params.set_search_options(max_length=limit, min_length=0, **turn.search)
        if turn.guidance is not None:
            params.set_guidance(*turn.guidance)
        generator = og.Generator(self.model, params)
        for name in self.names:
            generator.set_active_adapter(self.adapters, name)
        if request.inputs is not None:  # a vision turn: og runs the pictures in the prefill
            generator.set_inputs(request.inputs)
            request.inputs = None
        else:
            generator.append_tokens(np.asarray([request.prompt], dtype=np.int32))
        return generator

    def _failed(self, request: GeneratorRequest, exc: Exception) -> GeneratorEvent:
        import onnxruntime_genai as og

        flags = int(og.EngineEventFlags.FAILED)
        usage = GeneratorUsage(len(request.prompt), request.generated)
        reason, code = og.FinishReason.FAILED, og.EngineErrorCode.REQUEST_UNSERVICEABLE
        return GeneratorEvent(request, flags, None, reason, usage, code, error=str(exc))

    def _finish(
        self, request: GeneratorRequest, reason, token: int | None, scores=None
    ) -> GeneratorEvent:
        import onnxruntime_genai as og

        flags = int(og.EngineEventFlags.TURN_FINISHED)
        if token is not None:
            flags |= int(og.EngineEventFlags.TOKEN)
        request.generator = None  # its KV cache goes now, not when the request is closed
        usage = GeneratorUsage(len(request.prompt), request.generated)
        return GeneratorEvent(request, flags, token, reason, usage, logprobs=scores)


def processed(processor, prompt: list[int], pictures, image_token: int | None):
    """og's processor over a prompt with pictures (an ImageInput): (its inputs, the prompt's
    ids with each image token repeated to its picture's token count, those counts). 400s
    naming `images`: a model without a processor, pictures that do not match the
    placeholders."""
    import onnxruntime_genai as og

    if processor is None:
        raise InvalidRequest("this model does not read images", param="images")
    try:
        opened = og.Images.open_bytes(*pictures.images)  # PNGs (engine/images.py)
        inputs = processor(pictures.prompt, images=opened)
    except RuntimeError as exc:  # "Prompt contained 1 vision_start tokens but received 2 ..."
        message = (str(exc).strip().splitlines() or ["unreadable"])[0][:300]
        raise InvalidRequest(f"the images do not fit the prompt: {message}",
                             param="images") from exc  # fmt: skip
    ids = inputs["input_ids"].as_numpy().reshape(-1).tolist()
    counts = inputs["num_image_tokens"].as_numpy().reshape(-1).tolist()
    expected = _expand(prompt, image_token, counts)
    if expected is not None and ids != expected:
        # the prompt's text did not tokenize back to the rendered ids: the rendered ones win
        inputs["input_ids"] = og.Tensor(np.asarray([expected], dtype=np.int64))
        ids = expected
    return inputs, ids, counts


def _expand(prompt: list[int], image_token: int | None, counts: list[int]) -> list[int] | None:
    """`prompt` with its k-th image token repeated counts[k] times (None: they do not pair)."""
    if image_token is None or prompt.count(image_token) != len(counts):
        return None
    expanded: list[int] = []
    pictures = iter(counts)
    for token in prompt:
        expanded.extend([token] * next(pictures) if token == image_token else [token])
    return expanded
