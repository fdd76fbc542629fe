"""Settings: one typed object read once from ORTSERVE_* variables, validated at start-up."""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortserve.errors import OrtServeError

# ortserve's execution provider names (engine/providers.py says which can run here)
PROVIDERS = (
    "auto", "cpu", "cuda", "dml", "webgpu", "openvino", "qnn", "coreml", "vitisai", "nvtensorrtrtx",
)  # fmt: skip
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Threads kept from generation requests for everything else (fewer on a small server).
_RESERVED_THREADS = 8
# The context (num_ctx) of a request that sets none, as Ollama's default; a model's own
# trained context still caps it (ORTSERVE_CONTEXT_LENGTH).
DEFAULT_CONTEXT_LENGTH = 4096
# Ollama reads 0 in these as "choose for me": ortserve's default is its choice.
_OLLAMA_ZERO_IS_AUTO = ("OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS")


class SettingsError(OrtServeError):
    """A bad ORTSERVE_* (or OLLAMA_*) value: start-up stops with a message naming the variable."""


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


# The longest keep_alive that is a real duration: Go's time.Duration (what Ollama parses
# into) ends at 2**63-1 ns, ~292 years; Python's lock waits end there too (TIMEOUT_MAX).
MAX_KEEP_ALIVE_SECONDS = min((2**63 - 1) / 1e9, threading.TIMEOUT_MAX)


def parse_keep_alive(value: str | int | float) -> float:
    """A keep_alive in seconds (negative: forever); one too long to be a duration (1e300, or
    1e400, which JSON reads as infinity) is forever, as Ollama keeps a model with an endless
    keep_alive: an expiry past any date would break /api/ps and the keep-alive timer."""
    seconds = parse_duration(value)
    if math.isnan(seconds):
        raise ValueError(f"invalid duration {value!r}")
    return -1.0 if seconds > MAX_KEEP_ALIVE_SECONDS else seconds


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
    # Connections one client address may hold open at once (gunicorn); 0: no cap. A quarter
    # of the worker's 1000, so that one client cannot take the slots health checks need.
    max_connections_per_client: int = 250
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
    # "auto": continuous lanes verify prompt-lookup drafts (engine/speculation.py); "off": never
    speculation: str = "auto"
    # a library model whose drafts continuous lanes verify instead of prompt lookup's, for
    # every model of the same tokenizer (engine/draft_model.py); "": none
    draft_model: str = ""
    # "on": continuous lanes run int4 projections as int8 products (engine/int8_compute.py),
    # "auto": where the CPU has AMX-INT8; "off": as the bundle is
    cpu_int8: str = "auto"
    kv_cache_entries: int = 16  # finished turns kept per model for KV reuse (0: none)
    kv_cache_size: int = 1 << 30  # bytes those kept turns may hold per model
    # the type kept turns' keys and values are stored in: "auto" (float16 for a model whose
    # weights are quantized, as they are computed otherwise), "f32" or "f16"
    kv_keep_type: str = "auto"
    # the continuous loop's cache: "f32" (as the bundle is) or "q8" (int8 keys and values,
    # per-channel scales calibrated once per bundle: engine/kv_int8.py)
    kv_cache_type: str = "f32"
    compute_threads: int = 0  # threads one model's forward passes use (0: the physical cores)
    context_length: int = DEFAULT_CONTEXT_LENGTH  # num_ctx of a request that sets none
    nohistory: bool = False  # `ortserve run` writes no history file
    # Models loaded at start-up, in the background, and kept loaded; /readyz waits for them
    preload: tuple[str, ...] = ()
    # The Batch API (docs/batch.md): an uploaded file's size limit, and the lines a batch
    # runs at once (0: ORTSERVE_NUM_PARALLEL - 1, so one slot stays for interactive turns)
    max_batch_file_bytes: int = 200 << 20
    batch_concurrency: int = 0
    # Ray Serve replicas (ortserve serve --ray): autoscaled between these (docs/cluster.md)
    min_replicas: int = 1
    max_replicas: int = 1
    # Where stored Responses API answers live: "memory" (this process), or "library" (files
    # under the library root, seen by every process that shares it: the cluster's replicas)
    responses_store: str = "memory"
    # http(s) image URLs in requests are fetched (bounded in bytes and time, serving/images.py)
    # only when this is on: off, a request cannot make the server reach other hosts
    fetch_images: bool = False
    # Images and audio in requests (serving/images.py, serving/audio.py): bounded before
    # anything is decoded or loaded
    max_image_bytes: int = 20 << 20
    max_images: int = 8
    max_audio_seconds: float = 600.0
    # Lines for the server's log: the OLLAMA_* variables read in place of unset ORTSERVE_* ones
    env_notes: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable of VARIABLES; raise SettingsError naming a bad one.

        An unset ORTSERVE_* variable falls back to Ollama's name for it, so a machine set up
        for Ollama serves (and its clients connect) the same way; env_notes says which.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {"models": default_models_dir()}
        notes = []
        for variable in VARIABLES:
            name = variable.source(env) if variable.field is not None else None
            if name is None:
                continue
            if name != variable.name:
                notes.append(_borrowed(variable, name, env[name]))
                if _ollama_auto(name, env[name]):
                    continue
            values.update(variable.assign(_read(env, name, variable)))
        return cls(**values, env_notes=tuple(notes))  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def batch_lines_at_once(self) -> int:
        """Batch lines in flight: ORTSERVE_BATCH_CONCURRENCY, or all slots but one."""
        return self.batch_concurrency or max(1, self.num_parallel - 1)

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


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _ollama_auto(name: str, value: str) -> bool:
    return name in _OLLAMA_ZERO_IS_AUTO and value.strip() == "0"


def _borrowed(variable: Variable, name: str, value: str) -> str:
    """The log line saying an Ollama variable was read for an unset ortserve one."""
    if _ollama_auto(name, value):
        return (f"{variable.name} is unset and {name}=0 (Ollama's automatic choice): "
                "using ortserve's default")  # fmt: skip
    shown = "(set)" if variable.secret else repr(value)
    return f"{variable.name} is unset: using {name}={shown}"


def _read(env: Mapping[str, str], name: str, variable: Variable):
    """The value of `name` (the variable or its Ollama alias) read by the variable's reader.

    A bad one: "ORTSERVE_NUM_PARALLEL must be a whole number, got 'zero'" (readers raise
    ValueError with the "must ..." part); a secret's value is never repeated.
    """
    value = env[name]
    try:
        return variable.reader(value)  # type: ignore[misc]
    except ValueError as exc:
        got = "" if variable.secret else f", got {value!r}"
        raise SettingsError(f"{name} {exc}{got}") from None


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


def _whole_number(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def _positive_int(value: str) -> int:
    number = _whole_number(value)
    if number < 1:
        raise ValueError("must be a whole number of 1 or more")
    return number


def _non_negative_int(value: str) -> int:
    number = _whole_number(value)
    if number < 0:
        raise ValueError("must be a whole number of 0 or more")
    return number


def _choice(*allowed: str) -> Callable[[str], str]:
    """A reader of a variable that takes one of `allowed` words (any case)."""
    words = f"{', '.join(allowed[:-1])} or {allowed[-1]}"

    def read(value: str) -> str:
        value = value.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be {words}")
        return value

    return read


def _duration(value: str, parse: Callable[[str], float] = parse_duration) -> float:
    try:
        return parse(value)
    except ValueError:
        raise ValueError("must be a duration such as 30s, 5m or 1h30m, or seconds") from None


def _keep_alive(value: str) -> float:
    return _duration(value, parse_keep_alive)


def _positive_duration(value: str) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("must be a duration above zero, such as 30s or 5m")
    return seconds


def _host(value: str) -> tuple[str, int]:
    try:
        return parse_host(value)
    except ValueError:
        raise ValueError("must be HOST:PORT, :PORT or HOST, with a port from 1 to 65535") from None


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError("must be a size such as 512MB or 2GiB, or bytes") from None


def _api_keys(value: str) -> tuple[tuple[str, str], ...]:
    try:
        return parse_api_keys(value)
    except ValueError as exc:
        raise ValueError(f"is invalid: {exc}") from None


def _flag(value: str) -> bool:
    """Ollama's booleans (Go's strconv.ParseBool) and the usual yes/no words."""
    text = value.strip().lower()
    if text in ("1", "t", "true", "yes", "on"):
        return True
    if text in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError("must be true or false (1 or 0)")


def _provider(value: str) -> str:
    value = value.strip().lower()
    if value not in PROVIDERS:
        raise ValueError(f"must be one of {', '.join(PROVIDERS)}")
    return value


def _grace_period(value: str) -> float:
    return max(0.0, _duration(value))


def _models_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError("must be a directory (it is a file)")
    return path


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?$", re.IGNORECASE)


def parse_size(value: str) -> int:
    """'512MB', '1GiB', '64m', '1073741824' -> bytes (K, M, G, T: powers of 1024)."""
    match = _SIZE.match(str(value).strip())
    if not match:
        raise ValueError(f"invalid size {value!r} (use e.g. 512MB, 2GB, or bytes)")
    unit = (match[2] or "").lower()[:1]
    return int(float(match[1]) * 1024 ** " kmgt".index(unit or " "))


# ---- the variables: one table read by Settings.from_env, listed by `ortserve serve --help` ----


@dataclass(frozen=True)
class Variable:
    """One environment variable: the Settings field(s) it sets, how, and what help says."""

    name: str
    default: str
    help: str
    field: str | tuple[str, ...] | None = None  # None: read where it is used, not in Settings
    reader: Callable[[str], Any] | None = None  # raises ValueError("must ...") on a bad value
    ollama: str | None = None  # Ollama's name for it, read when `name` is unset or empty
    secret: bool = False  # its value is never repeated in a message or log

    def assign(self, value: Any) -> dict[str, Any]:
        """Settings values from what the reader returned (ORTSERVE_HOST sets host and port)."""
        if isinstance(self.field, tuple):
            return dict(zip(self.field, value, strict=True))
        return {self.field: value} if self.field else {}

    def source(self, env: Mapping[str, str]) -> str | None:
        """The variable that gives the value: this one, else Ollama's, else None (default)."""
        for name in (self.name, self.ollama):
            if name and env.get(name):
                return name
        return None


VARIABLES: tuple[Variable, ...] = (
    Variable("ORTSERVE_HOST", "127.0.0.1:11434", "Address the server listens on and clients "
             "reach: HOST:PORT, :PORT or HOST", ("host", "port"), _host, "OLLAMA_HOST"),
    Variable("ORTSERVE_MODELS", "~/.ortserve/models", "The model library's directory",
             "models", _models_dir),
    Variable("ORTSERVE_CATALOG", "", "A JSON file of short model names that extends the "
             "shipped catalog"),
    Variable("ORTSERVE_KEEP_ALIVE", "5m", "How long a model stays loaded after its last "
             "request, negative: forever", "keep_alive", _keep_alive, "OLLAMA_KEEP_ALIVE"),
    Variable("ORTSERVE_MAX_LOADED_MODELS", "3", "Models loaded at once",
             "max_loaded_models", _positive_int, "OLLAMA_MAX_LOADED_MODELS"),
    Variable("ORTSERVE_PRELOAD", "", "Models loaded at start-up and kept loaded; /readyz "
             "answers 503 until they are (comma-separated names)", "preload", _list),
    Variable("ORTSERVE_NUM_PARALLEL", "8", "Turns generating at once per model",
             "num_parallel", _positive_int, "OLLAMA_NUM_PARALLEL"),
    Variable("ORTSERVE_ENGINE_LANES", "4", "onnxruntime-genai engines per model",
             "engine_lanes", _positive_int),
    Variable("ORTSERVE_MAX_QUEUE", "64", "Requests waiting per model before 503",
             "max_queue", _positive_int, "OLLAMA_MAX_QUEUE"),
    Variable("ORTSERVE_CONTEXT_LENGTH", str(DEFAULT_CONTEXT_LENGTH), "Context length of a "
             "request that sets no num_ctx", "context_length", _positive_int,
             "OLLAMA_CONTEXT_LENGTH"),
    Variable("ORTSERVE_PROVIDER", "auto", "Execution provider: " + ", ".join(PROVIDERS),
             "provider", _provider),
    Variable("ORTSERVE_THREADS", "96", "Server threads: requests in progress at once",
             "threads", _positive_int),
    Variable("ORTSERVE_READ_TIMEOUT", "30s", "How long a client may take to send a request",
             "read_timeout", _positive_duration),
    Variable("ORTSERVE_MAX_CONNECTIONS_PER_CLIENT", "250", "Connections one client address "
             "may hold open, 0: no cap", "max_connections_per_client", _non_negative_int),
    Variable("ORTSERVE_GRACE_PERIOD", "30s", "Time requests in flight get after SIGTERM",
             "grace_period", _grace_period),
    Variable("ORTSERVE_FORMAT_RETRIES", "2", "Retries of structured output that fails its "
             "schema", "format_retries", _non_negative_int),
    Variable("ORTSERVE_API_KEYS", "", "Keys the server requires (name:key,... or @FILE)",
             "api_keys", _api_keys, secret=True),
    Variable("ORTSERVE_API_KEY", "", "The key the CLI sends to a server", secret=True),
    Variable("ORTSERVE_ALLOWED_HOSTS", "", "Host names answered besides loopback ones",
             "allowed_hosts", _list),
    Variable("ORTSERVE_ORIGINS", "", "Browser origins allowed besides the defaults, "
             "comma-separated", "origins", _list, "OLLAMA_ORIGINS"),
    Variable("ORTSERVE_MAX_TOKENS", "", "The most tokens one turn may generate",
             "max_tokens", _positive_int),
    Variable("ORTSERVE_BATCHING", "auto", "auto (continuous where it can) or static",
             "batching", _choice("auto", "static")),
    Variable("ORTSERVE_SPECULATION", "auto", "auto (prompt-lookup speculative decoding on "
             "continuous lanes) or off", "speculation", _choice("auto", "off")),
    Variable("ORTSERVE_DRAFT_MODEL", "", "A library model that drafts for every model of "
             "the same tokenizer (speculative decoding)", "draft_model", str.strip),
    Variable("ORTSERVE_CPU_INT8", "auto", "on: int4 projections run as int8 products on "
             "continuous lanes (faster prompts on AMX CPUs); auto: where the CPU has AMX; off",
             "cpu_int8", _choice("auto", "on", "off")),
    Variable("ORTSERVE_KV_CACHE_ENTRIES", "16", "Finished turns kept per model for KV reuse",
             "kv_cache_entries", _non_negative_int),
    Variable("ORTSERVE_KV_CACHE_SIZE", "1GiB", "Bytes those kept turns may hold per model",
             "kv_cache_size", _size),
    Variable("ORTSERVE_KV_KEEP_TYPE", "auto", "The type kept turns' keys and values are "
             "stored in: auto (f16 for quantized models), f32 or f16", "kv_keep_type",
             _choice("auto", "f32", "f16")),
    Variable("ORTSERVE_KV_CACHE_TYPE", "f32", "The continuous loop's KV cache: f32 (as the "
             "bundle is) or q8 (int8, 4x smaller; Ollama's OLLAMA_KV_CACHE_TYPE=q8_0)",
             "kv_cache_type", _choice("f32", "q8")),
    Variable("ORTSERVE_COMPUTE_THREADS", "physical cores", "Threads one model's forward "
             "passes use", "compute_threads", _non_negative_int),
    Variable("ORTSERVE_LOG_FORMAT", "text", "text, or json (one object per line)",
             "log_format", _choice("text", "json")),
    Variable("ORTSERVE_NOHISTORY", "", "`ortserve run` keeps no history file",
             "nohistory", _flag, "OLLAMA_NOHISTORY"),
    Variable("ORTSERVE_DEBUG", "", "Show the traceback of an unexpected CLI error"),
    Variable("ORTSERVE_MAX_BATCH_FILE_BYTES", "200MB", "The largest file the Batch API "
             "takes (/v1/files)", "max_batch_file_bytes", _size),
    Variable("ORTSERVE_BATCH_CONCURRENCY", "0", "Batch lines run at once, 0: "
             "ORTSERVE_NUM_PARALLEL - 1", "batch_concurrency", _non_negative_int),
    Variable("ORTSERVE_MIN_REPLICAS", "1", "Ray Serve replicas kept when idle (serve --ray)",
             "min_replicas", _positive_int),
    Variable("ORTSERVE_MAX_REPLICAS", "1", "Ray Serve replicas at most, added while requests "
             "queue (serve --ray)", "max_replicas", _positive_int),
    Variable("ORTSERVE_RESPONSES_STORE", "memory", "Where stored Responses API answers live: "
             "memory (this process) or library (files under ORTSERVE_MODELS, shared by "
             "processes; serve --ray's default)", "responses_store", _choice("memory", "library")),
    Variable("ORTSERVE_FETCH_IMAGES", "", "Fetch http(s) image URLs in requests "
             "(ORTSERVE_MAX_IMAGE_BYTES, 10 s each); off: only images sent in the request",
             "fetch_images", _flag),
    Variable("ORTSERVE_MAX_IMAGE_BYTES", "20MiB", "The largest image a request may carry "
             "(encoded)", "max_image_bytes", _size),
    Variable("ORTSERVE_MAX_IMAGES", "8", "Images one request may carry (a stored conversation's "
             "included)", "max_images", _positive_int),
    Variable("ORTSERVE_MAX_AUDIO_SECONDS", "10m", "The longest audio a transcription takes",
             "max_audio_seconds", _positive_duration),
)  # fmt: skip


def env_help() -> str:
    """The variables as `ortserve serve --help` lists them (as `ollama serve --help` does)."""
    import textwrap

    width = max(len(v.name) for v in VARIABLES) + 4
    lines = ["Environment Variables:"]
    for variable in VARIABLES:
        extra = [f"default {variable.default}"] if variable.default else []
        extra += [f"or {variable.ollama}"] if variable.ollama else []
        text = variable.help + (f" ({'; '.join(extra)})" if extra else "")
        lines += textwrap.wrap(text, 86, initial_indent=f"  {variable.name:<{width - 2}}",
                               subsequent_indent=" " * width)  # fmt: skip
    return "\n".join(lines)
