"""`ortserve batch INPUT -o OUTPUT`: a file of OpenAI batch lines, run offline (docs/batch.md).

Each line runs through the app `ortserve serve` runs, in-process (api/batchexec.py), with as
many lines in flight as a model has parallel slots, so the engine batches them; with `--ray`
the lines are spread over a Ray cluster's nodes instead (cluster/batch.py). Either way the
records go to sidecar files as they come (OUTPUT.partial, OUTPUT.errors.partial: appended and
flushed one by one), and OUTPUT is written whole, in input order, only once every line is done
(a temporary file renamed over it): it is absent, or as a previous run left it, or complete.
A rerun with the same OUTPUT skips the lines already in OUTPUT or in the sidecars.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ortserve.config import Settings
from ortserve.errors import InvalidRequest
from ortserve.library.store import atomic_file
from ortserve.serving.batchlines import (
    BadLine,
    BatchLine,
    RecordFile,
    Results,
    check_jsonl,
    line_number,
    parse_lines,
    run_lines,
    succeeded,
)

Line = BatchLine | BadLine


class Runner(Protocol):
    """Where lines run: here (LocalRunner) or on a Ray cluster (cluster.batch.RayRunner)."""

    concurrency: int  # lines in flight at once
    nodes: dict[str, int]  # lines run per node (empty when local)

    def __call__(self, line: BatchLine) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class Summary:
    """What a run did: the counts cover every line of the input, `ran` this call's share."""

    total: int
    ok: int
    failed: int
    ran: int
    seconds: float  # running this call's lines, after their models were loaded
    complete: bool
    nodes: dict[str, int] = field(default_factory=dict)

    @property
    def lines_per_s(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.total} lines: {self.ok} ok, {self.failed} failed "
                f"(ran {self.ran} in {self.seconds:.1f} s, {self.lines_per_s:.1f} lines/s)")  # fmt: skip


def sidecars(output: Path) -> tuple[Path, Path]:
    """The files a run appends its records to until OUTPUT is written."""
    name = output.name
    return output.with_name(name + ".partial"), output.with_name(name + ".errors.partial")


def run_batch(
    input_path: Path,
    output: Path,
    *,
    settings: Settings,
    errors: Path | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> Summary:
    """Run every line of `input_path` not done yet; write OUTPUT (and `errors`) once all are.

    OUTPUT takes every record, answers and failures, unless `errors` is given: then OUTPUT
    takes the 2xx answers and `errors` the rest, as OpenAI's batches do."""
    if errors is not None and errors.resolve() == output.resolve():
        raise InvalidRequest("--errors must be another file than the output", param="errors")
    check_jsonl(input_path)  # not JSONL, or a custom_id twice: refused whole, naming the line
    lines = {line.number: line for line in parse_lines(input_path)}
    results = Results(*sidecars(output))
    try:
        _check_records(results.output.records + results.errors.records, lines, results.output.path)
        _adopt(results, lines, [p for p in (output, errors) if p is not None])
        done = results.done()
        pending = [line for number, line in lines.items() if number not in done]
        summary = _run(pending, results, settings, ray_address, progress, already=len(done))
    finally:
        results.close()
    summary.total = len(lines)
    if summary.complete:
        summary.ok, summary.failed = _finish(output, errors)
    else:
        summary.ok, summary.failed = results.completed, results.failed
    return summary


def _run(
    pending: list[Line],
    results: Results,
    settings: Settings,
    ray_address: str | None,
    progress: bool,
    *,
    already: int,
) -> Summary:
    """Run `pending` on a runner, with a progress bar; stop cleanly on SIGINT/SIGTERM."""
    summary = Summary(total=0, ok=0, failed=0, ran=len(pending), seconds=0.0, complete=True)
    to_run = [line for line in pending if isinstance(line, BatchLine)]
    if not to_run:  # nothing needs a model: no engine, no cluster
        run_lines(pending, _unreachable, results, concurrency=1)
        return summary
    runner = _runner(settings, ray_address, _models(to_run))
    try:
        from tqdm import tqdm

        with tqdm(total=already + len(pending), initial=already, unit="line", file=sys.stderr,
                  disable=None if progress else True) as bar, _stop_signals() as stop:  # fmt: skip
            started = time.perf_counter()
            summary.complete = run_lines(pending, runner, results, concurrency=runner.concurrency,
                                         stopping=stop.is_set,
                                         on_record=lambda record: bar.update(1))  # fmt: skip
            summary.seconds = time.perf_counter() - started
        summary.nodes = dict(runner.nodes)
    finally:
        runner.close()
    if not summary.complete:
        summary.ran = sum(1 for line in pending if line.number in results.done())
    return summary


def _runner(settings: Settings, ray_address: str | None, models: list[str]) -> Runner:
    if ray_address is None:
        return LocalRunner(settings, models)
    try:
        from ortserve.cluster.batch import RayRunner
    except ImportError as exc:
        raise InvalidRequest(f"--ray needs the ray extra: pip install 'ortserve[ray]' ({exc})",
                             param="ray") from None  # fmt: skip
    return RayRunner(None if ray_address == "local" else ray_address, settings, models)


class LocalRunner:
    """The app in this process, its models loaded before the clock starts; as many lines in
    flight as a model has slots, at normal priority (no interactive turn to leave one for)."""

    def __init__(self, settings: Settings, models: list[str]):
        from ortserve.api import create_app
        from ortserve.api.batchexec import LineExecutor

        settings.models.mkdir(parents=True, exist_ok=True)
        self.app = create_app(settings)
        self.execute = LineExecutor(self.app, background=False)
        if len(models) <= settings.max_loaded_models:  # more would evict each other anyway
            self.execute.preload(models)
        self.concurrency = settings.num_parallel
        self.nodes: dict[str, int] = {}

    def __call__(self, line: BatchLine) -> dict[str, Any]:
        return self.execute(line)

    def close(self) -> None:
        from ortserve.api.state import EXTENSION

        self.app.extensions[EXTENSION].shutdown()


def _models(lines: list[BatchLine]) -> list[str]:
    """The models the lines name, in order of first use."""
    names = (line.body.get("model") for line in lines)
    return list(dict.fromkeys(name for name in names if isinstance(name, str) and name))


def _unreachable(line: BatchLine) -> dict[str, Any]:
    raise AssertionError("only bad lines were left to run")


# ---- resuming ----------------------------------------------------------------------------------


def _check_records(records: list[dict[str, Any]], lines: dict[int, Line], path: Path) -> None:
    """Records left by a run of another input must not be taken for this one's."""
    for record in records:
        number = line_number(record)
        line = lines.get(number) if number is not None else None
        if line is None or line.custom_id != record.get("custom_id"):
            raise InvalidRequest(f"{path} holds an answer to another input ({record.get('id')}, "
                                 f"custom_id {record.get('custom_id')!r}): remove it, or choose "
                                 "another output", param="output")  # fmt: skip


def _adopt(results: Results, lines: dict[int, Line], paths: list[Path]) -> None:
    """The records of a previous run's OUTPUT (and error file) count as done: copied into the
    sidecars, so the new OUTPUT holds them too. A file that is not this input's output is
    refused, never overwritten."""
    done = results.done()
    for path in paths:
        records = list(_read_records(path))
        _check_records(records, lines, path)
        for record in records:
            if line_number(record) not in done:
                results.write(record)
                done.add(line_number(record))  # type: ignore[arg-type]


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise InvalidRequest(f"{path} exists and is not a batch output (line {number}): "
                                     "remove it, or choose another output", param="output")  # fmt: skip
            yield record


def _finish(output: Path, errors: Path | None) -> tuple[int, int]:
    """Write OUTPUT (and the error file) whole from the sidecars, then drop the sidecars.
    Returns (ok, failed)."""
    records = []
    for path in sidecars(output):
        sidecar = RecordFile(path)
        sidecar.close()
        records += sidecar.records
    records.sort(key=lambda record: line_number(record) or 0)
    answers = [r for r in records if succeeded(r)]
    if errors is None:
        _write_atomically(output, records)
    else:
        _write_atomically(output, answers)
        _write_atomically(errors, [r for r in records if not succeeded(r)])
    for path in sidecars(output):
        path.unlink(missing_ok=True)
    return len(answers), len(records) - len(answers)


def _write_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_file(path) as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the event: the lines in flight finish and are written, no new line
    starts. A second signal stops at once (the sidecars still hold every finished line)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping: finishing the lines in flight (again to stop now)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_report(summary: Summary, echo: Callable[[str], None]) -> None:
    """The summary line, and with --ray the lines each node ran."""
    echo(summary.line())
    if summary.nodes:
        split = ", ".join(f"{node[:12]} {count}" for node, count in sorted(summary.nodes.items()))
        echo(f"lines per node: {split}")
