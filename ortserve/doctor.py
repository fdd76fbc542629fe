"""`ortserve doctor`: what this installation has, what can run, and what to fix.

Each check gives one line: a name, what was found, and, when something is broken, the fix.
The exit code is non-zero when any check is broken.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata

from ortserve import __version__, humanize
from ortserve.config import Settings, SettingsError
from ortserve.ports import who_listens

# Distributions that ship the module `onnxruntime`: only one may be installed.
_ORT_FLAVOURS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-windowsml")


@dataclass(frozen=True)
class Check:
    name: str
    found: str
    fix: str = ""  # set when broken

    @property
    def broken(self) -> bool:
        return bool(self.fix)


def run_checks(env: dict[str, str] | None = None) -> list[Check]:
    """Every check, in the order `doctor` prints them."""
    env = dict(os.environ if env is None else env)
    checks = [_platform(), _python(), *_runtime()]
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        return [*checks, Check("settings", exc.message, "correct or unset that variable")]
    checks += _providers(settings)
    checks += [_plugins(), _library(settings), _port(settings)]
    return checks


def render(checks: list[Check]) -> str:
    """One line per check; a broken one gets a second line with its fix."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.name.ljust(width)}  {check.found}")
        if check.broken:
            lines.append(f"{''.ljust(width)}  fix: {check.fix}")
    return "\n".join(lines)


# ---- checks ----------------------------------------------------------------------------------


def _platform() -> Check:
    return Check("platform", f"{platform.system()} {platform.release()} {platform.machine()}")


def _python() -> Check:
    return Check(
        "python", f"{platform.python_version()} ({sys.executable}); ortserve {__version__}"
    )


def _runtime() -> list[Check]:
    from ortserve.engine.install import InstallConflict, check_flavours, installed_flavours

    flavours = installed_flavours()
    found = ", ".join(f"{name} {version}" for name, version in flavours.items()) or "none"
    try:
        check_flavours()
        genai = Check("onnxruntime-genai", found)
    except InstallConflict as exc:
        genai = Check("onnxruntime-genai", found, exc.message.split(": ", 1)[-1])
    runtimes = {name: _version(name) for name in _ORT_FLAVOURS if _version(name)}
    found = ", ".join(f"{name} {version}" for name, version in runtimes.items()) or "none"
    if len(runtimes) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in runtimes else "onnxruntime"
        fix = f'pip uninstall -y {" ".join(runtimes)} && pip install "{keep}>=1.22"'
        return [genai, Check("onnxruntime", found, fix)]
    if not runtimes:
        return [genai, Check("onnxruntime", found, 'pip install "onnxruntime>=1.22"')]
    return [genai, Check("onnxruntime", found)]


def _providers(settings: Settings) -> list[Check]:
    """One line per provider (generation and embeddings), then what `auto` or the setting picks."""
    from ortserve.engine.providers import load_candidates, probe_all
    from ortserve.errors import ProviderUnavailable

    try:
        generation, embeddings = probe_all("genai"), probe_all("onnxruntime")
    except Exception as exc:  # the runtime itself does not import
        return [Check("providers", f"cannot probe: {exc}", "reinstall ortserve in a fresh venv")]
    checks = [Check(g.provider, _pair(g, e)) for g, e in zip(generation, embeddings)]
    for runtime, label in (("genai", "generation"), ("onnxruntime", "embeddings")):
        try:
            chosen = " > ".join(load_candidates(settings.provider, runtime=runtime))
            checks.append(Check(f"{label} on", f"{chosen} (ORTSERVE_PROVIDER={settings.provider})"))
        except ProviderUnavailable as exc:
            fix = "unset ORTSERVE_PROVIDER, or install what it needs (docs/engine.md)"
            checks.append(Check(f"{label} on", exc.message, fix))
    return checks


def _pair(generation, embeddings) -> str:
    """'usable: why' once when both runtimes agree, else each runtime's answer."""

    def say(probe) -> str:
        return f"{'usable' if probe.usable else 'no'}: {probe.reason}"

    if say(generation) == say(embeddings):
        return say(generation)
    return f"generation {say(generation)}; embeddings {say(embeddings)}"


def _plugins() -> Check:
    from ortserve.engine.providers import PLUGINS

    parts = []
    for plugin in PLUGINS.values():
        version = _version(plugin.package)
        parts.append(f"{plugin.package} {version}" if version else
                     f"{plugin.package} not installed ([{plugin.extra}])")  # fmt: skip
    return Check("plugins", "; ".join(parts))


def _library(settings: Settings) -> Check:
    from ortserve.library import Library

    root = settings.models
    if not root.exists():
        return Check("library", f"{root} (empty: it is created on first use)")
    if not os.access(root, os.W_OK):
        return Check(
            "library", f"{root} is not writable", f"set ORTSERVE_MODELS or fix {root}'s permissions"
        )
    models = Library(root).list()
    size = _disk_size(root)
    return Check("library", f"{root}: {len(models)} model(s), {humanize.size(size)} on disk")


def _port(settings: Settings) -> Check:
    host = settings.reachable_host
    what = who_listens(host, settings.port)
    address = settings.address
    if what is None:
        return Check("port", f"{address} is free")
    if what.startswith("ortserve"):
        return Check("port", f"{address} is served by {what}")
    return Check("port", f"{address} is taken by {what}",
                 f"stop it, or serve elsewhere: ORTSERVE_HOST=127.0.0.1:{settings.port + 1}")  # fmt: skip


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _disk_size(root) -> int:
    """Bytes under `root`, each file once: bundles share weight files by hard link."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total
