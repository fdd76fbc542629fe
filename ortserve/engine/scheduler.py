"""One thread per loaded model owns its og objects and sessions; requests talk to it by queue.

onnxruntime-genai is not thread-safe, so every call into og (and into the continuous
engine's onnxruntime session) for a model happens on that model's scheduler thread. Request
threads submit a Job (prompt tokens + options) and read its events from the Job's own queue.

Lanes. A lane is one engine and the turns it is generating; lanes step in turn on this one
thread. Which lanes a model gets depends on its graph (docs/engine.md, "Batching"):

- "continuous": a model builder graph on the CPU (engine/continuous.py, ortserve's own decode
  loop). Turns of any prompt length join the running batch at the next step and leave it
  when they end; finished turns keep their KV for the conversation's next turn
  (engine/kvcache.py). One such lane takes every turn that is not guided.
- "guided": og.Engine lanes beside a continuous lane, made when the first guided turn
  (JSON schema, tools) arrives: llguidance lives inside og.
- "engine": og.Engine lanes for every other graph (optimum exports, other providers, or
  ORTSERVE_BATCHING=static). og 0.18 batches them statically: a batch forms from the turns
  waiting when it starts, holds at most 4 (og's own cap), and runs until all end; a turn
  arriving meanwhile starts on another idle lane. Builder graphs batch any prompt lengths
  there; other graphs only equal lengths: their padded rows decode different tokens than
  the same prompt alone (og's position_ids for padded rows).

LoRA adapters. og 0.18 activates adapters only on an og.Generator, not on Engine requests,
so a model with adapters gets GeneratorEngine lanes (engine/adapters.py: the same interface,
one turn per lane, unbatched) instead.

Vision-language models (docs/vision.md). og.Engine refuses og's multimodal pipeline, so such
a model gets ONE GeneratorEngine lane of one turn: its turns, with pictures or not, run one
at a time, unbatched; og's processor expands each picture's placeholder into its image tokens
when the turn begins (engine/adapters.py).

Log probabilities. og.Engine 0.18 gives no logits. A continuous lane computes them from its
own logits; otherwise a job whose options ask for logprobs runs on a Generator lane
("logprobs", made when the first of these jobs arrives; its turns each have their own
Generator, stepped in turn, unbatched). On a model with adapters any of its Generator lanes
takes both kinds.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ortserve import metrics
from ortserve.engine.kvcache import KVStore
from ortserve.engine.types import GenerationOptions, Usage
from ortserve.errors import InvalidRequest, ModelLoadError, OrtServeError, ServerBusy
from ortserve.library.bundle import decoder_config, genai_config, input_capabilities

log = logging.getLogger("ortserve.engine")
_EVENT_BUFFER = 256
# og 0.18's static scheduler runs at most 4 requests per batch whatever max_batch_size says
# (measured): more would wait inside the engine for the whole batch to end.
OG_STATIC_BATCH = 4
# A mixed-length static batch pads every prompt to the longest: a prompt joins a batch only
# while the padded prefill stays within 1.5 times the real tokens (plus this much), so a
# short prompt does not wait for a long one's prefill nor double its cost.
_PAD_ALLOWANCE = 256
_warned: set[str] = set()


@dataclass(frozen=True)
class ImageInput:
    """A vision turn's pictures for og's processor: the prompt as text (its special tokens
    kept, one placeholder per picture) and the pictures as PNG bytes, in the prompt's order."""

    prompt: str
    images: tuple[bytes, ...]


@dataclass(eq=False)
class Job:
    """One turn: what to generate, and the queue its events go to."""

    tokens: list[int]
    options: GenerationOptions
    images: ImageInput | None = None  # a vision model's turn with pictures
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    submitted_at: float = field(default_factory=time.perf_counter)
    begun_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    request: Any = None
    turn_id: int | None = None
    finished: bool = False

    def finish(self, reason: str, usage: Usage) -> None:
        self.finished_at = time.perf_counter()
        self.finished = True
        self.events.put(("done", reason, usage))

    def fail(self, error: OrtServeError) -> None:
        self.finished = True
        self.events.put(("error", error))


@dataclass(eq=False)
class Lane:
    """One og.Engine (or GeneratorEngine) and the jobs in its current batch.

    kind: "engine" (og.Engine: plain jobs, a static batch admitted only when idle),
    "guided" (an og.Engine lane beside a continuous lane: guided jobs only, static too),
    "continuous" (engine/continuous.py: every job that is not guided, joining at any step),
    "generator" (a lane of a model with adapters, or a vision model's one lane: any job) or
    "logprobs" (a Generator lane of a model without adapters: logprob jobs only, each joining
    as soon as there is room).
    """

    engine: Any
    buffer: Any
    capacity: int  # turns in one batch: the Engine's batch size, 1 for an adapter lane
    jobs: dict[Any, Job] = field(default_factory=dict)
    kind: str = "engine"

    def takes(self, job: Job) -> bool:
        guided, logprobs = job.options.guidance is not None, job.options.logprobs is not None
        if self.kind == "generator":
            return True
        if self.kind == "continuous":
            return not guided
        if self.kind == "guided":
            return guided and not logprobs
        return logprobs == (self.kind == "logprobs")

    @property
    def static(self) -> bool:
        """An og.Engine lane: its batch takes no one until it is over."""
        return self.kind in ("engine", "guided")

    def room(self) -> int:
        """Turns it can start now: a static batch takes none until it is over."""
        if self.static and self.jobs:
            return 0
        return self.capacity - len(self.jobs)


class Scheduler:
    """Owns one model's og objects on a thread of its own."""

    def __init__(
        self,
        bundle: Path,
        provider: str,
        *,
        batch_size: int = 4,
        lanes: int = 2,
        parallel: int | None = None,
        max_queue: int = 512,
        name: str = "model",
        adapters: list[tuple[str, Path]] | None = None,
        batching: str = "auto",
        kv_cache_entries: int = 16,
        kv_cache_bytes: int = 1 << 30,
        kv_keep_type: str = "auto",
        kv_cache: Path | None = None,
        threads: int | None = None,
        speculation: str = "auto",
        int8: Path | None = None,
        draft: Path | None = None,
    ):
        self.bundle = bundle
        self.provider = provider
        self.batch_size = batch_size
        self.lane_count = lanes
        self.parallel = parallel or batch_size * lanes  # turns generating at once, at most
        self.max_queue = max_queue
        self.name = name
        self.adapters = list(adapters or [])  # (name, .onnx_adapter path), all active
        self.batching = batching  # "auto": continuous where the graph allows; "static": never
        self.graph = "optimum"  # or "builder": read from the bundle when it loads
        self.kv_store = KVStore(kv_cache_entries, kv_cache_bytes)
        self.kv_keep_type = kv_keep_type  # what kept turns are stored in (continuous.py)
        self.kv_cache = kv_cache  # where int8 cache scales are kept: an int8 cache (kv_int8.py)
        self.threads = threads  # intra-op threads where the bundle sets none (None: og's)
        self.speculation = speculation  # "auto": prompt-lookup drafts on continuous lanes
        self.int8 = int8  # where int8 weights are kept: continuous lanes compute in int8
        self.draft = draft  # a draft model's bundle: continuous lanes draft with it
        self._model: Any = None
        self._processor: Any = None  # og.MultiModalProcessor of a vision model
        self._counter: Any = None  # another one, for counting on request threads
        self._image_token: int | None = None
        self._counter_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._lanes: list[Lane] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._unfinished = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)

    # ---- called from request threads -------------------------------------------------------

    def start(self) -> None:
        """Load the model on the scheduler thread; raise ModelLoadError if it fails."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise ModelLoadError(f'failed to load model "{self.name}": {self._error}')

    def submit(
        self, tokens: list[int], options: GenerationOptions, images: ImageInput | None = None
    ) -> Job:
        job = Job(list(tokens), options, images)
        with self._lock:
            if self._stopping:
                raise ModelLoadError(f'model "{self.name}" is unloading; try again')
            if self._unfinished >= self.max_queue + self.parallel:
                raise ServerBusy()
            self._unfinished += 1
        self._inbox.put(("submit", job))
        return job

    def prompt_length(self, tokens: list[int], images: ImageInput) -> int:
        """A vision prompt's length once og's processor placed its pictures' image tokens,
        without generating: with a processor of its own (the lane's runs on the scheduler
        thread), one count at a time."""
        from ortserve.engine.adapters import processed

        with self._counter_lock:
            if self._counter is None:  # made once, with the image token it expands
                self._counter = self._og_model().create_multimodal_processor()
                self._image_token = genai_config(self.bundle)["model"].get("image_token_id")
            return len(processed(self._counter, tokens, images, self._image_token)[1])

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def pending(self) -> int:
        """Jobs submitted and not finished yet (queued or generating)."""
        with self._lock:
            return self._unfinished

    def running(self) -> int:
        """Jobs generating now (read from another thread: a snapshot, for metrics)."""
        return sum(len(lane.jobs) for lane in list(self._lanes))

    def stop(self) -> None:
        """Cancel every job, release the og objects and end the thread."""
        with self._lock:
            self._stopping = True
        if self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join()

    # ---- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to start(); the thread ends
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._drain_inbox(block=not self._busy()):
                self._admit()
                for lane in self._lanes:
                    if lane.jobs:
                        self._step(lane)
        finally:
            self._cancel_everything()

    def _load(self) -> None:
        from ortserve.engine import continuous

        self.graph = continuous.graph_form(self.bundle)
        if self._continuous_wanted():
            try:
                self._load_continuous_lane()
                return
            except Exception as exc:  # og may still run it: static batches, as before
                log.warning("%s: continuous batching unavailable (%s); og.Engine lanes instead",
                            self.name, _first_line(exc))  # fmt: skip
        self._og_model()
        if self.adapters or self.vision:
            self._load_generator_lanes()
            return
        self._add_engine_lanes("engine")

    @functools.cached_property
    def vision(self) -> bool:
        """og's multimodal pipeline (a vision stage in genai_config.json): og.Engine refuses it."""
        return "vision" in input_capabilities(self.bundle)

    def _continuous_wanted(self) -> bool:
        from ortserve.engine import continuous

        if self.adapters or self.batching == "static" or self.provider != "cpu":
            return False  # adapters need og.Generator; other providers keep og's own batching
        return continuous.supports(self.bundle)

    def _load_continuous_lane(self) -> None:
        """ortserve's own decode loop over the builder graph; og.Model only when needed."""
        from ortserve.engine.continuous import ContinuousEngine, DecoderGraph

        engine = ContinuousEngine(
            DecoderGraph.load(
                self.bundle, self.threads, self.int8, self.kv_keep_type, kv_cache=self.kv_cache
            ),
            self.parallel,
            self.kv_store,
            self.speculation,
            draft=self._draft_model(),
        )
        self._lanes.append(Lane(engine, None, self.parallel, kind="continuous"))
        log.info("%s: continuous batching (builder graph), up to %d turns", self.name,
                 self.parallel)  # fmt: skip

    def _draft_model(self):
        """The draft model (draft_model.py), or None: speculation off, none set, or one that
        fails to load (the model runs with prompt lookup then)."""
        if self.draft is None or self.speculation == "off":
            return None
        from ortserve.engine.draft_model import DraftModel

        try:
            model = DraftModel.load(self.draft, self.threads)
        except Exception as exc:
            log.warning("%s: draft model %s not loaded (%s); prompt lookup instead", self.name,
                        self.draft, _first_line(exc))  # fmt: skip
            return None
        log.info("%s: speculative decoding with draft model %s", self.name, self.draft)
        return model

    def _og_model(self):
        """The og.Model, loaded on first use (a continuous model needs it for guided turns)."""
        if self._model is not None:
            return self._model
        import onnxruntime_genai as og

        from ortserve.engine.providers import configure

        config = og.Config(str(self.bundle))
        configure(config, self.provider)
        # Engine turns carry their own limits: no session-wide minimum length, one beam.
        overlay = {
            "engine": {"static_batching": {"max_batch_size": self._static_batch}},
            "search": {"min_length": 0, "num_beams": 1},
        }
        if self.threads and "intra_op_num_threads" not in _decoder_session(self.bundle):
            overlay["model"] = {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads}}}  # fmt: skip
        config.overlay(json.dumps(overlay))
        self._model = og.Model(config)
        return self._model

    @property
    def _static_batch(self) -> int:
        return max(1, min(self.batch_size, OG_STATIC_BATCH))

    def _add_engine_lanes(self, kind: str) -> None:
        """og.Engine lanes over the one og.Model (its weights are shared)."""
        import onnxruntime_genai as og

        model = self._og_model()
        for _ in range(self.lane_count):
            engine = og.Engine(model)
            buffer = engine.create_event_buffer(_EVENT_BUFFER)
            self._lanes.append(Lane(engine, buffer, self._static_batch, kind=kind))

    def _load_generator_lanes(self) -> None:
        """A model with adapters: a Generator lane each; a vision model: one lane, so that
        its turns (and their pictures' vision steps) run one at a time."""
        from ortserve.engine.adapters import load_adapters

        if self.adapters:
            self._adapters = load_adapters(self._model, self.adapters)  # kept to rebuild a lane
            self._adapter_names = [name for name, _ in self.adapters]
        if self.vision:
            self._processor = self._model.create_multimodal_processor()
        for _ in range(1 if self.vision else self.lane_count):
            self._lanes.append(Lane(self._generator_engine(), None, 1, kind="generator"))

    def _generator_engine(self):
        """A GeneratorEngine over the og.Model with its adapters and, for a vision model,
        og's multimodal processor."""
        from ortserve.engine.adapters import GeneratorEngine

        adapters, names = (self._adapters, self._adapter_names) if self.adapters else (None, [])
        return GeneratorEngine(self._model, adapters, names, self.bundle, processor=self._processor)

    def _logprob_lane(self) -> Lane:
        """The lane for logprob jobs of a model without adapters, made on first use."""
        from ortserve.engine.adapters import GeneratorEngine

        for lane in self._lanes:
            if lane.kind == "logprobs":
                return lane
        engine = GeneratorEngine(self._og_model(), None, [], self.bundle)
        lane = Lane(engine, None, self.batch_size, kind="logprobs")
        self._lanes.append(lane)
        log.info("%s: a Generator lane for turns with logprobs (unbatched)", self.name)
        return lane

    def _busy(self) -> bool:
        return bool(self._waiting) or any(lane.jobs for lane in self._lanes)

    def _drain_inbox(self, *, block: bool) -> bool:
        """Apply queued commands; wait for one when idle. False once told to stop."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, job = command
            if kind == "stop":
                return False
            if kind == "submit":
                self._enqueue(job)
            else:
                self._cancel(job)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _enqueue(self, job: Job) -> None:
        """A submitted job waits; first make sure some lane can take it."""
        try:
            self._lane_for(job)
        except Exception as exc:  # e.g. an unreadable genai_config.json: this job only
            log.warning("cannot make a lane for a turn of %s: %s", self.name, exc)
            what = " with logprobs" if job.options.logprobs is not None else ""
            message = f"cannot start generation{what}: {_first_line(exc)}"
            self._complete_with_error(job, OrtServeError(message))
            return
        self._waiting.append(job)

    def _lane_for(self, job: Job) -> None:
        """Make the lanes a job needs when none of the model's lanes takes it yet."""
        if any(lane.takes(job) for lane in self._lanes):
            return
        if job.options.logprobs is not None:
            self._logprob_lane()  # a Generator: logits, and guidance too
        else:
            self._add_engine_lanes("guided")  # beside a continuous lane: llguidance is og's

    def _admit(self) -> None:
        """Start waiting jobs on lanes with room, within ORTSERVE_NUM_PARALLEL in all: a
        continuous lane takes them at any step, an og.Engine lane a batch when idle."""
        for lane in self._lanes:
            room = self.parallel - sum(len(other.jobs) for other in self._lanes)
            if not self._waiting or room <= 0 or lane.room() <= 0:
                continue
            for job in self._group_for(lane, min(room, lane.room())):
                try:
                    self._begin(lane, job)
                except Exception as exc:  # a bad turn fails alone
                    log.warning("cannot start a turn on %s: %s", self.name, exc)
                    self._complete_with_error(job, _start_error(job, exc))

    def _group_for(self, lane: Lane, limit: int) -> list[Job]:
        """Take up to `limit` waiting jobs for `lane`, interactive before background, oldest
        first. An og.Engine batch holds one prompt length unless the graph pads exactly
        (builder graphs), and then only lengths whose padding stays bounded."""
        group = [job for job in self._waiting if lane.takes(job) and not job.options.background]
        if not group:  # batch turns only when no interactive one waits, and never all slots
            group = [job for job in self._waiting if lane.takes(job)][: self._background_room()]
        if group and lane.static:
            if self.graph == "builder":
                group = _bounded_padding(group, limit)
            else:
                length = len(group[0].tokens)
                group = [job for job in group if len(job.tokens) == length]
        group = group[:limit]
        for job in group:
            self._waiting.remove(job)
        return group

    @functools.cached_property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size (genai_config.json), read once."""
        try:
            return int(genai_config(self.bundle)["model"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _background_room(self) -> int:
        """Batch turns that may start now: one slot of ORTSERVE_NUM_PARALLEL stays free for an
        interactive turn, which then starts at the next step instead of after a batch turn."""
        running = sum(job.options.background for lane in self._lanes for job in lane.jobs.values())
        return max(0, max(1, self.parallel - 1) - running)

    def _begin(self, lane: Lane, job: Job) -> None:
        import onnxruntime_genai as og

        options = og.RequestOptions()
        options.set_max_session_tokens(job.options.num_ctx)
        request = lane.engine.create_request(options=options)
        turn = getattr(lane.engine, "turn_options", og.TurnOptions)(request)
        seeded = lane.kind == "continuous"  # og's static batching takes no per-turn seed
        apply_turn_options(turn, job.options, len(job.tokens), seeded=seeded,
                           vocab_size=self.vocab_size)  # fmt: skip
        if job.options.logprobs is not None:
            turn.set_logprobs(job.options.logprobs)  # not on an og.Engine lane's turn
        if job.images is not None:  # a vision model's Generator lane: og's processor reads them
            turn.set_images(job.images, job.options.num_ctx)
        job.begun_at = time.perf_counter()
        job.turn_id = request.begin_turn(np.asarray(job.tokens, dtype=np.int32), turn)
        job.request = request
        lane.jobs[request] = job

    def _step(self, lane: Lane) -> None:
        import onnxruntime_genai as og

        try:
            events = list(lane.engine.run(lane.buffer))
        except Exception as exc:  # the whole batch failed: tell each member, keep serving
            log.exception("engine step failed for %s", self.name)
            self._recover(lane, f"generation failed: {_first_line(exc)}")
            return
        token_flag = int(og.EngineEventFlags.TOKEN)
        finished_flag = int(og.EngineEventFlags.TURN_FINISHED)
        failed_flag = int(og.EngineEventFlags.FAILED)
        for event in events:
            job = lane.jobs.get(event.request)
            if job is None:
                continue
            flags = int(event.flags)
            reason = event.finish_reason
            if flags & token_flag and reason != og.FinishReason.CANCELLED:
                if not job.first_token_at:
                    job.first_token_at = time.perf_counter()
                    metrics.TIME_TO_FIRST_TOKEN.labels(self.name).observe(
                        job.first_token_at - job.submitted_at
                    )
                if lane.static:
                    job.events.put(("token", int(event.token)))
                else:  # a Generator lane's event may carry the token's logprobs
                    job.events.put(("token", int(event.token), event.logprobs))
            if flags & failed_flag or reason == og.FinishReason.FAILED:
                error = OrtServeError(_failure(event))
                self._retire(lane, job, error=error)
                if event.error_code == og.EngineErrorCode.ENGINE_EXECUTION_FAILURE:
                    # og marks the whole Engine unhealthy: every later turn on it would fail
                    self._recover(lane, "generation failed: another request in its batch "
                                  "broke the batch; try again")  # fmt: skip
                    return
            elif flags & finished_flag or reason != og.FinishReason.NONE:
                self._retire(lane, job, reason=_REASONS.get(reason.name, "stop"), usage=event.usage)

    def _recover(self, lane: Lane, message: str) -> None:
        """Fail what is left of a broken batch and give the lane a fresh engine."""
        for request, job in list(lane.jobs.items()):
            request.close()
            self._complete_with_error(job, OrtServeError(message))
        lane.jobs.clear()
        if lane.kind == "continuous":
            lane.engine.reset()  # the session and the kept turns are sound; the batch is not
            log.warning("reset the continuous batch of %s after a failed step", self.name)
            return
        if not lane.static:
            lane.engine = self._generator_engine()
            return
        import onnxruntime_genai as og

        lane.engine = og.Engine(self._model)
        lane.buffer = lane.engine.create_event_buffer(_EVENT_BUFFER)
        log.warning("rebuilt an engine of %s after a failed batch", self.name)

    def _retire(self, lane: Lane, job: Job, *, reason: str = "stop", usage=None, error=None):
        lane.jobs.pop(job.request, None)
        job.request.close()
        if error is not None:
            self._complete_with_error(job, error)
            return
        measured = Usage(
            prompt_tokens=getattr(usage, "prompt_tokens", len(job.tokens)),
            generated_tokens=getattr(usage, "generated_tokens", 0),
            cached_prompt_tokens=getattr(usage, "cached_prompt_tokens", 0),
        )
        self._complete(job, reason, measured)

    def _cancel(self, job: Job) -> None:
        if job.finished:
            return
        if job in self._waiting:
            self._waiting.remove(job)
            self._complete(job, "cancelled", Usage(prompt_tokens=len(job.tokens)))
        elif job.request is not None:
            job.request.cancel_turn(job.turn_id)  # a CANCELLED event retires it

    def _complete(self, job: Job, reason: str, usage: Usage) -> None:
        metrics.TOKENS.labels(self.name, "prompt").inc(usage.prompt_tokens)
        metrics.TOKENS.labels(self.name, "generated").inc(usage.generated_tokens)
        job.finish(reason, usage)
        with self._lock:
            self._unfinished -= 1

    def _complete_with_error(self, job: Job, error: OrtServeError) -> None:
        job.fail(error)
        with self._lock:
            self._unfinished -= 1

    def _cancel_everything(self) -> None:
        """On stop: every job still here ends as cancelled; og objects are released."""
        for lane in self._lanes:
            for request, job in list(lane.jobs.items()):
                request.close()
                self._complete(job, "cancelled", Usage(prompt_tokens=len(job.tokens)))
            lane.jobs.clear()
        while self._waiting:
            job = self._waiting.popleft()
            self._complete(job, "cancelled", Usage(prompt_tokens=len(job.tokens)))
        while True:  # submissions that raced with stop
            try:
                kind, job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._complete(job, "cancelled", Usage(prompt_tokens=len(job.tokens)))
        self._lanes.clear()
        self._model = self._processor = None


def _failure(event) -> str:
    """Why a turn failed: og's message where a Generator lane kept it, else the error code."""
    message = getattr(event, "error", None)
    if message:
        return f"generation failed: {_first_line(message)}"
    return f"generation failed (engine error {event.error_code.name})"


def _start_error(job: Job, exc: BaseException) -> OrtServeError:
    """Why a turn could not start: a grammar og cannot compile is the request's schema (400);
    a request error already said why (a vision turn's pictures)."""
    if isinstance(exc, OrtServeError):
        return exc
    if job.options.guidance is not None:
        return InvalidRequest(f"the requested schema or tools cannot be enforced: "
                              f"{_first_line(exc)}", param="format")  # fmt: skip
    return OrtServeError(f"cannot start generation: {_first_line(exc)}")


def _first_line(exc: BaseException | str) -> str:
    """An og error's first line: what went wrong, without grammar or parser state dumps."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.split(" Cause: ")[0][:300]


_REASONS = {
    "EOS": "stop",
    "STOP_STRING": "stop",
    "MAX_GENERATED_TOKENS": "length",
    "MAX_SESSION_TOKENS": "length",
    "CANCELLED": "cancelled",
}


def _bounded_padding(jobs: list[Job], limit: int) -> list[Job]:
    """The oldest job and those after it that keep the batch's padded prefill bounded."""
    group = [jobs[0]]
    for job in jobs[1:]:
        if len(group) >= limit:
            break
        lengths = [len(j.tokens) for j in group] + [len(job.tokens)]
        if max(lengths) * len(lengths) <= 1.5 * sum(lengths) + _PAD_ALLOWANCE:
            group.append(job)
    return group


def apply_turn_options(
    turn,
    options: GenerationOptions,
    prompt_tokens: int,
    *,
    seeded: bool = False,
    vocab_size: int | None = None,
) -> None:
    """GenerationOptions -> og.TurnOptions (or a lane's own turn options), within what the
    lane honours: `seeded` lanes take a per-turn seed. A top_k of 0 or past the vocabulary
    cuts nothing, as the continuous lane's sampler reads it; og refuses both, so it gets the
    vocabulary's size."""
    room = max(1, options.num_ctx - prompt_tokens)
    limit = room if options.num_predict < 0 else min(options.num_predict, room)
    turn.set_max_generated_tokens(max(1, limit))
    turn.set_do_sample(not options.greedy)
    if not options.greedy:
        turn.set_temperature(options.temperature)
        top_k = options.top_k
        if vocab_size and not 0 < top_k <= vocab_size:
            top_k = vocab_size
        turn.set_top_k(top_k)
        turn.set_top_p(options.top_p)
    if options.repeat_penalty != 1.0:
        turn.set_repetition_penalty(options.repeat_penalty)
    if options.guidance is not None:
        turn.set_guidance(options.guidance.kind, options.guidance.data)  # og's own form
    if seeded:
        turn.set_seed(options.seed)
    elif options.seed is not None and "seed" not in _warned:
        # og 0.18 takes a per-turn seed only in dynamic batching, which optimum-exported
        # graphs cannot use: say so once rather than pretend.
        _warned.add("seed")
        log.warning("option seed is not honoured by the static-batching engine; ignored")


def _decoder_session(bundle: Path) -> dict:
    """The decoder's session options as the bundle's genai_config.json sets them."""
    return decoder_config(bundle).get("session_options", {})
