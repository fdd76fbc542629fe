"""Settings: one typed object read once from ORTSERVE_* variables, validated at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ortserve.errors import OrtServeError

# ortserve's execution provider names (engine/providers.py says which can run here)
PROVIDERS = (
    "auto", "cpu", "cuda", "dml", "webgpu", "openvino", "qnn", "coreml", "vitisai", "nvtensorrtrtx",
)  # fmt: skip
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Threads kept from generation requests for everything else (fewer on a small server).
_RESERVED_THREADS = 8


class SettingsError(OrtServeError):
    """A bad ORTSERVE_* value: start-up stops with a message naming the variable."""


def default_models_dir() -> Path:
    return Path.home() / ".ortserve" / "models"


def parse_duration(value: str | int | float) -> float:
    """'5m', '30s', '1h', '250ms', '300' or 300 -> seconds; negative means forever."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    # Go-style compound durations Ollama accepts, like "1h30m"
    parts = re.findall(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if parts and "".join(n + u for n, u in parts) == text:
        return sum(float(n) * _UNITS[u] for n, u in parts)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {value!r} (use e.g. 5m, 30s, 1h, or seconds)")
    return float(match[1]) * _UNITS[match[2]]


def parse_host(value: str) -> tuple[str, int]:
    """'127.0.0.1:11434', ':8080', '0.0.0.0', 'http://host:port' -> (host, port)."""
    text = value.strip()
    text = re.sub(r"^https?://", "", text).rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "11434"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in {value!r}")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class Settings:
    models: Path
    host: str = "127.0.0.1"
    port: int = 11434
    keep_alive: float = 300.0  # seconds; negative: forever
    max_loaded_models: int = 3
    num_parallel: int = 8  # turns generating at once per model
    engine_lanes: int = 4  # og.Engine instances per model (batches that run side by side)
    # Turns waiting per model beyond those generating. Each waiting request holds a thread,
    # so the queue is kept below the threads: a full queue answers 503 instead of leaving
    # callers in the socket backlog.
    max_queue: int = 64
    provider: str = "auto"
    threads: int = 96  # request threads (gunicorn gthread, waitress)
    read_timeout: float = 30.0  # seconds a client gets to send a request (see serve.py)
    grace_period: float = 30.0  # seconds in-flight requests get on SIGTERM
    format_retries: int = 2  # retries of structured output that fails its schema
    api_keys: tuple[tuple[str, str], ...] = ()  # (name, key); empty: no key required
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones
    origins: tuple[str, ...] = ()  # Origin patterns accepted besides Ollama's defaults
    log_format: str = "text"  # or "json": one object per line
    max_tokens: int | None = None  # cap on tokens one turn generates (None: the context)
    # "auto": builder graphs on the CPU batch continuously (engine/continuous.py); "static":
    # og.Engine's static batches for every model (the way before; a fallback)
    batching: str = "auto"
    kv_cache_entries: int = 16  # finished turns kept per model for KV reuse (0: none)
    kv_cache_size: int = 1 << 30  # bytes those kept turns may hold per model
    compute_threads: int = 0  # threads one model's forward passes use (0: the physical cores)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ORTSERVE_* variable; raise SettingsError naming a bad one."""
        env = os.environ if env is None else env
        values: dict[str, object] = {"models": _models_dir(env.get("ORTSERVE_MODELS"))}
        if env.get("ORTSERVE_HOST"):
            values["host"], values["port"] = _read(env, "ORTSERVE_HOST", parse_host)
        readers = {
            "keep_alive": parse_duration,
            "max_loaded_models": _positive_int,
            "num_parallel": _positive_int,
            "engine_lanes": _positive_int,
            "max_queue": _positive_int,
            "provider": _provider,
            "threads": _positive_int,
            "read_timeout": _positive_duration,
            "grace_period": lambda v: max(0.0, parse_duration(v)),
            "format_retries": _non_negative_int,
            "api_keys": parse_api_keys,
            "allowed_hosts": _list,
            "origins": _list,
            "log_format": _log_format,
            "max_tokens": _positive_int,
            "batching": _batching,
            "kv_cache_entries": _non_negative_int,
            "kv_cache_size": parse_size,
            "compute_threads": _non_negative_int,
        }
        for name, reader in readers.items():
            variable = f"ORTSERVE_{name.upper()}"
            if env.get(variable):
                values[name] = _read(env, variable, reader)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def generation_slots(self) -> int:
        """Generation requests served at once; more get 503 at once (api/security.py).

        The other threads stay free for health checks, metrics and library calls, so a
        server busy generating still answers them.
        """
        reserved = max(1, min(_RESERVED_THREADS, self.threads // 4))
        return max(1, self.threads - reserved)

    @property
    def model_threads(self) -> int:
        """Threads a model's forward passes use: ORTSERVE_COMPUTE_THREADS, else every
        physical core this process may run on. onnxruntime-genai's own default is half the
        logical cores, which on a machine without hyper-threading leaves half the cores idle
        while a batch is compute-bound (docs/performance.md)."""
        return self.compute_threads or physical_cores()

    @property
    def reachable_host(self) -> str:
        """Where a client on this machine reaches the server (a wildcard bind -> loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


def parse_api_keys(value: str) -> tuple[tuple[str, str], ...]:
    """'name:key,other:key2' (or '@/path/to/file': one name:key per line, # comments)."""
    text = value.strip()
    if text.startswith("@"):
        try:
            text = Path(text[1:]).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the key file: {exc.strerror}") from None
    entries = [e.strip() for line in text.splitlines() for e in line.split("#")[0].split(",")]
    keys = []
    for number, entry in enumerate(filter(None, entries), start=1):
        name, sep, key = entry.partition(":")
        name, key = (name.strip(), key.strip()) if sep else (f"key{number}", entry)
        if len(key) < 16:
            raise ValueError(f"key {name!r} is shorter than 16 characters")
        keys.append((name, key))
    if not keys:
        raise ValueError("no keys given")
    return tuple(keys)


def _log_format(value: str) -> str:
    value = value.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _read(env: Mapping[str, str], variable: str, reader):
    value = env[variable]
    try:
        return reader(value)
    except ValueError as exc:
        raise SettingsError(f"{variable}={value!r} is invalid: {exc}") from exc


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (at least 1)."""
    import psutil

    logical = psutil.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    try:
        allowed = len(os.sched_getaffinity(0))  # a container or taskset may allow fewer
    except AttributeError:  # not on Linux
        allowed = logical
    return max(1, min(physical, allowed * physical // logical))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number >= 1")
    return number


def _positive_duration(value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be a duration above zero")
    return seconds


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be a whole number >= 0")
    return number


def _provider(value: str) -> str:
    value = value.strip().lower()
    if value not in PROVIDERS:
        raise ValueError(f"must be one of {', '.join(PROVIDERS)}")
    return value


def _models_dir(value: str | None) -> Path:
    if not value:
        return default_models_dir()
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"ORTSERVE_MODELS={value!r} is not a directory")
    return path


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?$", re.IGNORECASE)


def parse_size(value: str) -> int:
    """'512MB', '1GiB', '64m', '1073741824' -> bytes (K, M, G, T: powers of 1024)."""
    match = _SIZE.match(str(value).strip())
    if not match:
        raise ValueError(f"invalid size {value!r} (use e.g. 512MB, 2GB, or bytes)")
    unit = (match[2] or "").lower()[:1]
    return int(float(match[1]) * 1024 ** " kmgt".index(unit or " "))


def _batching(value: str) -> str:
    value = value.strip().lower()
    if value not in ("auto", "static"):
        raise ValueError("must be auto or static")
    return value
