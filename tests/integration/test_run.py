"""`ortserve run` as a new user runs it: in-process with no server, or through a running one."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.slow


def run_cli(args, library, host, stdin_text=None):
    env = {**os.environ, "ORTSERVE_MODELS": str(library.root), "ORTSERVE_HOST": host}
    return subprocess.run([sys.executable, "-m", "ortserve", "run", *args], input=stdin_text,
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


def test_run_answers_in_process_without_a_server(served_library):
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli(["tiny-chat", "Hello", "there", "--verbose"], served_library, nobody)
    assert result.returncode == 0, result.stderr
    answer, _, stats = result.stdout.partition("total duration:")
    assert answer.strip()
    assert "eval rate:" in stats and "tokens/s" in stats


def test_run_reads_a_piped_prompt(served_library):
    result = run_cli(["tiny-chat"], served_library, f"127.0.0.1:{free_port()}", "Hi from a pipe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_run_uses_the_running_server(server, served_library):
    result = run_cli(["tiny-llama", "Hello", "--keepalive", "10m"], served_library,
                     f"127.0.0.1:{server.port}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with urllib.request.urlopen(server.url + "/api/ps") as response:
        loaded = {m["name"] for m in json.loads(response.read())["models"]}
    assert "tiny-llama:latest" in loaded  # the server loaded it, so the CLI went through it


def test_run_unknown_model_is_one_line(served_library):
    result = run_cli(["nope", "hi"], served_library, f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.strip() == 'Error: model "nope:latest" not found, try pulling it first'


def test_interactive_session_on_a_terminal(served_library):
    env = {**os.environ, "ORTSERVE_MODELS": str(served_library.root),
           "ORTSERVE_HOST": f"127.0.0.1:{free_port()}"}  # fmt: skip
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "run", "tiny-chat"],
                               stdin=follower, stdout=follower, stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    screen = _read_until(leader, ">>> ")
    steps = [("/set parameter num_predict 4", ">>> "), ('"""first line', "... "),
             ('second line"""', ">>> "), ("/show parameters", ">>> "), ("/clear", ">>> "),
             ("/bye", None)]  # fmt: skip
    for line, prompt in steps:
        os.write(leader, (line + "\n").encode())
        screen += _read_until(leader, prompt)
    assert process.wait(timeout=30) == 0
    os.close(leader)
    assert "Set parameter 'num_predict' to '4'" in screen
    assert "num_predict         4" in screen
    assert "Cleared session context" in screen


def _read_until(fd, marker, timeout=60.0):
    """Read the terminal until `marker` shows up (or the program ends)."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096).decode(errors="replace")
        except OSError:
            return seen
        if not chunk:
            return seen
        seen += chunk
        if marker and seen.rstrip().endswith(marker.strip()):
            return seen
    raise AssertionError(f"timed out waiting for {marker!r}; saw: {seen[-500:]!r}")
