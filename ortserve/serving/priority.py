"""Which turns are background work: a batch job's lines run below interactive requests.

The batch runner marks the thread that executes a line (a context variable, so no protocol
module needs to know about batches); serving/core reads the mark when it resolves a turn's
options, and the scheduler admits background turns only when no interactive turn waits.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_background: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ortserve_background", default=False
)


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Run the block's turns at batch priority."""
    token = _background.set(True)
    try:
        yield
    finally:
        _background.reset(token)


def is_background() -> bool:
    return _background.get()
