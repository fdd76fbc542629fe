"""The library as Ollama shows it: /api/tags, /api/show and /api/ps entries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ortserve.api.streaming import rfc3339
from ortserve.library import ModelInfo
from ortserve.options import parameter_text


def tag_entry(info: ModelInfo) -> dict[str, Any]:
    """One /api/tags model."""
    return {
        "name": info.name,
        "model": info.name,
        "modified_at": _timestamp(info.modified),
        "size": info.size,
        "digest": info.digest.removeprefix("sha256-"),
        "details": details(info),
        "capabilities": info.capabilities,
    }


def show_entry(info: ModelInfo) -> dict[str, Any]:
    """The /api/show body; empty fields are left out, as Ollama's omitempty does."""
    from ortserve.library.modelfile import render_modelfile

    manifest = info.manifest
    license_ = manifest.get("license") or ""
    body = {
        "license": "\n".join(license_) if isinstance(license_, list) else license_,
        "modelfile": render_modelfile(info),
        "parameters": parameter_text(manifest.get("parameters") or {}),
        "template": manifest.get("template") or "",
        "system": manifest.get("system") or "",
        "details": details(info),
        "messages": manifest.get("messages") or [],
        "model_info": model_info(info),
        "capabilities": info.capabilities,
        "modified_at": _timestamp(info.modified),
    }
    return {key: value for key, value in body.items() if value not in ("", [], None)}


def details(info: ModelInfo) -> dict[str, Any]:
    d = info.details
    family = d.get("family", "")
    out = {
        "parent_model": "",
        "format": d.get("format", ""),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": d.get("parameter_size", ""),
        "quantization_level": d.get("quantization_level") or d.get("quantization", ""),
    }
    out.update({k: d[k] for k in ("context_length", "embedding_length") if d.get(k)})
    return out


def model_info(info: ModelInfo) -> dict[str, Any]:
    """Ollama's GGUF-style keys: general.architecture, <arch>.context_length, ..."""
    rest = dict(info.details)
    arch = rest.pop("family", None) or "unknown"
    out: dict[str, Any] = {"general.architecture": arch}
    if "parameter_count" in rest:
        out["general.parameter_count"] = rest.pop("parameter_count")
    for key in ("context_length", "embedding_length"):
        if key in rest:
            out[f"{arch}.{key}"] = rest.pop(key)
    out.update({f"general.{key}": value for key, value in sorted(rest.items())})
    return out


def ps_entry(loaded) -> dict[str, Any]:
    """One /api/ps model, from the runtime's record of a loaded model."""
    info = loaded.info
    stamp = _expiry(loaded.active, loaded.expires_at)
    return {
        "name": info.name,
        "model": info.name,
        "size": info.size,
        "digest": info.digest.removeprefix("sha256-"),
        "details": details(info),
        "expires_at": stamp.isoformat().replace("+00:00", "Z"),
        "size_vram": info.size if loaded.provider != "cpu" else 0,
        "context_length": loaded.context_length,
        "provider": loaded.provider,
        "pending": loaded.pending(),  # turns queued or generating (not Ollama's)
    }


# What Ollama shows for a model kept forever: a far-future time.
_FOREVER = datetime(2318, 1, 1, tzinfo=UTC)


def _expiry(active: int, expires: float | None) -> datetime:
    """When a loaded model unloads: now while in use, far ahead when kept forever.

    An expiry past any date (a keep_alive longer than datetime reaches) reads as forever:
    one model's expiry must never fail the whole listing.
    """
    if active:
        return datetime.now(UTC)
    if expires is None:
        return _FOREVER
    try:
        return min(datetime.fromtimestamp(expires, tz=UTC), _FOREVER)
    except (OverflowError, OSError, ValueError):
        return _FOREVER


def _timestamp(when: datetime) -> str:
    seconds = int(when.timestamp())
    return rfc3339(seconds * 1_000_000_000 + when.microsecond * 1000)
