"""Which onnxruntime-genai flavour is installed: they share one module name, so only one may be.

Read from the installed distributions' metadata, without importing onnxruntime_genai:
with two flavours installed, whichever was unpacked last has overwritten the other's files,
and what imports is a mix of both.
"""

from __future__ import annotations

import sys
from importlib import metadata

from ortserve.errors import OrtServeError

# Each ships the module `onnxruntime_genai`.
FLAVOURS = (
    "onnxruntime-genai",
    "onnxruntime-genai-cuda",
    "onnxruntime-genai-winml",
    "onnxruntime-genai-directml",
)


class InstallConflict(OrtServeError):
    """An installation that cannot work as it is: start-up stops and names the fix."""

    status = 500
    type = "install_error"


def installed_flavours() -> dict[str, str]:
    """Installed onnxruntime-genai flavours -> their versions."""
    found = {}
    for name in FLAVOURS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def installed_flavour() -> str:
    """The one installed flavour ("none" if there is none; the first found if several)."""
    return next(iter(installed_flavours()), "none")


def wanted_flavour(extras: set[str] | None = None) -> str:
    """The flavour this platform should have: winml on Windows, cuda with that extra."""
    if "cuda" in (extras or set()):
        return "onnxruntime-genai-cuda"
    return "onnxruntime-genai-winml" if sys.platform == "win32" else "onnxruntime-genai"


def check_flavours() -> None:
    """Stop with the pip commands that fix it when not exactly one flavour is installed."""
    found = installed_flavours()
    if len(found) == 1:
        if "onnxruntime-genai-directml" in found:
            raise InstallConflict(
                "onnxruntime-genai-directml stops at 0.14 and lacks the Engine API ortserve "
                "uses; DirectML comes with onnxruntime-genai-winml: "
                + _fix(found, "onnxruntime-genai-winml")
            )
        return
    if not found:
        raise InstallConflict(
            f'onnxruntime-genai is not installed: pip install "{wanted_flavour()}==0.18.*"'
        )
    keep = "onnxruntime-genai-cuda" if "onnxruntime-genai-cuda" in found else wanted_flavour()
    raise InstallConflict(
        f"{len(found)} onnxruntime-genai flavours are installed ({', '.join(sorted(found))}); "
        f"they share one module and overwrite each other's files. Keep one: {_fix(found, keep)}"
    )


def _fix(found: dict[str, str], keep: str) -> str:
    return f'pip uninstall -y {" ".join(sorted(found))} && pip install "{keep}==0.18.*"'
