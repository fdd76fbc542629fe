"""Execution providers: what this machine has, which one a model runs on, og.Config setup."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ortserve.errors import ProviderUnavailable

log = logging.getLogger("ortserve.engine")

# ortserve's provider names -> the names og.Config.append_provider takes. ORT GenAI has no
# CoreML device of its own: unknown names go to onnxruntime's generic provider registry.
_OG_NAMES = {"cuda": "cuda", "dml": "dml", "webgpu": "WebGPU", "coreml": "CoreML"}
_PREFERENCE = ("cuda", "dml", "webgpu", "coreml")
_warned: set[str] = set()


def available_providers() -> list[str]:
    """Providers usable here, CPU always last."""
    import onnxruntime_genai as og

    checks = {
        "cuda": getattr(og, "is_cuda_available", None),
        "dml": getattr(og, "is_dml_available", None),
        "webgpu": getattr(og, "is_webgpu_available", None),
    }
    found = [name for name, check in checks.items() if check is not None and _safe(check)]
    if sys.platform == "darwin" and _onnxruntime_has("CoreMLExecutionProvider"):
        found.append("coreml")
    return [*found, "cpu"]


def bundle_target(bundle: Path) -> str:
    """The provider a bundle was converted for (genai_config provider_options), else cpu."""
    config = json.loads((bundle / "genai_config.json").read_text(encoding="utf-8"))
    options = config["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    for entry in options:
        for name in entry:
            return {"webgpu": "webgpu", "WebGPU": "webgpu"}.get(name, name.lower())
    return "cpu"


def choose_provider(requested: str, target: str, available: list[str] | None = None) -> str:
    """`auto`: the bundle's target if present, else the best GPU, else CPU (warned once)."""
    available = available if available is not None else available_providers()
    if requested != "auto":
        if requested not in available:
            raise ProviderUnavailable(
                f"execution provider {requested!r} is not available on this machine; "
                f"available: {', '.join(available)}"
            )
        return requested
    if target in available:
        return target
    if target != "cpu" and target not in _warned:
        _warned.add(target)
        log.warning("provider %s is not available; running on cpu", target)
    return "cpu"


def configure(config, provider: str) -> None:
    """Point an og.Config at one provider (CPU: no provider entry at all)."""
    config.clear_providers()
    if provider != "cpu":
        config.append_provider(_OG_NAMES[provider])


def _safe(check) -> bool:
    try:
        return bool(check())
    except Exception:  # a probe that fails means the provider is not usable
        return False


def _onnxruntime_has(name: str) -> bool:
    try:
        import onnxruntime

        return name in onnxruntime.get_available_providers()
    except ImportError:
        return False
