"""Batch conversion: many checkpoints from one spec, in parallel processes, within memory.

A spec (YAML or JSON) is a list of entries, or a mapping with `models:` and `defaults:`:

    defaults: {precision: int4, verify: false}
    models:
      - source: Qwen/Qwen2.5-0.5B-Instruct
        name: qwen2.5:0.5b
      - {source: ./checkpoints/llama, precision: fp32}

Each entry converts in its own process, so a crash or an out-of-memory kill fails that entry
alone. An entry whose model is already in the library from the same source revision (a
commit, or a local directory's fingerprint) and options is skipped, so a re-run resumes.

With `ray_address`, each entry is a Ray task instead, declaring the same memory estimate as
its resource need, on a cluster whose nodes share the library directory (docs/batch.md). An
entry with `push: hf.co/ORG/REPO[:VARIANT]` is pushed once it is in the library, by the
`publish` function the caller passes (ortserve.models.push.push: converters sit below it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol

from converters.convert import STEPS, ConvertOptions, convert
from converters.progress import Progress
from converters.source import default_name, fingerprint, is_repo_id
from ortserve import humanize
from ortserve.errors import InvalidRequest, OrtServeError, SourceUnavailable
from ortserve.library import Library, ModelInfo, ModelName

REPORT_NAME = "batch-report.json"
# benchmarks/convert_bench.py measured a conversion's peak at ~3.3x the fp32 weight size with
# the model builder (the default for decoders), ~2.9x with optimum.
PEAK_FACTOR = 3.5
_FP32_BYTES = 4
_HUB_TIMEOUT_S = 10
# [hf.co/]ORG/REPO[:VARIANT]; ortserve.models.push parses it fully when it pushes
_PUSH_TARGET = re.compile(r"(?:(?:hf\.co|huggingface\.co)/)?(?P<repo>[^:@\s]+)(?::[\w.-]+)?")


# ---- the spec --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchEntry:
    """One model to convert: its source, library name and conversion options."""

    source: str
    name: str
    precision: str = "int4"
    provider: str = "cpu"
    block_size: int = 32
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    verify: bool = True
    backend: str = "auto"
    push: str | None = None  # hf.co/ORG/REPO[:VARIANT] to push to once converted

    def convert_options(self) -> dict[str, Any]:
        """The keyword arguments of convert() besides source and name."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_OPTIONS}

    @property
    def options(self) -> ConvertOptions:
        return ConvertOptions(**self.convert_options())


_FIELDS = {f.name for f in fields(BatchEntry)}
_NOT_OPTIONS = ("source", "name", "push")
_PER_ENTRY = ("source", "name", "push")  # one value per entry: a default makes no sense
_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "name": (str,),
    "precision": (str,),
    "provider": (str,),
    "block_size": (int,),
    "revision": (str, type(None)),
    "trust_remote_code": (bool,),
    "allow_pickle": (bool,),
    "verify": (bool,),
    "backend": (str,),
    "push": (str, type(None)),
}
_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def load_spec(path: str | os.PathLike[str]) -> list[BatchEntry]:
    """Read a YAML or JSON batch spec; relative directory sources are relative to it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(
            f"cannot read batch spec {path}: {exc.strerror}", param="batch"
        ) from exc
    return parse_spec(_parse_text(text, path), base=path.resolve().parent)


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(
                f"batch spec {path} is not valid JSON: {exc}", param="batch"
            ) from exc
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())  # the CLI prints errors on one line
        raise InvalidRequest(
            f"batch spec {path} is not valid YAML: {problem}", param="batch"
        ) from exc


def parse_spec(data: Any, *, base: Path | None = None) -> list[BatchEntry]:
    """Entries from a loaded spec; every problem is reported at once, naming entry and field."""
    models, defaults, errors = _split_top(data)
    parsed: list[tuple[int, BatchEntry]] = []
    for index, raw in enumerate(models):
        entry, problems = _parse_entry(index, raw, defaults, base)
        errors += problems
        if entry is not None:  # even with problems, so duplicates are found as well
            parsed.append((index, entry))
    errors += _duplicate_names(parsed)
    if errors:
        raise InvalidRequest("batch spec: " + "; ".join(errors), param="batch")
    return [entry for _, entry in parsed]


def _split_top(data: Any) -> tuple[list[Any], dict[str, Any], list[str]]:
    """(models, defaults, errors) of a bare list or a {models, defaults} mapping."""
    if isinstance(data, list):
        models, defaults, errors = data, {}, []
    elif isinstance(data, dict):
        errors = [f"unknown top-level key {k!r} (expected models, defaults)"
                  for k in data if k not in ("models", "defaults")]  # fmt: skip
        models, defaults = data.get("models"), data.get("defaults") or {}
        if not isinstance(models, list):
            errors.append("models: required, a list of entries")
            models = []
        if not isinstance(defaults, dict):
            errors.append("defaults: must be a mapping of field: value")
            defaults = {}
        errors += _default_errors(defaults)
        # a bad default is reported once, above, not again under every entry
        defaults = {
            k: v for k, v in defaults.items() if k in _FIELDS and not _type_errors("", {k: v})
        }
    else:
        return [], {}, ["expected a list of models, or a mapping with models: and defaults:"]
    if not models and not errors:
        errors.append("models: the list is empty")
    return models, defaults, errors


def _default_errors(defaults: dict[str, Any]) -> list[str]:
    errors = []
    for key, value in defaults.items():
        if key in _PER_ENTRY:
            errors.append(f"defaults.{key}: set per entry, not in defaults")
        elif key not in _FIELDS:
            errors.append(f"defaults.{key}: unknown field (fields: {', '.join(_TYPES)})")
        else:
            errors += _type_errors("defaults", {key: value})
    return errors


def _parse_entry(
    index: int, raw: Any, defaults: dict[str, Any], base: Path | None
) -> tuple[BatchEntry | None, list[str]]:
    where = f"models[{index}]"
    if isinstance(raw, str):
        raw = {"source": raw}  # shorthand: a bare source
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a mapping with source:, got {raw!r}"]
    unknown = [f"{where}.{k}: unknown field (fields: {', '.join(_TYPES)})"
               for k in raw if k not in _FIELDS]  # fmt: skip
    values = {k: v for k, v in {**defaults, **raw}.items() if k in _FIELDS}
    if values.get("source") in ("", None):
        return None, [*unknown, f"{where}.source: required"]
    wrong_types = _type_errors(where, {k: v for k, v in raw.items() if k in _FIELDS})
    if wrong_types:
        return None, unknown + wrong_types
    values.setdefault("name", default_name(values["source"]))
    values["source"] = _locate(values["source"], base)
    entry = BatchEntry(**values)
    return entry, unknown + [f"{where}.{problem}" for problem in _value_errors(entry)]


def _type_errors(where: str, values: dict[str, Any]) -> list[str]:
    errors = []
    for key, value in values.items():
        allowed = _TYPES[key]
        # bool is an int in Python: `block_size: true` is a mistake, not 1
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            words = " or ".join(_TYPE_WORDS.get(t, "null") for t in allowed)
            errors.append(f"{where}.{key}: must be {words}, got {value!r}")
    return errors


def _value_errors(entry: BatchEntry) -> list[str]:
    errors = []
    try:
        ModelName.parse(entry.name)
    except InvalidRequest as exc:
        errors.append(f"name: {exc.message}")
    try:
        entry.options.validate()
    except InvalidRequest as exc:
        errors.append(f"{exc.param}: {exc.message}")
    if entry.push is not None and not _is_push_target(entry.push):
        errors.append(f"push: {entry.push!r} is not hf.co/ORG/REPO[:VARIANT]")
    return errors


def _is_push_target(text: str) -> bool:
    match = _PUSH_TARGET.fullmatch(text.strip())
    return bool(match) and is_repo_id(match["repo"]) and ".." not in match["repo"]


def _locate(source: str, base: Path | None) -> str:
    """A relative directory in a spec file is relative to that file, not to the shell."""
    path = Path(source).expanduser()
    if base is None or path.is_absolute():
        return str(path) if source.startswith("~") else source
    candidate = base / path
    if candidate.is_dir() or not is_repo_id(source):
        return str(candidate.resolve())
    return source


def _duplicate_names(parsed: list[tuple[int, BatchEntry]]) -> list[str]:
    seen: dict[tuple[str, ...], int] = {}
    errors = []
    for index, entry in parsed:
        try:
            key = ModelName.parse(entry.name).key
        except InvalidRequest:  # reported with the entry's other problems
            continue
        if key in seen:
            errors.append(f"models[{index}].name: {entry.name!r} is also models[{seen[key]}]'s")
        seen.setdefault(key, index)
    targets: dict[str, int] = {}
    for index, entry in parsed:  # two bundles pushed to one place: the second replaces the first
        target = _push_key(entry.push)
        if target in targets:
            errors.append(
                f"models[{index}].push: {entry.push!r} is also models[{targets[target]}]'s"
            )
        if target is not None:
            targets.setdefault(target, index)
    return errors


def _push_key(push: str | None) -> str | None:
    if push is None:
        return None
    key = push.strip().lower().removeprefix("hf.co/").removeprefix("huggingface.co/")
    return key.removesuffix(":latest")  # :latest is the repository's root, as no variant


# ---- skip: what the source is now, and what the library has --------------------------------


@dataclass(frozen=True)
class Probe:
    """What is known of an entry's source before converting it."""

    source: str  # as the manifest records it: a resolved directory or a repo id
    identity: dict[str, str]  # {"revision": commit} or {"fingerprint": ...}; {} when unknown
    peak: int  # estimated peak memory of its conversion in bytes, 0 when unknown


def probe(entry: BatchEntry) -> Probe:
    """Identify the source's current revision and estimate its conversion's memory, cheaply."""
    local = Path(entry.source).expanduser()
    if local.is_dir():
        local = local.resolve()
        return Probe(str(local), {"fingerprint": fingerprint(local)}, _local_peak(local))
    if is_repo_id(entry.source):
        return _probe_repo(entry)
    return Probe(entry.source, {}, 0)  # its conversion will say what is wrong with it


def _probe_repo(entry: BatchEntry) -> Probe:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(
            entry.source, revision=entry.revision, files_metadata=True, timeout=_HUB_TIMEOUT_S
        )
    except (OSError, ValueError):  # offline, unknown repo, bad id: ask the local cache
        return _probe_cached_repo(entry)
    if info.safetensors and info.safetensors.total:
        peak = int(PEAK_FACTOR * _FP32_BYTES * info.safetensors.total)
    else:
        sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
        peak = int(PEAK_FACTOR * sum(sizes))
    return Probe(entry.source, {"revision": info.sha}, peak)


def _probe_cached_repo(entry: BatchEntry) -> Probe:
    """Offline, the commit the cache holds for the revision is the one a download would use."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(entry.source, "config.json", revision=entry.revision)
    if not isinstance(cached, str):
        return Probe(entry.source, {}, 0)
    snapshot = Path(cached).parent  # .../snapshots/<commit>/config.json
    return Probe(entry.source, {"revision": snapshot.name}, _local_peak(snapshot))


def _local_peak(path: Path) -> int:
    from converters.checkpoint import safetensors_parameter_count

    try:
        parameters = safetensors_parameter_count(path)
    except Exception:  # an unreadable header: the conversion reports it; estimate by size
        parameters = 0
    if parameters:
        return int(PEAK_FACTOR * _FP32_BYTES * parameters)
    return int(PEAK_FACTOR * sum(f.stat().st_size for f in path.glob("*.safetensors")))


def up_to_date(entry: BatchEntry, found: Probe, library: Library) -> ModelInfo | None:
    """The library's model if it was converted from this source revision with these options."""
    if not found.identity:
        return None
    try:
        info = library.get(entry.name)
    except OrtServeError:  # not there, or unreadable: convert it
        return None
    recorded = info.manifest.get("source") or {}
    same = (
        recorded.get("source") == found.source
        and recorded.get("options") == entry.options.recorded()
        and all(recorded.get(key) == value for key, value in found.identity.items())
    )
    return info if same and info.path.is_dir() else None


# ---- memory ----------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of memory available now (psutil, /proc/meminfo, sysconf); None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


class Slots:
    """At most `jobs` conversions at once, whose estimated peaks fit in `memory` bytes."""

    def __init__(self, jobs: int, memory: int | None):
        self.jobs = jobs
        self.memory = memory
        self.running: list[int] = []

    def fits(self, peak: int) -> bool:
        if not self.running:
            return True  # even an entry bigger than all memory gets its chance, alone
        if len(self.running) >= self.jobs:
            return False
        return self.memory is None or sum(self.running) + peak <= self.memory

    def take(self, peak: int) -> None:
        self.running.append(peak)

    def release(self, peak: int) -> None:
        self.running.remove(peak)


# ---- the report ------------------------------------------------------------------------------


@dataclass
class EntryResult:
    """How one entry ended: converted, skipped or failed."""

    name: str
    source: str
    status: str
    seconds: float = 0.0
    size: int | None = None
    digest: str | None = None
    error: str | None = None
    node: str | None = None  # where it ran: this host's name, or the Ray node's id
    pushed: str | None = None  # the hub destination it was pushed to


@dataclass
class BatchReport:
    """Every entry's result, in spec order."""

    entries: list[EntryResult]
    seconds: float
    jobs: int = 1
    spec: str | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def failed(self) -> list[EntryResult]:
        return [e for e in self.entries if e.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        statuses = ("converted", "skipped", "failed")
        return {s: sum(e.status == s for e in self.entries) for s in statuses}

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 3),
            "jobs": self.jobs,
            "summary": self.counts(),
            "entries": [asdict(e) for e in self.entries],
        }

    def table(self) -> str:
        """The terminal summary: one row per entry, then the totals."""
        rows = [
            [e.name, e.status, f"{e.seconds:.1f}s",
             humanize.size(e.size) if e.size is not None else "-", _short_node(e.node),
             e.error or (f"pushed to {e.pushed}" if e.pushed else "")]
            for e in self.entries
        ]  # fmt: skip
        totals = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        summary = f"{totals} in {self.seconds:.1f}s"
        header = ["NAME", "STATUS", "TIME", "SIZE", "NODE", "ERROR"]
        return humanize.table(header, rows) + "\n" + summary

    def nodes(self) -> dict[str, int]:
        """How many entries each node ran (skipped ones ran nowhere)."""
        ran = [e.node for e in self.entries if e.node is not None]
        return {node: ran.count(node) for node in dict.fromkeys(ran)}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON report atomically: a reader sees the old report or the new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            scratch.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(scratch, path)
        finally:
            scratch.unlink(missing_ok=True)
        self.path = path
        return path


def _short_node(node: str | None) -> str:
    """A Ray node id (56 hex digits) as its first 12, as `ray status` shortens it."""
    if node is None:
        return "-"
    if len(node) == 56 and all(c in "0123456789abcdef" for c in node):
        return node[:12]
    return node


# ---- running ---------------------------------------------------------------------------------


class Publish(Protocol):
    """Push library model `name` to `destination` (ortserve.models.push.push has this shape)."""

    def __call__(self, name: str, destination: str, *, library: Library) -> Any: ...


def run(
    spec: str | os.PathLike[str] | list[Any] | dict[str, Any],
    *,
    library: Library | None = None,
    jobs: int = 1,
    report: str | os.PathLike[str] | None = None,
    progress: bool = True,
    memory: int | None = None,
    ray_address: str | None = None,
    publish: Publish | None = None,
) -> BatchReport:
    """Convert every entry of `spec` (a path, a list of dicts, or load_spec's entries).

    Failures are recorded in the report, never raised; only a bad spec raises, before
    anything runs. `memory` is the byte budget for running conversions (default: what is
    available now). The JSON report goes to `report`, else beside a spec file.

    `ray_address` ("auto", a cluster's address, or "local" for a Ray started here) runs each
    entry as a Ray task instead of a local process; `jobs` and `memory` are then the
    cluster's business. Entries with `push:` are pushed by `publish` once in the library.
    """
    entries, spec_path = _entries(spec)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidRequest(f"jobs must be a whole number >= 1, got {jobs!r}", param="jobs")
    _check_publish(entries, publish)
    library = library or Library()
    started = time.perf_counter()
    echo = _Echo(len(entries), enabled=progress)
    if ray_address is None:
        budget = memory if memory is not None else available_memory()
        runner: _Runner = _Runner(library, Slots(jobs, budget), echo)
    else:
        runner = _RayRunner(library, ray_address, echo)
    results = runner.run(entries)
    if publish is not None:
        _publish_all(entries, results, library, publish, echo)
    batch = BatchReport(results, time.perf_counter() - started, jobs, spec_path)
    target = report or (Path(spec_path).parent / REPORT_NAME if spec_path else None)
    if target:
        batch.write(target)
    return batch


def _check_publish(entries: list[BatchEntry], publish: Publish | None) -> None:
    pushing = [i for i, entry in enumerate(entries) if entry.push is not None]
    if pushing and publish is None:
        raise InvalidRequest(
            f"batch spec: models[{pushing[0]}].push: pushing needs ortserve's push: run "
            "`ortserve convert --batch`, or pass publish=ortserve.models.push.push",
            param="batch",
        )


def _publish_all(entries: list[BatchEntry], results: list[EntryResult], library: Library,
                 publish: Publish, echo: _Echo) -> None:  # fmt: skip
    """Push each entry that asks to and is in the library (converted now or before: a push of
    what the hub already has commits nothing, so a re-run finishes an interrupted push)."""
    for index, (entry, result) in enumerate(zip(entries, results, strict=True)):
        if entry.push is None or result.status == "failed":
            continue
        echo(index, result.name, f"pushing to {entry.push}")
        try:
            publish(result.name, entry.push, library=library)
        except OrtServeError as exc:
            result.status = "failed"
            result.error = f"in the library, but the push to {entry.push} failed: {exc.message}"
            echo(index, result.name, result.error)
            continue
        result.pushed = entry.push
        echo(index, result.name, f"pushed to {entry.push}")


def _entries(spec: Any) -> tuple[list[BatchEntry], str | None]:
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec), str(Path(spec).resolve())
    if isinstance(spec, list) and all(isinstance(e, BatchEntry) for e in spec):
        spec = [asdict(e) for e in spec]  # checked like any spec: names, options, duplicates
    return parse_spec(spec), None


class _Echo:
    """Progress lines on stderr, one per event: `[2/3] name: export`."""

    def __init__(self, total: int, *, enabled: bool):
        self.total = total
        self.enabled = enabled

    def __call__(self, index: int, name: str, text: str) -> None:
        if self.enabled:
            print(f"[{index + 1}/{self.total}] {name}: {text}", file=sys.stderr, flush=True)


@dataclass
class _Work:
    index: int
    entry: BatchEntry
    probe: Probe
    started: float = 0.0
    process: Any = None
    outcome: tuple[str, Any] | None = None


class _Runner:
    """Probes every entry, skips the up-to-date ones, runs the rest in processes."""

    def __init__(self, library: Library, slots: Slots, echo: _Echo):
        self.library = library
        self.slots = slots
        self.echo = echo
        self.context = multiprocessing.get_context("spawn")
        self.results: list[EntryResult | None] = []

    def run(self, entries: list[BatchEntry]) -> list[EntryResult]:
        self.results = [None] * len(entries)
        work = []
        for index, entry in enumerate(entries):
            found = probe(entry)
            existing = up_to_date(entry, found, self.library)
            if existing is None:
                work.append(_Work(index, entry, found))
                continue
            self.results[index] = EntryResult(
                existing.name, found.source, "skipped", 0.0, existing.size, existing.digest
            )
            self.echo(index, existing.name, f"skipped, up to date ({existing.short_id})")
        self._execute(deque(work))
        return [r for r in self.results if r is not None]

    def _execute(self, pending: deque[_Work]) -> None:
        live: dict[Connection, _Work] = {}
        waiting_for = None
        try:
            while pending or live:
                while pending and self.slots.fits(pending[0].probe.peak):
                    work = pending.popleft()
                    live[self._start(work)] = work
                if pending and waiting_for is not pending[0] and self._short_of_memory():
                    waiting_for = pending[0]
                    self._echo_waiting(waiting_for)
                for conn in wait(list(live)):
                    self._receive(conn, live)
        finally:  # interrupted: stop the conversions still running
            _stop([work.process for work in live.values()])

    def _start(self, work: _Work) -> Connection:
        self.slots.take(work.probe.peak)
        receiver, sender = self.context.Pipe(duplex=False)
        work.process = self.context.Process(
            target=_convert_one,
            args=(asdict(work.entry), str(self.library.root), sender, self.slots.jobs),
            name=f"convert {work.entry.name}",
        )
        work.started = time.perf_counter()
        work.process.start()
        sender.close()  # the child holds the only writer: its exit is our end of file
        peak = f", ~{humanize.size(work.probe.peak)} peak" if work.probe.peak else ""
        self.echo(work.index, _display(work.entry.name),
                  f"converting {work.entry.source} ({work.entry.precision}{peak})")  # fmt: skip
        return receiver

    def _short_of_memory(self) -> bool:
        """The next entry does not fit although a job slot is free."""
        return len(self.slots.running) < self.slots.jobs

    def _echo_waiting(self, work: _Work) -> None:
        left = max(0, (self.slots.memory or 0) - sum(self.slots.running))
        self.echo(work.index, _display(work.entry.name),
                  f"waiting for memory (needs ~{humanize.size(work.probe.peak)}, "
                  f"~{humanize.size(left)} left)")  # fmt: skip

    def _receive(self, conn: Connection, live: dict[Connection, _Work]) -> None:
        work = live[conn]
        try:
            kind, value = conn.recv()
        except EOFError:  # the process ended
            work.process.join()
            conn.close()
            del live[conn]
            self.slots.release(work.probe.peak)
            self._finish(work)
            return
        if kind == "step":
            self.echo(work.index, _display(work.entry.name), value)
        else:
            work.outcome = (kind, value)

    def _finish(self, work: _Work) -> None:
        seconds = round(time.perf_counter() - work.started, 3)
        kind, value = work.outcome or ("failed", _died(work.process.exitcode))
        self._record(work, kind, value, seconds, socket.gethostname())

    def _record(self, work: _Work, kind: str, value: Any, seconds: float, node: str | None) -> None:
        result = EntryResult(_display(work.entry.name), work.probe.source, kind, seconds, node=node)
        if kind == "converted":
            result.size, result.digest = value["size"], value["digest"]
            text = f"converted in {seconds:.1f}s ({humanize.size(result.size)})"
        else:
            result.error = value
            text = f"failed in {seconds:.1f}s: {value}"
        self.results[work.index] = result
        self.echo(work.index, result.name, text)


class _RayRunner(_Runner):
    """Entries as Ray tasks. Each declares its estimated peak as `memory` and one CPU, so Ray
    places it on a node with that much unreserved; the library directory is shared by the
    nodes. A task whose worker or node dies is retried once (max_retries), an ordinary
    conversion error never is (retry_exceptions=False: it would fail the same way again)."""

    def __init__(self, library: Library, address: str, echo: _Echo):
        super().__init__(library, Slots(1, None), echo)
        self.address = address

    def _execute(self, pending: deque[_Work]) -> None:
        try:
            import ray
        except ImportError as exc:
            raise InvalidRequest(f"ray_address needs the ray extra: pip install 'ortserve[ray]' "
                                 f"({exc})", param="ray_address") from exc  # fmt: skip
        connected_here = not ray.is_initialized()  # else the caller's connection is used
        if connected_here:
            try:
                ray.init(address=None if self.address == "local" else self.address,
                         namespace="ortserve", log_to_driver=False)  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SourceUnavailable(f"cannot reach the Ray cluster at {self.address!r}: "
                                        f"{' '.join(str(exc).split())}") from exc  # fmt: skip
        try:
            self._run_tasks(ray, pending)
        finally:
            if connected_here:
                ray.shutdown()

    def _run_tasks(self, ray: Any, pending: deque[_Work]) -> None:
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]),
                      default=0)  # fmt: skip
        task = ray.remote(_convert_on_ray)
        live = {self._submit(task, work, largest): work for work in pending}
        try:
            while live:
                done, _ = ray.wait(list(live), num_returns=1)
                for ref in done:
                    self._collect(ray, ref, live.pop(ref))
        finally:  # interrupted: the cluster stops converting for us
            for ref in live:
                ray.cancel(ref, force=True)

    def _submit(self, task: Any, work: _Work, largest: int) -> Any:
        # An entry bigger than every node still gets its chance on the largest, as locally
        # it runs alone: a need no node has would wait forever.
        memory = min(work.probe.peak, largest) if largest else work.probe.peak
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 1, "retry_exceptions": False,
                                   "name": f"convert {_display(work.entry.name)}"}  # fmt: skip
        if memory > 0:
            options["memory"] = memory
        env = {k: os.environ[k] for k in _RAY_ENV if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
        work.started = time.perf_counter()
        need = f", ~{humanize.size(memory)} memory" if memory else ""
        self.echo(work.index, _display(work.entry.name),
                  f"submitted to Ray: {work.entry.source} ({work.entry.precision}{need})")  # fmt: skip
        return task.options(**options).remote(asdict(work.entry), str(self.library.root))

    def _collect(self, ray: Any, ref: Any, work: _Work) -> None:
        from ray.exceptions import RayError, RayTaskError

        try:
            kind, value, node, seconds = ray.get(ref)
        except RayTaskError as exc:  # raised outside convert_entry's own handling
            kind, value, node = "failed", _one_line(exc.cause or exc), None
            seconds = round(time.perf_counter() - work.started, 3)
        except RayError as exc:  # its worker or node died, twice
            kind, node = "failed", None
            value = f"its Ray worker died, also when retried: {_one_line(exc)}"
            seconds = round(time.perf_counter() - work.started, 3)
        self._record(work, kind, value, seconds, node)


# What the driver's environment says about WHICH hub to convert from, for the tasks (secrets
# such as HF_TOKEN are not sent: runtime_env is visible in Ray's dashboard).
_RAY_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "ORTSERVE_DEBUG")


def _convert_on_ray(entry: dict[str, Any], root: str) -> tuple[str, Any, str, float]:
    """A Ray task: convert_entry, and the node it ran on."""
    import ray

    started = time.perf_counter()
    kind, value = convert_entry(entry, root, Progress(STEPS, "", enabled=False))
    node = ray.get_runtime_context().get_node_id()
    return kind, value, node, round(time.perf_counter() - started, 3)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the conversion process was killed ({name}; out of memory?)"
    return f"the conversion process exited with code {exitcode} without a result"


def _stop(processes: list[Any], grace_s: float = 10) -> None:
    """Terminate, then kill what is still running after `grace_s`."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()  # its own helper processes exit when they see it gone
            process.join()


def _display(name: str) -> str:
    return ModelName.parse(name).display


# ---- the entry's own process -----------------------------------------------------------------


class _StepSender(Progress):
    """convert()'s reporter in an entry's process: each step's name goes to the batch."""

    def __init__(self, conn: Connection):
        super().__init__(STEPS, "", enabled=False)
        self.conn = conn

    @contextmanager
    def step(self, name: str):
        self.conn.send(("step", name))
        with super().step(name):
            yield


def _convert_one(entry: dict[str, Any], root: str, conn: Connection, jobs: int) -> None:
    """In a spawned process: convert one entry and send its outcome through `conn`."""
    from converters.isolated import _watch_parent

    # The batch was killed: stop converting. An interrupted batch terminates this process
    # outright (its helpers follow): the library removes staging whose process is gone.
    _watch_parent(os.getppid())
    # parallel entries share the cores instead of each spawning a thread per core
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    try:
        conn.send(convert_entry(entry, root, _StepSender(conn)))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole batch; the parent reports it
        pass
    finally:
        conn.close()


def convert_entry(entry: dict[str, Any], root: str, progress: Progress) -> tuple[str, Any]:
    """Convert one entry into the library at `root`: ("converted", {size, digest}) or
    ("failed", message). An entry's process and a Ray task both run this."""
    spec = BatchEntry(**entry)
    try:
        info = convert(spec.source, spec.name, library=Library(root),
                       progress=progress, **spec.convert_options())  # fmt: skip
        return "converted", {"size": info.size, "digest": info.digest}
    except OrtServeError as exc:
        return "failed", exc.message
    except Exception as exc:  # a bug or a library's own error: the message, not a traceback
        if os.environ.get("ORTSERVE_DEBUG"):
            traceback.print_exc()
        return "failed", f"{type(exc).__name__}: {exc}"


# ---- command line ----------------------------------------------------------------------------


def run_and_print(
    spec: str | os.PathLike[str],
    *,
    jobs: int | None = None,
    report: str | os.PathLike[str] | None = None,
    library: Library | None = None,
    ray_address: str | None = None,
    publish: Publish | None = None,
) -> int:
    """Run a spec file, print the summary table and the report's path; the exit code."""
    batch = run(spec, library=library, jobs=1 if jobs is None else jobs, report=report,
                ray_address=ray_address, publish=publish)  # fmt: skip
    print(batch.table())
    if ray_address is not None:
        split = ", ".join(f"{_short_node(n)}: {count}" for n, count in batch.nodes().items())
        print(f"entries per node: {split or 'none ran'}")
    if batch.path:
        print(f"report: {batch.path}")
    return 0 if batch.ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m converters.batch SPEC [--jobs N] [--report PATH]`."""
    parser = argparse.ArgumentParser(prog="python -m converters.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("spec", help="batch spec, YAML or JSON")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="parallel conversions")
    parser.add_argument("--report", help=f"JSON report path (default: {REPORT_NAME} by the spec)")
    parser.add_argument("--ray", metavar="ADDRESS|auto", help="run the entries on a Ray cluster")
    args = parser.parse_args(argv)
    try:
        return run_and_print(args.spec, jobs=args.jobs, report=args.report, ray_address=args.ray)
    except OrtServeError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run the importable module's main, so the entries it pickles for spawn resolve there
    from converters.batch import main as _main

    sys.exit(_main())
