"""Run a heavy step in a fresh process, so its memory goes back to the system when it ends.

torch's and onnx's allocations are not returned to the OS by a long-lived process: a server
that converts one model would keep gigabytes of freed heap. Each heavy step (export,
quantize) runs in its own spawned process instead; the peak is then that step's own, not the
sum of every step's leftovers. The child exits if its parent dies, so a killed conversion
leaves no process writing into the staging directory.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from ortserve.errors import ConversionError

T = TypeVar("T")


def run_isolated(step: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """func(*args, **kwargs) in a new process; its exceptions are raised here."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_watch_parent,
                             initargs=(os.getpid(),)) as pool:  # fmt: skip
        try:
            return pool.submit(func, *args, **kwargs).result()
        except BrokenProcessPool as exc:
            raise ConversionError(
                f"the {step} process died (out of memory?); try a machine with more memory"
            ) from exc


def _watch_parent(parent: int) -> None:
    """In the child: exit as soon as the parent is gone (it was killed)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
