"""Settings: one typed object read once from ORTSERVE_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ortserve.errors import OrtServeError


class SettingsError(OrtServeError):
    """A bad ORTSERVE_* value: start-up stops with a message naming the variable."""


def default_models_dir() -> Path:
    return Path.home() / ".ortserve" / "models"


@dataclass(frozen=True)
class Settings:
    models: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Read and validate every ORTSERVE_* variable; raise SettingsError naming a bad one."""
        env = os.environ if env is None else env
        return cls(models=_models_dir(env.get("ORTSERVE_MODELS")))


def _models_dir(value: str | None) -> Path:
    if not value:
        return default_models_dir()
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"ORTSERVE_MODELS={value!r} is not a directory")
    return path
