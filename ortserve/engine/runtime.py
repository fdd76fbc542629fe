"""Loaded models: load on first use, keep-alive timers, a bound on how many stay loaded.

In the spirit of Ollama's server/sched.go: one owner (the Runtime) decides what is loaded;
each loaded generation model has its own Scheduler thread, each embedding model an
onnxruntime session (engine/embeddings.py); an idle model is unloaded when its
keep-alive expires, or evicted (least recently used first) to make room for another.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ortserve import metrics
from ortserve.config import Settings
from ortserve.engine.embeddings import LoadedEmbedder, load_embedder
from ortserve.engine.providers import bundle_target, load_candidates, load_on_best
from ortserve.engine.resident import Resident
from ortserve.engine.scheduler import Scheduler
from ortserve.engine.turns import Turn
from ortserve.engine.types import GenerationOptions
from ortserve.errors import InvalidRequest, ModelLoadError, OrtServeError
from ortserve.library import Library, ModelInfo

log = logging.getLogger("ortserve.engine")


@dataclass(eq=False, kw_only=True)
class LoadedModel(Resident):
    """A generation model in memory: its scheduler, tokenizer and chat template."""

    scheduler: Scheduler
    tokenizer: object  # tokenizers.Tokenizer: thread-safe, unlike og.Tokenizer
    template: object | None  # prompts.ChatTemplate

    @property
    def context_length(self) -> int:
        return int(self.info.details.get("context_length") or 2048)

    def pending(self) -> int:
        """Turns queued or generating."""
        return self.scheduler.pending()

    def stop(self) -> None:
        """Unload: cancel running turns and stop the scheduler thread."""
        self.scheduler.stop()

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a text cannot fit the context, whatever its tokens.

        No token is longer than the vocabulary's longest entry, so a text longer than the
        context times that length needs more tokens than the context holds: it is refused
        without tokenizing it (a 30 MB prompt would take minutes and gigabytes).
        """
        longest = max((len(token) for token in self.tokenizer.get_vocab()), default=16)
        return self.context_length * max(1, longest)

    def exceeds_context(self, text: str) -> bool:
        """Cheap and certain: True only when `text` cannot fit the context."""
        return len(text) > self.max_prompt_chars

    def min_tokens(self, text: str) -> int:
        """A lower bound of `text`'s token count, without tokenizing it."""
        return len(text) * self.context_length // self.max_prompt_chars + 1

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids; the chat template already wrote any special tokens."""
        if self.exceeds_context(text):
            raise InvalidRequest(
                f"prompt is too long: {len(text)} characters cannot fit the context length of "
                f"{self.context_length} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def generate(
        self, tokens: list[int], options: GenerationOptions, *, skip_special_tokens: bool = True
    ) -> Turn:
        from ortserve.engine.text import TextDecoder

        if len(tokens) >= options.num_ctx:
            raise InvalidRequest(
                f"prompt is too long: {len(tokens)} tokens exceed the context length of "
                f"{options.num_ctx}",
                param="prompt",
                code="context_length_exceeded",
            )
        job = self.scheduler.submit(tokens, options)
        return Turn(
            self.scheduler, job, TextDecoder(self.tokenizer, options.stop, skip_special_tokens)
        )


# Either kind of loaded model: both have the same bookkeeping, stop() and pending().
Loaded = TypeVar("Loaded", LoadedModel, LoadedEmbedder)


class Runtime:
    """Every loaded model, and the rules for loading and unloading them."""

    def __init__(self, settings: Settings, library: Library | None = None):
        self.settings = settings
        self.library = library or Library(settings.models)
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._pinned: set[str] = set()  # ORTSERVE_PRELOAD's models: kept loaded (preload())
        self._lock = threading.Condition()
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="keep-alive", daemon=True)
        self._reaper.start()

    # ---- acquire / release ---------------------------------------------------------------

    def acquire(self, name: str, keep_alive: float | None = None) -> LoadedModel:
        """The loaded model for `name`, loading it first if needed; marks it in use."""
        info = self.library.get(name)
        if "completion" not in info.capabilities:
            raise InvalidRequest(f'"{info.name}" does not support generate', param="model")
        return self._acquire(info, self._load)

    def acquire_embedder(self, name: str, keep_alive: float | None = None) -> LoadedEmbedder:
        """The loaded embedding model for `name`, loading it first if needed; marks it in use."""
        info = self.library.get(name)
        if "embedding" not in info.capabilities:
            raise InvalidRequest(f'"{info.name}" does not support embeddings', param="model")
        return self._acquire(info, self._load_embedder)

    def preload(self, name: str) -> str:
        """Load `name` now and keep it loaded (ORTSERVE_PRELOAD): no keep-alive expiry, never
        evicted; a request's own keep_alive still applies. Returns the library's name."""
        info = self.library.get(name)
        with self._lock:
            self._pinned.add(info.name)
        try:
            embedder = "embedding" in info.capabilities and "completion" not in info.capabilities
            loaded = self.acquire_embedder(name) if embedder else self.acquire(name)
        except BaseException:
            with self._lock:
                self._pinned.discard(info.name)
            raise
        self.release(loaded)
        return info.name

    def release(
        self,
        loaded: LoadedModel | LoadedEmbedder,
        keep_alive: float | None = None,
        *,
        failed: bool = False,
    ) -> None:
        """The request is done with `loaded`: start its keep-alive (0 unloads it now).

        A `failed` request (refused after the model was acquired) does not extend the
        keep-alive: the model keeps the expiry it had before.
        """
        if keep_alive is not None:
            keep = keep_alive
        else:
            keep = -1.0 if loaded.name in self._pinned else self.settings.keep_alive
        with self._lock:
            loaded.active = max(0, loaded.active - 1)
            if loaded.active:
                return
            if failed and loaded.idle_expiry is not None:
                loaded.expires_at = loaded.idle_expiry
                self._lock.notify_all()
                return
            loaded.last_used = time.monotonic()
            if keep < 0:
                loaded.expires_at = None
            else:
                loaded.expires_at = time.time() + keep
            self._lock.notify_all()
        if keep == 0:
            self._unload_if_idle(loaded)

    def unload(self, name: str) -> bool:
        """Unload now (running turns are cancelled). True if it was loaded."""
        info = self.library.get(name)
        with self._lock:
            loaded = self._models.pop(info.name, None)
        if loaded is None:
            return False
        loaded.stop()
        log.info("unloaded %s", info.name)
        return True

    def loaded_models(self) -> list[LoadedModel | LoadedEmbedder]:
        """Loaded models, most recently used first; ones deleted from the library are unloaded."""
        with self._lock:
            models = list(self._models.values())
        gone = [m for m in models if not m.active and not self.library.exists(m.name)]
        for loaded in gone:  # removed behind the server's back (another process's rm)
            self._unload_if_idle(loaded)
        models = [m for m in models if m not in gone]
        return sorted(models, key=lambda m: -m.last_used)

    def turn_counts(self) -> dict[str, tuple[int, int]]:
        """Loaded model name -> (turns queued, turns running), for metrics."""
        with self._lock:
            models = list(self._models.values())
        counts = {}
        for loaded in models:
            running = loaded.scheduler.running() if isinstance(loaded, LoadedModel) else 0
            counts[loaded.name] = (max(0, loaded.pending() - running), running)
        return counts

    def loaded(self, name: str) -> LoadedModel | LoadedEmbedder | None:
        info = self.library.get(name)
        with self._lock:
            return self._models.get(info.name)

    def shutdown(self, grace: float = 0.0) -> None:
        """Wait up to `grace` seconds for in-flight turns, then cancel the rest and unload."""
        deadline = time.monotonic() + grace
        with self._lock:
            self._closed = True
            while any(m.active for m in self._models.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            models = list(self._models.values())
            self._models.clear()
            self._lock.notify_all()
        for loaded in models:
            loaded.stop()

    # ---- internals -----------------------------------------------------------------------

    def _acquire(self, info: ModelInfo, load: Callable[[ModelInfo], Loaded]) -> Loaded:
        """Share a loaded model, or load it once however many requests ask at the same time."""
        with self._lock:
            while True:
                loaded = self._models.get(info.name)
                if loaded is not None and _same_model(loaded.info, info):
                    # system, parameters, template... may have changed on disk (a create
                    # from the CLI): the weights stay loaded, the newest manifest applies
                    loaded.info = info
                    if not loaded.active:
                        loaded.idle_expiry = loaded.expires_at
                    loaded.active += 1
                    loaded.expires_at = None
                    loaded.load_duration_ns = 0
                    return loaded
                if info.name not in self._loading:
                    break
                self._lock.wait()  # another request is loading it: share that load
            self._loading[info.name] = threading.Event()
            stale = self._models.pop(info.name, None)  # replaced on disk since it loaded
        try:
            if stale is not None:
                stale.stop()
            loaded = load(info)
        finally:
            with self._lock:
                self._loading.pop(info.name).set()
                self._lock.notify_all()
        with self._lock:
            loaded.active = 1
            self._models[info.name] = loaded
            self._evict_over_limit(keep=info.name)
        return loaded

    def _load_embedder(self, info: ModelInfo) -> LoadedEmbedder:
        self.library.check(info)  # a damaged bundle must not serve wrong vectors
        return load_embedder(info, self.settings.provider)

    def _load(self, info: ModelInfo) -> LoadedModel:
        from tokenizers import Tokenizer

        from ortserve.engine.prompts import ChatTemplate

        started = time.perf_counter()
        bundle = Path(info.path)
        try:
            self.library.check(info)  # a damaged bundle must not serve wrong output
            candidates = load_candidates(self.settings.provider, bundle_target(bundle))
            tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
            template = ChatTemplate.from_bundle(bundle)
            adapters = self.library.adapter_files(info)
        except OrtServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f'failed to load model "{info.name}": {exc}') from exc
        scheduler, provider = load_on_best(
            info.name, candidates, lambda provider: self._start_scheduler(info, provider, adapters)
        )
        duration = int((time.perf_counter() - started) * 1e9)
        log.info("loaded %s on %s in %.2fs", info.name, provider, duration / 1e9)
        metrics.LOAD_SECONDS.labels(info.name).observe(duration / 1e9)
        return LoadedModel(
            info=info,
            provider=provider,
            scheduler=scheduler,
            tokenizer=tokenizer,
            template=template,
            load_duration_ns=duration,
        )

    def _start_scheduler(self, info: ModelInfo, provider: str, adapters) -> Scheduler:
        """The model's scheduler thread with the model loaded on `provider`."""
        scheduler = Scheduler(
            Path(info.path),
            provider,
            batch_size=self.settings.num_parallel,
            lanes=self.settings.engine_lanes,
            parallel=self.settings.num_parallel,
            max_queue=self.settings.max_queue,
            name=info.name,
            adapters=adapters,
            batching=self.settings.batching,
            kv_cache_entries=self.settings.kv_cache_entries,
            kv_cache_bytes=self.settings.kv_cache_size,
            threads=self.settings.model_threads,
        )
        scheduler.start()
        return scheduler

    def _evict_over_limit(self, keep: str) -> None:
        """Unload idle models, least recently used first, while over the limit (lock held)."""
        while len(self._models) > self.settings.max_loaded_models:
            idle = [m for m in self._models.values()
                    if not m.active and m.name != keep and m.name not in self._pinned]  # fmt: skip
            if not idle:
                return  # everything is busy: stay over the limit rather than fail requests
            victim = min(idle, key=lambda m: m.last_used)
            del self._models[victim.name]
            threading.Thread(target=victim.stop, daemon=True).start()
            log.info("evicted %s to stay within %d loaded models", victim.name,
                     self.settings.max_loaded_models)  # fmt: skip

    def _unload_if_idle(self, loaded: LoadedModel | LoadedEmbedder) -> None:
        with self._lock:
            if loaded.active or self._models.get(loaded.name) is not loaded:
                return
            del self._models[loaded.name]
        loaded.stop()
        log.info("unloaded %s (idle: keep-alive over, or removed from the library)", loaded.name)

    def _reap(self) -> None:
        """Unload models whose keep-alive has expired."""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.time()
                expired = [m for m in self._models.values()
                           if not m.active and m.expires_at is not None and m.expires_at <= now]  # fmt: skip
                deadlines = [m.expires_at for m in self._models.values() if m.expires_at]
                if not expired:
                    timeout = min(deadlines) - now if deadlines else None
                    self._lock.wait(timeout if timeout is None else max(0.01, timeout))
                    continue
            for loaded in expired:
                self._unload_if_idle(loaded)


def planned_provider(info: ModelInfo, requested: str) -> str | None:
    """The provider a model would load on first (None: the requested one cannot run)."""
    try:
        if "embedding" in info.capabilities:
            return load_candidates(requested, runtime="onnxruntime")[0]
        return load_candidates(requested, bundle_target(Path(info.path)))[0]
    except (OrtServeError, OSError, KeyError, ValueError):
        return None


def _same_model(loaded: ModelInfo, current: ModelInfo) -> bool:
    """Still what the library names: same bundle and same adapters (re-created otherwise)."""
    return loaded.digest == current.digest and _adapters(loaded) == _adapters(current)


def _adapters(info: ModelInfo) -> list:
    return [a.get("digest") for a in info.manifest.get("adapters") or [] if isinstance(a, dict)]
