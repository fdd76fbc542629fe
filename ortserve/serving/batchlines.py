"""OpenAI's batch line format, and the runner that executes a file of lines resumably.

Shared by the server's Batch API (api/batch.py), `ortserve batch` and its Ray variant
(cluster/batch.py): one input format, one output format, one way to resume.

Input, one JSON object per line (OpenAI's):
    {"custom_id": "a-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output (the output file takes 2xx answers, the error file every other one):
    {"id": "batch_req_<n>", "custom_id": "a-1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}
A line that cannot be run at all (not an object, no custom_id, an unsupported url) has
`"response": null` and `"error": {"code", "message"}` naming the line.

Resuming: a record's id ends with its line number, and records are appended and flushed one
by one, so after a crash the lines already written are known and none is run twice.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ortserve.errors import InvalidRequest

# What a line may address: the endpoints whose answers are one JSON body.
SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_CUSTOM_ID_CHARS = 512  # OpenAI's limit


@dataclass(frozen=True)
class BatchLine:
    """One line that can be run: its number in the file (from 1) and its request."""

    number: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    """One line that cannot be run, and why: it fails alone, into the error file."""

    number: int
    custom_id: str | None
    message: str


def read_objects(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) per non-blank line; InvalidRequest naming the first line
    that is not JSON (a file that is not JSONL is refused whole, at upload)."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"line {number} is not JSON: {exc}", param="file") from None


def check_jsonl(path: Path) -> int:
    """The number of lines of a batch input file, or InvalidRequest naming its first line that
    is not a JSON object, or a custom_id used twice (resuming needs them unique)."""
    seen: set[str] = set()
    count = 0
    for number, value in read_objects(path):
        if not isinstance(value, dict):
            raise InvalidRequest(f"line {number} is not a JSON object", param="file")
        custom_id = value.get("custom_id")
        if isinstance(custom_id, str):
            if custom_id in seen:
                message = (
                    f"line {number}: custom_id {custom_id!r} is used twice; each must be unique"
                )
                raise InvalidRequest(message, param="file")
            seen.add(custom_id)
        count += 1
    if count == 0:
        raise InvalidRequest("the file has no lines", param="file")
    return count


def parse_lines(path: Path) -> Iterator[BatchLine | BadLine]:
    """Every line of an input file, as a line to run or a line that fails alone."""
    for number, value in read_objects(path):
        yield parse_line(number, value)


def parse_line(number: int, value: Any) -> BatchLine | BadLine:
    if not isinstance(value, dict):
        return BadLine(number, None, f"line {number} is not a JSON object")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return BadLine(
            number, None, f"line {number}: custom_id must be a string of 1-512 characters"
        )
    method, url, body = value.get("method", "POST"), value.get("url"), value.get("body")
    problem = None
    if method != "POST":
        problem = f"method must be POST, not {method!r}"
    elif url not in SUPPORTED_URLS:
        problem = f"url must be one of {', '.join(SUPPORTED_URLS)}, not {url!r}"
    elif not isinstance(body, dict):
        problem = "body must be a JSON object"
    elif body.get("stream"):
        problem = "body.stream must be false in a batch: each answer is written whole"
    if problem is not None:
        return BadLine(number, custom_id, f"line {number}: {problem}")
    return BatchLine(number, custom_id, url, body)


# ---- records -----------------------------------------------------------------------------------


def record_id(number: int) -> str:
    return f"batch_req_{number}"


def line_number(record: dict[str, Any]) -> int | None:
    """The input line a written record answers (None for a record this format did not write)."""
    try:
        return int(str(record.get("id", "")).rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


def answer_record(line: BatchLine, status: int, body: Any, request_id: str | None) -> dict:
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": record_id(line.number), "custom_id": line.custom_id, "response": response,
            "error": None}  # fmt: skip


def failure_record(number: int, custom_id: str | None, code: str, message: str) -> dict:
    return {"id": record_id(number), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}  # fmt: skip


def succeeded(record: dict[str, Any]) -> bool:
    response = record.get("response") or {}
    return record.get("error") is None and 200 <= int(response.get("status_code") or 0) < 300


# ---- files that survive a crash ----------------------------------------------------------------


class RecordFile:
    """An append-only JSONL file of records, each flushed to the OS as it is written (a killed
    process loses none), and synced to disk at most every SYNC_EVERY_S (a power cut loses at
    most that much: those lines run again on resume, never twice).

    Opening it drops a last line cut short by a crash, and reports the records already there.
    """

    # an fsync per record (2 ms here) cost `ortserve batch` 25% of its speed
    SYNC_EVERY_S = 0.5

    def __init__(self, path: Path):
        self.path = path
        self.records = _complete_records(path)
        self._stream = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._synced = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self._stream.flush()
        if time.monotonic() - self._synced >= self.SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._stream.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._stream.closed:
            self.sync()
        self._stream.close()


def _complete_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line the crash cut: it was not done, so it runs again
        with open(path, "r+b") as stream:
            stream.truncate(end)
    records = []
    for raw in data[:end].splitlines():
        try:
            records.append(json.loads(raw))
        except ValueError:
            continue
    return records


class Results:
    """Where a run's records go: answers with 2xx to `output`, the rest to `errors`."""

    def __init__(self, output: Path, errors: Path):
        self._lock = threading.Lock()
        self.output, self.errors = RecordFile(output), RecordFile(errors)
        self.completed = len(self.output.records)
        self.failed = len(self.errors.records)
        numbers = (line_number(r) for r in self.output.records + self.errors.records)
        self._done = {n for n in numbers if n is not None}

    def done(self) -> set[int]:
        """The input lines answered (in either file), those written since opening included."""
        with self._lock:
            return set(self._done)

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            number = line_number(record)
            if number is not None:
                self._done.add(number)
            if succeeded(record):
                self.output.append(record)
                self.completed += 1
            else:
                self.errors.append(record)
                self.failed += 1

    def close(self) -> None:
        self.output.close()
        self.errors.close()


# ---- the runner --------------------------------------------------------------------------------

Execute = Callable[[BatchLine], dict[str, Any]]  # a line -> its record


def run_lines(
    lines: Iterable[BatchLine | BadLine],
    execute: Execute,
    results: Results,
    *,
    concurrency: int,
    stopping: Callable[[], bool] = lambda: False,
    on_record: Callable[[dict[str, Any]], None] = lambda record: None,
) -> bool:
    """Run every line not already done, `concurrency` at a time, each record written as it
    comes. Returns False when `stopping()` said to stop before every line was started (the
    lines in flight are finished and written first, so a resume starts cleanly)."""
    done = results.done()
    in_flight: set[Future] = set()

    def finish(future: Future) -> None:
        record = future.result()
        results.write(record)
        on_record(record)

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ortserve-batch") as pool:
        for line in lines:
            if line.number in done:
                continue
            if stopping():
                break
            if isinstance(line, BadLine):
                record = failure_record(
                    line.number, line.custom_id, "invalid_request", line.message
                )
                results.write(record)
                on_record(record)
                continue
            if len(in_flight) >= max(1, concurrency):
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                # the freed slot takes the next line before the records are written (a write
                # may wait for the disk: fsync), so the engine's slots never wait on a write
                in_flight.add(pool.submit(_guarded, execute, line))
                for future in finished:
                    finish(future)
                continue
            in_flight.add(pool.submit(_guarded, execute, line))
        else:
            for future in in_flight:
                finish(future)
            return True
        for future in in_flight:
            finish(future)
        return False


def _guarded(execute: Execute, line: BatchLine) -> dict[str, Any]:
    """A line's record; an unexpected failure fails that line alone."""
    try:
        return execute(line)
    except Exception as exc:  # noqa: BLE001 - one line's failure must not end the batch
        return failure_record(
            line.number, line.custom_id, "server_error", f"line {line.number}: {exc}"
        )
