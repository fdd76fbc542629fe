"""A served library: tiny models converted once per session, and real `ortserve serve`s."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from converters import convert
from ortserve.library import Library
from tests.support.http import free_port  # also imported from here by test modules


@pytest.fixture(scope="session")
def served_library(tmp_path_factory, tiny_checkpoint, minilm_dir) -> Library:
    """tiny-chat (qwen2, int4), tiny-llama (fp32), all-minilm, and a model that cannot load."""
    library = Library(tmp_path_factory.mktemp("served") / "models")
    convert(
        tiny_checkpoint("qwen2"), "tiny-chat", precision="int4", library=library, progress=False
    )
    convert(tiny_checkpoint("llama"), "tiny-llama", precision="fp32", library=library,
            progress=False)  # fmt: skip
    convert(minilm_dir, "all-minilm", precision="fp32", library=library, progress=False)
    _add_broken_model(library)
    return library


def _add_broken_model(library: Library) -> None:
    """A bundle whose graph is garbage: its load must fail alone."""
    good = library.get("tiny-chat").path
    with library.staging("broken") as staged:
        bundle = staged / "bundle"
        shutil.copytree(good, bundle)
        (bundle / "model.onnx").write_bytes(b"this is not an onnx graph")
        (bundle / "ortserve-files.json").unlink()
        library.add("broken", bundle, {**library.get("tiny-chat").manifest, "bundle": None})


class Server:
    """`ortserve serve` in a subprocess on a free port; its output is read as it comes (a
    full pipe would block the server) and kept for output()."""

    def __init__(self, library: Library, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "ORTSERVE_MODELS": str(library.root),
            "ORTSERVE_HOST": f"127.0.0.1:{self.port}",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ortserve", "serve"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self.lines.extend, args=(self.process.stdout,),
                                        daemon=True)  # fmt: skip
        self._reader.start()
        self._wait_ready()

    def output(self) -> str:
        """What the server printed so far (all of it once stopped)."""
        if self.process.poll() is not None:
            self._reader.join(timeout=10)
        return "".join(self.lines)

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in time")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def tiny_vl(fixture_cache) -> Path:
    """The tiny random-weight Qwen2.5-VL checkpoint, rebuilt when converters/vision.py
    changes (tests/integration/test_vision_*.py)."""
    import hashlib

    from converters import vision
    from tests.support.bundles import cached_checkpoint

    code = hashlib.sha256(Path(vision.__file__).read_bytes()).hexdigest()[:12]
    target = fixture_cache / "checkpoints" / f"qwen2_5_vl-{code}"
    return cached_checkpoint(target, vision.build_tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_gemma3(fixture_cache) -> Path:
    """The tiny random-weight Gemma 3 (SigLIP + projector) checkpoint, rebuilt when
    converters/gemma3_vision.py changes (tests/integration/test_vision_gemma3.py)."""
    import hashlib

    from converters import gemma3_vision
    from tests.support.bundles import cached_checkpoint

    code = hashlib.sha256(Path(gemma3_vision.__file__).read_bytes()).hexdigest()[:12]
    target = fixture_cache / "checkpoints" / f"gemma3-{code}"
    return cached_checkpoint(target, gemma3_vision.build_tiny_checkpoint)


@pytest.fixture(scope="session")
def server(served_library):
    """One server for the session (default settings, keep-alive 5m)."""
    running = Server(served_library)
    yield running
    running.stop()


@pytest.fixture
def make_server(served_library):
    """Servers with particular settings, stopped at the end of the test."""
    started: list[Server] = []

    def start(**env: str) -> Server:
        started.append(Server(served_library, **env))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def models_dir(library: Library) -> Path:
    return library.root


@pytest.fixture
def own_library(tmp_path, served_library) -> Library:
    """A library of its own holding a copy of tiny-chat, free to be damaged or
    added to."""
    library = Library(tmp_path / "models")
    source = served_library.get("tiny-chat")
    with library.staging("copy") as staged:
        bundle = staged / "bundle"
        shutil.copytree(source.path, bundle)
        (bundle / "ortserve-files.json").unlink()
        library.add("tiny-chat", bundle, {**source.manifest, "bundle": None})
    return library
