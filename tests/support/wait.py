"""Waiting with a deadline: for a condition, or for a server to answer over HTTP."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_for(condition, timeout: float = 30, interval: float = 0.05) -> None:
    """Return once condition() is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout: float = 30,
                  interval: float = 0.05) -> bytes:  # fmt: skip
    """The body of the first answer from `url`; fails if `process` exits first or time runs
    out. `process` must have been started with stdout=PIPE (its output goes in the message)
    or with stdout going elsewhere (None is read then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout is not None else None
            raise AssertionError(f"server exited early: {output}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.read()
        except OSError:
            time.sleep(interval)
    raise AssertionError(f"{url} did not answer within {timeout}s")
