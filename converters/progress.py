"""Step progress: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("ortserve.convert")


class Progress:
    """Reports the named steps of one conversion."""

    def __init__(self, steps: list[str], label: str, *, stream=None, enabled: bool = True):
        self.steps = steps
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._bar = self._make_bar() if enabled and _is_tty(self.stream) else None

    def _make_bar(self):
        from tqdm import tqdm

        return tqdm(total=len(self.steps), desc=self.label, file=self.stream, unit="step")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step and report its start and end."""
        started = time.perf_counter()
        if self._bar is not None:
            self._bar.set_postfix_str(name)
        elif self.enabled:
            self._line(f"{name} ...")
        yield
        self.timings[name] = time.perf_counter() - started
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            self._line(f"{name} done in {self.timings[name]:.1f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)


def _is_tty(stream) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
