"""WebGPU through the real server, on this machine's Vulkan device.

Without a GPU, Mesa's lavapipe (a CPU Vulkan driver, Mesa >= 25: .ci/run installs it) runs
the WebGPU plugin when ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1 is set before it registers.
The first run compiles shaders; MESA_SHADER_CACHE_DIR keeps them in the test cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
SHADER_CACHE = Path(os.environ.get("ORTSERVE_TEST_CACHE", ROOT / ".cache" / "tests")) / "mesa"

SOFTWARE = {"ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1"}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]


def _webgpu_probe(env: dict[str, str]) -> dict:
    code = (
        "import json; from ortserve.engine.providers import probe_all; "
        "p = next(p for p in probe_all() if p.provider == 'webgpu'); "
        "print(json.dumps({'usable': p.usable, 'reason': p.reason, 'cpu_only': p.cpu_only}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def webgpu_env():
    """The environment a WebGPU server runs in; skips only when no Vulkan device exists."""
    SHADER_CACHE.mkdir(parents=True, exist_ok=True)
    env = {**SOFTWARE, "MESA_SHADER_CACHE_DIR": str(SHADER_CACHE), "ORTSERVE_PROVIDER": "webgpu",
           # one engine per model: the software device is slow, and fewer engines share it
           "ORTSERVE_ENGINE_LANES": "1"}  # fmt: skip
    probe = _webgpu_probe(env)
    if not probe["usable"]:
        # the plugin itself must be there: it lists no device, or no adapter runs a graph
        assert "lists no device" in probe["reason"] or "cannot run on it" in probe["reason"], probe
        pytest.skip(f"no Vulkan device for WebGPU: {probe['reason']}")
    return env


@pytest.fixture(scope="module")
def webgpu_server(served_library, webgpu_env):
    running = Server(served_library, **webgpu_env)
    yield running
    died = running.process.poll() is not None
    running.stop()
    if died:  # say why in the test output: the server's own last lines
        print("WebGPU server exited early:\n" + running.output()[-4000:])


def _generate(server, model: str, prompt: str) -> dict:
    body = {"model": model, "prompt": prompt, "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 24}}  # fmt: skip
    request = urllib.request.Request(server.url + "/api/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _post(server, path: str, body: dict) -> dict:
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def test_greedy_tokens_on_webgpu_equal_the_cpu_run(server, webgpu_server):
    for prompt in PROMPTS:
        on_cpu = _generate(server, "tiny-llama", prompt)
        on_webgpu = _generate(webgpu_server, "tiny-llama", prompt)
        assert on_webgpu["eval_count"] == on_cpu["eval_count"] == 24
        assert on_webgpu["response"] == on_cpu["response"], prompt
    ps = _post(webgpu_server, "/api/show", {"model": "tiny-llama"})
    assert (ps["provider"], ps["loaded"]) == ("webgpu", True)


def test_ps_says_the_model_runs_on_webgpu(webgpu_server):
    _generate(webgpu_server, "tiny-chat", "hello")  # int4 runs too
    with urllib.request.urlopen(webgpu_server.url + "/api/ps") as response:
        models = {m["name"]: m for m in json.loads(response.read())["models"]}
    assert models["tiny-chat:latest"]["provider"] == "webgpu"


def test_embeddings_on_webgpu_equal_the_cpu_ones(server, webgpu_server):
    texts = ["The sky is blue", "Ein Hund läuft im Park", "WebGPU on lavapipe"]
    on_cpu = np.array(
        _post(server, "/api/embed", {"model": "all-minilm", "input": texts})["embeddings"]
    )
    on_webgpu = np.array(
        _post(webgpu_server, "/api/embed", {"model": "all-minilm", "input": texts})["embeddings"]
    )
    cosine = (
        (on_cpu * on_webgpu).sum(1)
        / np.linalg.norm(on_cpu, axis=1)
        / np.linalg.norm(on_webgpu, axis=1)
    )
    assert cosine.min() > 0.9999
    ps = _post(webgpu_server, "/api/show", {"model": "all-minilm"})
    assert ps["provider"] == "webgpu"


def test_a_software_adapter_is_used_only_when_asked_for_by_name(webgpu_env):
    probe = _webgpu_probe(webgpu_env)
    assert probe == {**probe, "usable": True, "cpu_only": True}
    code = (
        "from ortserve.engine.providers import load_candidates as c; print(c('auto'), c('webgpu'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **SOFTWARE},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "['cpu'] ['webgpu']"
