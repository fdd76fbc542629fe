"""Which provider a model runs on: probes that tell the truth, fallback on a real load
failure, clear errors for a provider that cannot run, and `ortserve doctor`."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from importlib import metadata

import pytest

from ortserve.config import Settings, SettingsError
from ortserve.engine import install, providers
from ortserve.engine.runtime import Runtime
from ortserve.errors import ProviderUnavailable
from tests.support.http import free_port


def _probe(name: str) -> providers.Probe:
    return next(p for p in providers.probe_all() if p.provider == name)


def test_probes_on_this_machine_say_why_each_provider_cannot_run():
    # og's own is_cuda_available/is_webgpu_available would say yes to some of these
    assert _probe("cpu").usable
    cuda = _probe("cuda")
    assert not cuda.usable and "onnxruntime-genai-cuda" in cuda.reason
    if not os.environ.get("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER"):
        webgpu = _probe("webgpu")
        assert not webgpu.usable and "lists no device" in webgpu.reason
    assert providers.load_candidates("auto", "cuda") == ["cpu"]


def test_a_named_provider_that_cannot_run_is_a_clear_error():
    with pytest.raises(ProviderUnavailable) as info:
        providers.load_candidates("cuda")
    message = info.value.message
    assert message.startswith("execution provider 'cuda' cannot run here (needs onnxruntime")
    assert message.endswith("usable: cpu")


def test_an_unknown_provider_name_stops_start_up_naming_the_variable():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ORTSERVE_PROVIDER": "tpu"})
    assert info.value.message.startswith("ORTSERVE_PROVIDER must be one of auto, cpu, cuda")


def test_a_provider_that_fails_to_load_falls_back_to_cpu_with_one_warning(
    served_library, monkeypatch, caplog
):
    """WebGPU claimed usable without a software adapter: og.Model really fails on it."""
    monkeypatch.delenv("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", raising=False)
    claimed = providers.Probe("webgpu", True, "claimed for the test")
    real = providers._probe
    monkeypatch.setattr(
        providers, "_probe", lambda name, rt: claimed if name == "webgpu" else real(name, rt)
    )
    runtime = Runtime(Settings(models=served_library.root, keep_alive=0), served_library)
    try:
        with caplog.at_level(logging.WARNING, logger="ortserve.engine"):
            loaded = runtime.acquire("tiny-llama")
        assert loaded.provider == "cpu"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].startswith("tiny-llama:latest: could not load on webgpu (")
        assert warnings[0].endswith("); falling back to cpu")
        assert "webgpu" in warnings[0].lower()
        runtime.release(loaded)
    finally:
        runtime.shutdown()


# ---- WebGPU's software adapter without a Vulkan driver ------------------------------------------

# The software-adapter switch makes the WebGPU plugin list the CPU as a device whatever Dawn
# finds; VK_ICD_FILENAMES / VK_DRIVER_FILES naming no file leave the Vulkan loader (where one is
# installed, as on CI) without any driver: what a machine without a Vulkan loader gives.
NO_VULKAN = {
    "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1",
    "VK_ICD_FILENAMES": "/nonexistent/icd.json",
    "VK_DRIVER_FILES": "/nonexistent/icd.json",
}
ORT_INTERNALS = ("onnxruntime_src", "[ONNXRuntimeError]", ".cc:", "onnxruntime::")


def _probe_in(env: dict[str, str]) -> dict:
    code = (
        "import json; from ortserve.engine.providers import probe_all; "
        "p = next(p for p in probe_all() if p.provider == 'webgpu'); "
        "print(json.dumps({'usable': p.usable, 'reason': p.reason}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_software_adapter_without_a_vulkan_driver_is_not_usable():
    probe = _probe_in(NO_VULKAN)
    assert not probe["usable"], probe  # it listed a device; a real session found no adapter
    assert probe["reason"].startswith(
        "onnxruntime-ep-webgpu lists a device (software adapter on the CPU) but cannot run on "
        "it: Failed to get a WebGPU adapter"
    )
    assert probe["reason"].endswith("(Debian: apt install libvulkan1 mesa-vulkan-drivers)")
    assert not any(internal in probe["reason"] for internal in ORT_INTERNALS), probe


def test_doctor_says_webgpu_without_a_vulkan_driver_cannot_run(served_library):
    result = _doctor(served_library, **NO_VULKAN, ORTSERVE_PROVIDER="webgpu",
                     ORTSERVE_HOST=f"127.0.0.1:{free_port()}")  # fmt: skip
    lines = _lines(result)
    assert lines["webgpu"].startswith("no: onnxruntime-ep-webgpu lists a device"), lines
    assert lines["generation on"].startswith("execution provider 'webgpu' cannot run here")
    assert result.returncode == 1 and "fix: unset ORTSERVE_PROVIDER" in result.stdout


def test_onnxruntime_internals_are_cut_from_a_message():
    raw = (
        "/onnxruntime_src/onnxruntime/core/session/plugin_ep/ep_plugin_provider_interfaces.cc:393 "
        "virtual std::unique_ptr<onnxruntime::IExecutionProvider> onnxruntime::PluginExecution"
        "ProviderFactory::CreateProvider(const OrtSessionOptions&, const OrtLogger&) "
        "[ONNXRuntimeError] : 11 : EP_FAIL : /onnxruntime_src/onnxruntime/core/providers/webgpu/"
        "webgpu_context.cc:136 onnxruntime::webgpu::WebGpuContext::Initialize(const onnxruntime::"
        "webgpu::WebGpuContextConfig&)::<lambda()> adapter_result.status == wgpu::RequestAdapter"
        "Status::Success was false. Failed to get a WebGPU adapter: No supported adapters"
    )
    assert providers.public_message(raw) == "Failed to get a WebGPU adapter: No supported adapters"
    assert providers.public_message("a plain message (with parentheses)") == (
        "a plain message (with parentheses)"
    )


@pytest.fixture
def webgpu_claimed(monkeypatch):
    """WebGPU claimed usable without its software adapter: og and onnxruntime really fail."""
    monkeypatch.delenv("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", raising=False)
    claimed = providers.Probe("webgpu", True, "claimed for the test")
    real = providers._probe
    monkeypatch.setattr(
        providers, "_probe", lambda name, rt: claimed if name == "webgpu" else real(name, rt)
    )


def test_a_named_provider_that_fails_to_load_is_a_503_naming_it_and_the_fix(
    served_library, webgpu_claimed
):
    settings = Settings(models=served_library.root, keep_alive=0, provider="webgpu")
    runtime = Runtime(settings, served_library)
    try:
        for acquire, name in ((runtime.acquire, "tiny-llama"),
                              (runtime.acquire, "all-minilm")):  # fmt: skip
            with pytest.raises(ProviderUnavailable) as info:
                acquire(name)
            message = info.value.message
            assert info.value.status == 503
            assert message.startswith(
                f"model \"{name}:latest\" cannot load on execution provider 'webgpu': "
            ), message
            assert message.endswith("; fix: set ORTSERVE_PROVIDER=cpu, or install a Vulkan "
                                    "loader and driver (Debian: apt install libvulkan1 "
                                    "mesa-vulkan-drivers)")  # fmt: skip
            assert not any(internal in message for internal in ORT_INTERNALS), message
    finally:
        runtime.shutdown()


def test_webgpu_named_without_a_vulkan_driver_is_a_503_over_http(make_server):
    running = make_server(**NO_VULKAN, ORTSERVE_PROVIDER="webgpu")
    for path, body in (("/api/generate", {"model": "tiny-chat", "prompt": "hi", "stream": False}),
                       ("/v1/embeddings", {"model": "all-minilm", "input": "hi"})):  # fmt: skip
        request = urllib.request.Request(running.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=120)
        assert info.value.code == 503, path
        error = json.loads(info.value.read())["error"]
        message = error if isinstance(error, str) else error["message"]
        assert message.startswith("execution provider 'webgpu' cannot run here"), message
        assert "libvulkan1" in message
        assert not any(internal in message for internal in ORT_INTERNALS), message


def test_two_flavours_are_refused_with_the_pip_commands(monkeypatch):
    versions = {"onnxruntime-genai": "0.18.0", "onnxruntime-genai-cuda": "0.18.0"}

    def version(name):
        if name in versions:
            return versions[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(install.metadata, "version", version)
    with pytest.raises(install.InstallConflict) as info:
        install.check_flavours()
    assert info.value.message.endswith(
        "Keep one: pip uninstall -y onnxruntime-genai onnxruntime-genai-cuda && "
        'pip install "onnxruntime-genai-cuda==0.18.*"'
    )
    versions.clear()
    versions["onnxruntime-genai-directml"] = "0.14.1"
    with pytest.raises(install.InstallConflict, match="comes with onnxruntime-genai-winml"):
        install.check_flavours()


# ---- ortserve doctor ----------------------------------------------------------------------------


def _doctor(library, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "ORTSERVE_MODELS": str(library.root), **env}
    return subprocess.run([sys.executable, "-m", "ortserve", "doctor"], env=environment,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _lines(result) -> dict[str, str]:
    lines = {}
    for line in result.stdout.splitlines():
        name, _, found = line.partition("  ")
        if name.strip() and not line.startswith(" "):
            lines[name.strip()] = found.strip()
    return lines


def test_doctor_reports_a_healthy_install(served_library):
    port = free_port()
    result = _doctor(served_library, ORTSERVE_HOST=f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result)
    assert (
        lines["onnxruntime-genai"] == f"onnxruntime-genai {metadata.version('onnxruntime-genai')}"
    )
    assert lines["cpu"] == "usable: always"
    assert lines["cuda"].startswith("generation no: needs onnxruntime-genai-cuda")
    assert lines["generation on"] == "cpu (ORTSERVE_PROVIDER=auto)"
    assert "model(s)" in lines["library"] and str(served_library.root) in lines["library"]
    assert lines["port"] == f"127.0.0.1:{port} is free"


def test_doctor_names_the_fix_for_a_provider_that_cannot_run(served_library):
    result = _doctor(served_library, ORTSERVE_PROVIDER="cuda", ORTSERVE_HOST=f":{free_port()}")
    assert result.returncode == 1
    assert "fix: unset ORTSERVE_PROVIDER" in result.stdout
    assert result.stderr.strip() == "Error: 2 problem(s) found: generation on, embeddings on"


def test_doctor_tells_ortserve_from_another_server_on_the_port(served_library, server):
    on_ortserve = _doctor(served_library, ORTSERVE_HOST=f"127.0.0.1:{server.port}")
    assert _lines(on_ortserve)["port"].startswith(f"127.0.0.1:{server.port} is served by ortserve ")
    assert on_ortserve.returncode == 0

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        taken = _doctor(served_library, ORTSERVE_HOST=f"127.0.0.1:{other.server_port}")
    finally:
        other.shutdown()
    assert taken.returncode == 1
    assert "is taken by another server (SimpleHTTP" in _lines(taken)["port"]
    assert "fix: stop it, or serve elsewhere: ORTSERVE_HOST=" in taken.stdout
