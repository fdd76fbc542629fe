"""Execution providers: which ones can really run here, which one a model runs on, og setup.

og 0.18's `is_*_available()` probes lie (WebGPU, OpenVINO and QNN always say yes; CUDA says
yes without a GPU), so a provider counts as usable only when it can run: its package is
the installed flavour or its plugin registers, lists a device and runs a test graph on it,
and, in the end, the model loads on it. A plugin's device list alone proves nothing: WebGPU
with ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1 lists the CPU even where Dawn finds no adapter
(no Vulkan loader). `load_candidates` orders the providers to try; `load_on_best` tries them and
falls back with one warning that names the cause.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ortserve.engine.install import installed_flavour
from ortserve.errors import ModelLoadError, ProviderUnavailable
from ortserve.library.bundle import target_provider

log = logging.getLogger("ortserve.engine")

T = TypeVar("T")

# ortserve's provider names, best first for `auto` (accelerators; CPU is always last).
ACCELERATORS = ("cuda", "nvtensorrtrtx", "dml", "qnn", "vitisai", "openvino", "webgpu", "coreml")
# ortserve's names -> what og.Config.append_provider takes. Plugin EPs are appended by the
# name og maps to their registered library.
_OG_NAMES = {
    "cuda": "cuda",
    "dml": "dml",
    "webgpu": "WebGPU",
    "openvino": "OpenVINO",
    "qnn": "QNN",
    "coreml": "CoreML",
    "vitisai": "VitisAI",
    "nvtensorrtrtx": "NvTensorRtRtx",
}
# ortserve's names -> onnxruntime's execution provider names (embedding sessions).
ORT_NAMES = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "nvtensorrtrtx": "NvTensorRTRTXExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass(frozen=True)
class Plugin:
    """An execution provider shipped as a plugin library in its own PyPI package."""

    provider: str
    module: str  # the package's module: get_library_path() and get_ep_names()
    extra: str  # ortserve's extra that installs it

    @property
    def package(self) -> str:
        return self.module.replace("_", "-")


PLUGINS = {
    "webgpu": Plugin("webgpu", "onnxruntime_ep_webgpu", "webgpu"),
    "openvino": Plugin("openvino", "onnxruntime_ep_openvino", "openvino"),
}


@dataclass(frozen=True)
class Probe:
    """Whether one provider can run here, and why (not)."""

    provider: str
    usable: bool
    reason: str
    # Every device it lists is a CPU (WebGPU on a software Vulkan driver, OpenVINO on a CPU):
    # it runs, but `auto` prefers ortserve's own CPU path and uses it only when asked by name.
    cpu_only: bool = False


# ---- probing -----------------------------------------------------------------------------


def probe_all(runtime: str = "genai") -> list[Probe]:
    """Every provider this platform could have, usable or not, best first, CPU last.

    `runtime`: "genai" (generation, onnxruntime-genai) or "onnxruntime" (embedding sessions).
    """
    return [
        *(_probe(name, runtime) for name in platform_accelerators()),
        Probe("cpu", True, "always"),
    ]


def platform_accelerators() -> tuple[str, ...]:
    """The accelerators this operating system can have at all, best first."""
    return tuple(p for p in ACCELERATORS if sys.platform in _PLATFORMS.get(p, (sys.platform,)))


# Providers that exist on some operating systems only (the others: every platform).
_PLATFORMS = {
    "cuda": ("linux", "win32"),
    "nvtensorrtrtx": ("win32",),
    "dml": ("win32",),
    "qnn": ("win32",),
    "vitisai": ("win32",),
    "openvino": ("linux", "win32"),
    "coreml": ("darwin",),
}


def usable_providers(runtime: str = "genai") -> list[str]:
    """Providers that can run here, best first, CPU last."""
    return [p.provider for p in probe_all(runtime) if p.usable]


@functools.cache
def _probe(provider: str, runtime: str) -> Probe:
    try:
        if runtime == "genai" and provider in _windows_ml_providers():
            return Probe(provider, True, "registered from the Windows ML catalog")
        if provider in PLUGINS:
            return _probe_plugin(PLUGINS[provider], runtime)
        check = _probe_ort_builtin if runtime == "onnxruntime" else _probe_og_builtin
        return check(provider)
    except Exception as exc:  # a probe that raises means the provider cannot run
        return Probe(provider, False, f"probe failed: {exc}")


def _probe_og_builtin(provider: str) -> Probe:
    """CUDA, DirectML, QNN and CoreML are compiled into one onnxruntime-genai flavour."""
    flavour = installed_flavour()
    if provider == "cuda":
        if flavour != "onnxruntime-genai-cuda":
            return Probe(provider, False, f"needs onnxruntime-genai-cuda (installed: {flavour})")
        count = cuda_device_count()
        if not count:
            return Probe(provider, False, "no NVIDIA GPU or driver found (libcuda)")
        return Probe(provider, True, f"{count} CUDA device(s)")
    if provider == "dml":
        if sys.platform != "win32":
            return Probe(provider, False, "DirectML runs on Windows only")
        if flavour not in ("onnxruntime-genai-winml", "onnxruntime-genai-directml"):
            return Probe(provider, False, f"needs onnxruntime-genai-winml (installed: {flavour})")
        import onnxruntime_genai as og

        if not og.is_dml_available():
            return Probe(provider, False, "onnxruntime-genai reports no DirectML device")
        return Probe(provider, True, "DirectML (onnxruntime-genai-winml)")
    if provider == "coreml":
        if sys.platform != "darwin":
            return Probe(provider, False, "CoreML runs on macOS only")
        return _probe_ort_builtin(provider)
    return Probe(provider, False, "not built into the installed onnxruntime-genai")


def _probe_ort_builtin(provider: str) -> Probe:
    import onnxruntime

    name = ORT_NAMES[provider]
    if name not in onnxruntime.get_available_providers():
        return Probe(provider, False, f"onnxruntime {onnxruntime.__version__} lacks {name}")
    if provider == "cuda" and not cuda_device_count():
        return Probe(provider, False, "no NVIDIA GPU or driver found (libcuda)")
    return Probe(provider, True, f"{name} in onnxruntime")


def _probe_plugin(plugin: Plugin, runtime: str) -> Probe:
    """A plugin counts when it imports, registers and lists at least one device."""
    try:
        register_plugin(plugin)
    except ImportError:
        return Probe(
            plugin.provider, False, f"{plugin.package} is not installed (extra [{plugin.extra}])"
        )
    devices = [kind for kind, _ in _ort_devices(ORT_NAMES[plugin.provider])]
    if not devices:
        hint = _NO_DEVICE_HINTS.get(plugin.provider, "")
        return Probe(plugin.provider, False, f"{plugin.package} lists no device{hint}")
    kinds = sorted({kind for kind in devices})
    cpu_only = kinds == ["CPU"]
    what = "software adapter on the CPU" if cpu_only else ", ".join(kinds)
    failure = session_failure(plugin.provider)
    if failure is not None:
        fix = _LOAD_FIXES.get(plugin.provider)
        return Probe(
            plugin.provider, False,
            f"{plugin.package} lists a device ({what}) but cannot run on it: {failure}"
            + (f"; fix: {fix}" if fix else ""),
        )  # fmt: skip
    return Probe(plugin.provider, True, f"{plugin.package}: {what}", cpu_only=cpu_only)


_NO_DEVICE_HINTS = {
    "webgpu": (
        " (no GPU with Vulkan, Metal or D3D12; set ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1 "
        "to run on a software adapter)"
    ),
    "openvino": " (OpenVINO runs on Intel CPUs, GPUs and NPUs only)",
}
# What to do when a provider lists a device and still cannot run (or load a model) on it.
_LOAD_FIXES = {
    "webgpu": (
        "set ORTSERVE_PROVIDER=cpu, or install a Vulkan loader and driver "
        "(Debian: apt install libvulkan1 mesa-vulkan-drivers)"
    ),
}
# The test graph a plugin must run: onnxruntime's own example (Y = X * W), shipped in its wheel.
_TEST_GRAPH = "mul_1.onnx"
_TEST_SESSION_TIMEOUT = 60.0  # seconds; a first shader compile on a software driver takes ~1


@functools.cache
def session_failure(provider: str, timeout: float = _TEST_SESSION_TIMEOUT) -> str | None:
    """Why a plugin provider cannot run a graph on its first device (None: it ran it).

    In a child process: a driver that crashes or hangs while the adapter is requested must
    not take the server (or `doctor`) with it.
    """
    code = f"from ortserve.engine.providers import run_test_session as r; r({provider!r})"
    # the child imports this ortserve, wherever it was imported from (a source checkout too)
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": path})  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"a test graph did not run within {timeout:.0f} s"
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])["failure"]
    except (IndexError, ValueError, KeyError, TypeError):
        said = public_message(done.stderr).strip().splitlines()
        return f"the test process exited with {done.returncode}" + (
            f": {said[-1][:300]}" if said else ""
        )


def run_test_session(provider: str) -> None:
    """In the child of session_failure: run the test graph, print {"failure": ...}."""
    import numpy as np
    import onnxruntime
    from onnxruntime.datasets import get_example

    try:
        options, _ = session_providers(provider)
        graph = get_example(_TEST_GRAPH)
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        (got,) = onnxruntime.InferenceSession(graph, options).run(None, {"X": x})
        cpu = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
        failure = None if np.allclose(got, cpu.run(None, {"X": x})[0]) else "wrong results"
    except Exception as exc:
        failure = public_message(str(exc)).strip().splitlines()[0] or type(exc).__name__
    print(json.dumps({"failure": failure}))


# onnxruntime's error texts carry its build's source locations and C++ signatures:
# ".../onnxruntime_src/.../webgpu_context.cc:136 onnxruntime::...::Initialize(...)::<lambda()> "
_SOURCE_LOCATION = re.compile(
    r"\S*[/\\]\S+\.(?:cc|cpp|cxx|c|h|hpp):\d+\s+"  # path:line
    r"(?:[^()\s][^()]*\((?:[^()]|\([^()]*\))*\)(?:::<lambda\(\)>)?(?:\s+const)?\s*)?"  # signature
)
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_ENFORCE = re.compile(r"^.*? was false\.\s*", re.DOTALL)  # ORT_ENFORCE's condition


def public_message(text: str) -> str:
    """onnxruntime's message without its source paths, signatures and status codes."""
    text = text.split("Stacktrace:", 1)[0]
    text = _ORT_STATUS.sub("", _SOURCE_LOCATION.sub("", text))
    return _ENFORCE.sub("", text, count=1).strip()


def cuda_device_count() -> int:
    """NVIDIA devices the driver reports (0 without a driver), without importing torch."""
    import ctypes

    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            cuda = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


# ---- plugin registration (once per process, never unregistered) --------------------------

_registered: dict[str, str] = {}  # plugin provider -> library path, registered with og and ort
_register_lock = threading.Lock()


def register_plugin(plugin: Plugin) -> str:
    """Register a plugin's library with onnxruntime-genai and onnxruntime, once per process.

    Never unregistered: unregistering while a model uses it aborts the process at exit.
    og and onnxruntime keep separate registries (one registration does nothing for the
    other): og runs generation on it, onnxruntime lists its devices and runs embeddings.
    """
    import importlib

    with _register_lock:
        if plugin.provider in _registered:
            return _registered[plugin.provider]
        module = importlib.import_module(plugin.module)  # ImportError: not installed
        library = module.get_library_path()
        import onnxruntime
        import onnxruntime_genai as og

        og.register_execution_provider_library(plugin.provider, library)
        onnxruntime.register_execution_provider_library(plugin.provider, library)
        _registered[plugin.provider] = library
        return library


def _ort_devices(ep_name: str) -> list[tuple[str, object]]:
    """(device kind: GPU, NPU or CPU; the OrtEpDevice) for each device an EP lists."""
    import onnxruntime

    found = []
    for device in onnxruntime.get_ep_devices():
        if device.ep_name == ep_name:
            found.append((str(device.device.type).rsplit(".", 1)[-1], device))
    return found


@functools.cache
def _windows_ml_providers() -> dict[str, str]:
    """Providers from the Windows ML catalog, registered with og (Windows + winml only).

    Windows ML downloads and updates vendor EPs (OpenVINO, QNN, VitisAI, TensorRT-RTX...)
    for the machine's hardware; each one found ready is registered once with og.
    """
    if sys.platform != "win32" or installed_flavour() != "onnxruntime-genai-winml":
        return {}
    try:
        import winui3.microsoft.windows.ai.machinelearning as winml
        from winui3.microsoft.windows.applicationmodel.dynamicdependency import bootstrap
    except ImportError:
        return {}  # the [windowsml] extra is not installed
    import onnxruntime_genai as og

    found: dict[str, str] = {}
    with bootstrap.initialize(options=bootstrap.InitializeOptions.ON_NO_MATCH_SHOW_UI):
        for entry in winml.ExecutionProviderCatalog.get_default().find_all_providers():
            name = _short_name(entry.name)
            if name is None or name in found:
                continue
            entry.ensure_ready_async().get()
            if entry.library_path:
                og.register_execution_provider_library(entry.name, entry.library_path)
                found[name] = entry.name
    return found


def _short_name(ep_name: str) -> str | None:
    return next((short for short, full in ORT_NAMES.items() if full == ep_name), None)


# ---- choosing and loading ----------------------------------------------------------------


def bundle_target(bundle: Path) -> str:
    """The provider a bundle was converted for (genai_config provider_options), else cpu."""
    return target_provider(bundle)


def load_candidates(requested: str, target: str = "cpu", runtime: str = "genai") -> list[str]:
    """Providers to try, in order: a named one alone; `auto`: target, GPUs/NPUs, then CPU."""
    probes = {p.provider: p for p in probe_all(runtime)}
    if requested != "auto":
        probe = probes.get(requested)
        if probe is None or not probe.usable:
            why = probe.reason if probe is not None else "unknown provider"
            usable = ", ".join(p for p, v in probes.items() if v.usable)
            raise ProviderUnavailable(
                f"execution provider {requested!r} cannot run here ({why}); usable: {usable}"
            )
        return [requested]
    # a CPU target is every converter bundle's default: it says nothing against a GPU
    order = [*([target] if target != "cpu" else []), *platform_accelerators()]
    picked = [p for p in order if p in probes and probes[p].usable and not probes[p].cpu_only]
    return list(dict.fromkeys([*picked, "cpu"]))


def load_on_best(what: str, candidates: list[str], load: Callable[[str], T]) -> tuple[T, str]:
    """Load on the first candidate that works; each fallback is one warning naming the cause.

    When the last candidate is not the CPU (a provider named in ORTSERVE_PROVIDER), its
    failure is ProviderUnavailable naming the provider and the fix, never onnxruntime's text.
    """
    for index, provider in enumerate(candidates):
        try:
            return load(provider), provider
        except Exception as exc:
            if index == len(candidates) - 1:
                if provider == "cpu":
                    raise  # no provider to blame: the model's own failure
                raise ProviderUnavailable(
                    f'model "{what}" cannot load on execution provider {provider!r}: '
                    f"{_cause(exc)}; fix: {_LOAD_FIXES.get(provider, _DEFAULT_FIX)}"
                ) from exc
            log.warning(
                "%s: could not load on %s (%s); falling back to %s",
                what, provider, _cause(exc), candidates[index + 1],
            )  # fmt: skip
    raise ModelLoadError(f"{what}: no execution provider to load on")


_DEFAULT_FIX = "set ORTSERVE_PROVIDER=cpu or auto, or install what it needs (docs/engine.md)"
# The scheduler's and embedder's wrapping of the runtime's message (the model is named already).
_LOAD_PREFIX = re.compile(r'^failed to load model "[^"]*":\s*')


def _cause(exc: BaseException) -> str:
    text = public_message(_LOAD_PREFIX.sub("", str(exc).strip())).splitlines()
    return text[0] if text else type(exc).__name__


def configure(config, provider: str) -> None:
    """Point an og.Config at one provider (CPU: no provider entry at all)."""
    config.clear_providers()
    if provider == "cpu":
        return
    catalog = _windows_ml_providers()
    if provider in catalog:
        config.append_provider(catalog[provider])
        return
    if provider in PLUGINS:
        register_plugin(PLUGINS[provider])
    config.append_provider(_OG_NAMES[provider])


def session_providers(provider: str):
    """onnxruntime.SessionOptions and providers list for an embedding session on `provider`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: EPs log every node they leave to the CPU
    if provider == "cpu":
        return options, ["CPUExecutionProvider"]
    if provider in PLUGINS:
        register_plugin(PLUGINS[provider])
        devices = [device for _, device in _ort_devices(ORT_NAMES[provider])]
        options.add_provider_for_devices(devices[:1], {})
        return options, None
    return options, [ORT_NAMES[provider], "CPUExecutionProvider"]
