"""serve(): waitress and gunicorn, each in a subprocess, over real HTTP and sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from ortserve import __version__
from ortserve.config import Settings
from ortserve.serve import gunicorn_options, serve
from tests.support.fakes import add_model
from tests.support.http import free_port
from tests.support.wait import wait_until_up

ROOT = Path(__file__).resolve().parents[2]


def post(url: str, body: dict):
    data = json.dumps(body).encode()
    return urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=10)


# ---- waitress --------------------------------------------------------------------------------------


def test_waitress_serves_and_streams_over_http(serve_in_subprocess, library):
    """waitress in its own process, as on Windows: it answers, sends each chunk as it comes, and
    on SIGTERM stops and cancels the turn still running. (In a thread of the test process its
    trigger pipe shared the process's descriptors with every other test's leftovers.)"""
    add_model(library, "tiny")
    process, url = serve_in_subprocess(grace=0, server="waitress", fake_runtime=True)
    assert wait_until_up(url + "/", process) == b"ortserve is running"
    with post(url + "/api/generate", {"model": "tiny", "prompt": "x"}) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        # the turn never ends by itself: its first line arrives, so chunks are not buffered
        assert json.loads(response.readline())["response"] == "t0"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    output = process.stdout.read()
    assert f"ortserve listening on {url} (models: {library.root})" in output
    assert "Traceback" not in output


def test_unknown_server_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown server"):
        serve(Settings(models=tmp_path), server="flask-dev")


# ---- gunicorn ---------------------------------------------------------------------------------------


def test_gunicorn_options():
    options = gunicorn_options(Settings(models=Path("m"), host="::1", port=8080, threads=7,
                                        grace_period=12.5))  # fmt: skip
    assert options["bind"] == ["[::1]:8080"]
    assert (options["workers"], options["threads"], options["timeout"]) == (1, 7, 0)
    assert options["worker_class"].__mro__[1].__name__ == "ThreadWorker"  # gthread
    assert options["graceful_timeout"] >= 12.5  # the worker must outlive the grace period
    assert options["keepalive"] == 5


def _start_server(home: Path, port: int, *, grace: float, server: str = "gunicorn",
                  fake_runtime: bool = False):  # fmt: skip
    """serve() in `python -c`, its library at home/models (the `library` fixture's root)."""
    models = home / "models"
    runtime = ", runtime=fake_runtime.SlowRuntime(Library(models))" if fake_runtime else ""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from ortserve.config import Settings
        from ortserve.library import Library
        from ortserve.serve import serve
        import fake_runtime
        models = Path({str(models)!r})
        settings = Settings(models=models, port={port}, threads=4, grace_period={grace})
        serve(settings, server={server!r}{runtime})
    """)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": f"{home}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def serve_in_subprocess(tmp_path):
    """Start serve() in a subprocess (gunicorn by default); kill whatever is left at the end."""
    (tmp_path / "fake_runtime.py").write_text(SLOW_RUNTIME)
    started = []

    def start(**kwargs):
        port = free_port()
        process = _start_server(tmp_path, port, **kwargs)
        started.append(process)
        return process, f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("server", ["gunicorn", "waitress"])
def test_serves_and_exits_0_on_sigterm(serve_in_subprocess, server):
    process, url = serve_in_subprocess(grace=1, server=server)
    body = wait_until_up(url + "/api/version", process)
    assert json.loads(body) == {"version": __version__}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    output = process.stdout.read()
    assert f"ortserve listening on {url}" in output
    assert "Traceback" not in output


def test_sigterm_gives_a_running_stream_the_grace_period(serve_in_subprocess, library):
    add_model(library, "tiny")
    process, url = serve_in_subprocess(grace=8, fake_runtime=True)
    wait_until_up(url + "/", process)
    with post(url + "/api/generate", {"model": "tiny", "prompt": "x", "options": {
            "num_predict": 10}}) as response:  # fmt: skip
        first = json.loads(response.readline())
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in response]
    assert first["response"] == "t0"
    assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 10  # finished, not cut
    assert process.wait(timeout=10) == 0


def test_sigterm_cancels_what_outlives_the_grace_period(serve_in_subprocess, library):
    add_model(library, "tiny")
    process, url = serve_in_subprocess(grace=1, fake_runtime=True)
    wait_until_up(url + "/", process)
    started = time.monotonic()
    with post(url + "/api/generate", {"model": "tiny", "prompt": "x"}) as response:
        response.readline()
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in response]
    assert "cancelled" in rest[-1]["error"]  # the stream ends with a line, not a cut
    assert process.wait(timeout=10) == 0
    assert time.monotonic() - started < 6  # cancelled after the grace, not killed later


def test_sigterm_while_the_worker_boots_stops_it_without_waiting_the_grace(tmp_path):
    """A deploy that stops a server just started: the arbiter's SIGTERM reaches the worker
    between fork and its own handlers (here: held there by a post_fork hook)."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from ortserve.config import Settings
        from ortserve.serve import gunicorn_application

        def stop_the_arbiter_as_the_worker_forks(arbiter, worker):
            os.kill(worker.ppid, signal.SIGTERM)
            time.sleep(1)  # the arbiter's SIGTERM to this worker comes now

        settings = Settings(models=Path({str(tmp_path / "models")!r}), port={free_port()},
                            threads=2, grace_period=30)
        application = gunicorn_application(settings)
        application.cfg.set("post_fork", stop_the_arbiter_as_the_worker_forks)
        application.run()
    """)
    (tmp_path / "models").mkdir()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert process.wait(timeout=20) == 0  # not the graceful timeout (35 s)
    finally:
        process.kill()
    assert "Traceback" not in process.stdout.read()


# A runtime for the gunicorn subprocess: slow endless turns, and Runtime's shutdown contract
# (wait up to `grace` for requests in flight, then cancel them).
SLOW_RUNTIME = """
import threading
import time

from ortserve.engine.types import Finished, TextChunk, Usage
from ortserve.library import ModelInfo
from ortserve.options import Sampling


class SlowTurn:
    def __init__(self, limit):
        self.limit = limit
        self.cancelled = threading.Event()

    def __iter__(self):
        count = 0
        while count != self.limit:
            if self.cancelled.wait(0.2):
                yield Finished("cancelled", Usage(0, count))
                return
            yield TextChunk(f"t{count}")
            count += 1
        yield Finished("length", Usage(1, count))

    def cancel(self):
        self.cancelled.set()


class Loaded:
    template = None
    load_duration_ns = 0
    context_length = 4096
    parameters = Sampling()

    def __init__(self, runtime, info):
        self.runtime, self.info, self.name = runtime, info, info.name
        self.capabilities = info.capabilities

    def exceeds_context(self, text):
        return len(text) > self.context_length * 8

    def min_tokens(self, text):
        return len(text) // 8 + 1

    def encode(self, text):
        return [1] * len(text)

    def generate(self, tokens, options):
        turn = SlowTurn(options.num_predict)
        self.runtime.turns.append(turn)
        return turn


class SlowRuntime:
    def __init__(self, library):
        self.library = library
        self.turns = []
        self.active = 0
        self.lock = threading.Condition()

    def acquire(self, name, keep_alive=None):
        with self.lock:
            self.active += 1
        return Loaded(self, name if isinstance(name, ModelInfo) else self.library.get(name))

    def release(self, loaded, keep_alive=None, failed=False):
        with self.lock:
            self.active -= 1
            self.lock.notify_all()

    def ps(self):
        return []

    def unload(self, name):
        return False

    def shutdown(self, grace=0.0):
        with self.lock:
            self.lock.wait_for(lambda: self.active == 0, timeout=grace)
        for turn in self.turns:
            turn.cancel()
"""
