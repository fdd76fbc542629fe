"""Which provider a model runs on: probes that tell the truth, fallback on a real load
failure, clear errors for a provider that cannot run, and `ortserve doctor`."""

from __future__ import annotations

import http.server
import logging
import os
import subprocess
import sys
import threading
from importlib import metadata

import pytest

from ortserve.config import Settings, SettingsError
from ortserve.engine import install, providers
from ortserve.engine.runtime import Runtime
from ortserve.errors import ProviderUnavailable
from tests.integration.conftest import free_port


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
    assert (
        "ORTSERVE_PROVIDER='tpu' is invalid: must be one of auto, cpu, cuda" in info.value.message
    )


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
