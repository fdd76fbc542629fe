"""Loaded models: load on first use, keep-alive timers, a bound on how many stay loaded.

In the spirit of Ollama's server/sched.go: one owner (the Runtime) decides what is loaded;
models are loaded by the backend of their bundle's format (engine/backend.py: og_backend's
Scheduler thread per generation model, an onnxruntime session per embedding model); an idle
model is unloaded when its keep-alive expires, or evicted (least recently used first) to make
room for another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ortserve.config import Settings
from ortserve.engine.backend import LoadedModel, backend_for
from ortserve.errors import ModelLoadError, OrtServeError
from ortserve.library import Library, ModelInfo

log = logging.getLogger("ortserve.engine")


# Either kind of loaded model (generation or embedding), from whichever backend loaded it.
Loaded = TypeVar("Loaded", bound=LoadedModel)


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

    def acquire(self, model: str | ModelInfo, keep_alive: float | None = None) -> LoadedModel:
        """The loaded model, loading it first if needed; marks it in use.

        `model` is the library entry the serving core resolved (and checked the capability
        of) for the request, so the name is not resolved again; a name is resolved here.
        """
        return self._acquire(self._entry(model), self._load)

    def preload(self, name: str) -> str:
        """Load `name` now and keep it loaded (ORTSERVE_PRELOAD): no keep-alive expiry, never
        evicted; a request's own keep_alive still applies. Returns the library's name."""
        info = self.library.get(name)
        with self._lock:
            self._pinned.add(info.name)
        try:
            loaded = self.acquire(info)  # whatever it does: generation, embedding, speech
        except BaseException:
            with self._lock:
                self._pinned.discard(info.name)
            raise
        self.release(loaded)
        return info.name

    def release(
        self,
        loaded: LoadedModel,
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

    def unload(self, model: str | ModelInfo) -> bool:
        """Unload now (running turns are cancelled). True if it was loaded."""
        info = self._entry(model)
        with self._lock:
            loaded = self._models.pop(info.name, None)
        if loaded is None:
            return False
        loaded.stop()
        log.info("unloaded %s", info.name)
        return True

    def loaded_models(self) -> list[LoadedModel]:
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
            running = loaded.running()
            counts[loaded.name] = (max(0, loaded.pending() - running), running)
        return counts

    def loaded(self, name: str) -> LoadedModel | None:
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

    def _entry(self, model: str | ModelInfo) -> ModelInfo:
        return model if isinstance(model, ModelInfo) else self.library.get(model)

    def _acquire(self, info: ModelInfo, load: Callable[[ModelInfo], Loaded]) -> Loaded:
        """Share a loaded model, or load it once however many requests ask at the same time."""
        with self._lock:
            while True:
                loaded = self._models.get(info.name)
                if loaded is not None and _same_model(loaded.info, info):
                    # system, parameters, template... may have changed on disk (a create
                    # from the CLI): the weights stay loaded, the newest manifest applies
                    loaded.renew(info)
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

    def _load(self, info: ModelInfo) -> LoadedModel:
        """Load through the backend of the bundle's format (engine/backend.py)."""
        backend = backend_for(info)
        try:
            self.library.check(info)  # a damaged bundle must not serve wrong output
        except OrtServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f'failed to load model "{info.name}": {exc}') from exc
        return backend.load(info, self.settings, self.library)

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

    def _unload_if_idle(self, loaded: LoadedModel) -> None:
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
        return backend_for(info).planned_provider(info, requested)
    except (OrtServeError, OSError, KeyError, ValueError):
        return None


def _same_model(loaded: ModelInfo, current: ModelInfo) -> bool:
    """Still what the library names: same bundle, adapters and draft model (re-created
    otherwise)."""
    return (loaded.digest == current.digest and _adapters(loaded) == _adapters(current)
            and loaded.manifest.get("draft") == current.manifest.get("draft"))  # fmt: skip


def _adapters(info: ModelInfo) -> list:
    return [a.get("digest") for a in info.manifest.get("adapters") or [] if isinstance(a, dict)]
