"""`ortserve serve --ray`: the CLI starts Ray on this machine, serves the app through Ray
Serve where ORTSERVE_HOST says, and stops on SIGTERM (its own module: it runs its own Ray,
after test_cluster.py's cluster is gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.support.http import free_port

pytestmark = pytest.mark.slow
pytest.importorskip("ray.serve")


def test_serve_ray_serves_the_library_and_stops_on_sigterm(served_library):
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "ORTSERVE_HOST": f"127.0.0.1:{port}", "ORTSERVE_MODELS": str(served_library.root)}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "serve", "--ray"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lines.extend, args=(process.stdout,), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any("listening on" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        assert f"http://127.0.0.1:{port} through Ray Serve" in "".join(lines)
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny-chat", "prompt": "hi", "stream": False,
                "options": {"num_predict": 2}}  # fmt: skip
        answer = httpx.post(url + "/api/generate", json=body, timeout=120)
        assert answer.status_code == 200 and answer.json()["done"]
        assert answer.headers["x-ortserve-replica"]
        tags = httpx.get(url + "/api/tags", timeout=30).json()
        assert "tiny-chat:latest" in {m["name"] for m in tags["models"]}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, "".join(lines)
