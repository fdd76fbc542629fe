"""ORTSERVE_PRELOAD: models loaded when the server starts, in the background, and kept loaded.

The server answers HTTP at once (liveness) while these load one after another; readiness
(/readyz, api/ops.py) waits for them, so an orchestrator sends a replica traffic only once its
models are in memory. A readiness that passed before any model was loaded sent the first
requests of a new replica into a load of seconds or minutes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ortserve.errors import OrtServeError

log = logging.getLogger("ortserve.engine")

WAITING, LOADING, LOADED, FAILED = "waiting", "loading", "loaded", "failed"


@dataclass(frozen=True)
class PreloadReport:
    """Where the preload stands: `status` is ready, loading or failed; `models` maps each
    name to waiting, loading, loaded or failed; `error` names the first model that failed."""

    status: str
    models: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class Preload:
    """Loads `names` with `load` (Runtime.preload) in a thread of its own, once, in order."""

    def __init__(self, load: Callable[[str], object], names: Sequence[str]):
        self.load = load
        self.names = tuple(dict.fromkeys(names))  # a name given twice loads once
        self._states = dict.fromkeys(self.names, WAITING)
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="preload", daemon=True)

    def start(self) -> Preload:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Load nothing more (the server is stopping); a load in progress runs to its end."""
        self._stopped.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def report(self) -> PreloadReport:
        with self._lock:
            models, errors = dict(self._states), dict(self._errors)
        if errors:
            name, message = next(iter(errors.items()))
            return PreloadReport(FAILED, models, f'model "{name}" failed to preload: {message}')
        if all(state == LOADED for state in models.values()):
            return PreloadReport("ready", models)
        return PreloadReport(LOADING, models)

    def _run(self) -> None:
        for name in self.names:
            if self._stopped.is_set():
                return
            self._load(name)

    def _load(self, name: str) -> None:
        self._set(name, LOADING)
        log.info("preloading %s", name)
        started = time.perf_counter()
        try:
            self.load(name)
        except OrtServeError as exc:  # its message is safe to show: /readyz needs no key
            self._fail(name, exc.message)
        except Exception:  # one model's failure must not keep the others from loading
            log.exception("preloading %s failed", name)
            self._fail(name, "the load failed (the server's log says why)")
        else:
            log.info("preloaded %s in %.2fs", name, time.perf_counter() - started)
            self._set(name, LOADED)

    def _fail(self, name: str, message: str) -> None:
        log.error("preloading %s failed: %s", name, message)
        with self._lock:
            self._states[name] = FAILED
            self._errors[name] = message

    def _set(self, name: str, state: str) -> None:
        with self._lock:
            self._states[name] = state
