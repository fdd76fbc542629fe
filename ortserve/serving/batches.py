"""The Batch API's files and batches on disk, and the runner that works through them.

Flask-free: api/batch.py maps HTTP onto BatchStore, and gives BatchRunner a way to run one
line (`execute_factory(owner)` -> a callable, api/batchexec.LineExecutor) so that nothing
here knows about the app.

Layout under the library root (ORTSERVE_MODELS):

    batches/files/<file_id>.json       a file's metadata (its owner included)
    batches/files/<file_id>.jsonl      its content
    batches/jobs/<batch_id>/job.json   a batch: OpenAI's object and its owner
    batches/jobs/<batch_id>/input.jsonl, output.jsonl, errors.jsonl
    batches/jobs/<batch_id>/run.lock   held by the process running it (one at a time)
    batches/tmp/                       uploads being written

Every metadata write is atomic (a temporary file renamed into place); the record files are
appended and fsynced line by line (batchlines.RecordFile), so a restart resumes a batch where
it stopped and runs no line twice into the output. Each file and batch belongs to the API key
that made it: another key is told it does not exist (404), as OpenAI does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock, Timeout

from ortserve.errors import InvalidRequest, OrtServeError
from ortserve.library.store import read_json, write_json_atomic
from ortserve.serving.batchlines import (
    SUPPORTED_URLS,
    Execute,
    Results,
    check_jsonl,
    failure_record,
    parse_lines,
    run_lines,
    succeeded,
)

log = logging.getLogger("ortserve.batch")

MAX_BATCH_LINES = 50_000  # OpenAI's cap on the requests of one batch
COMPLETION_WINDOWS = {"24h": 24 * 3600}  # OpenAI's only window
UPLOAD_PURPOSES = ("batch",)  # batch_output files are made by the server only
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
_ID = re.compile(r"^(file|batch)[-_][A-Za-z0-9]{1,64}$")
_CHUNK = 1 << 20
_SAVE_EVERY_S = 0.5  # how often a running batch's request_counts reach job.json
_CANCEL_POLL_S = 0.5  # how often a running batch looks for a cancel from another process


class FileNotFound(OrtServeError):
    """OpenAI's answer for a file id this key cannot see."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, file_id: str, param: str = "id"):
        super().__init__(f"No such File object: {file_id}", param=param)


class BatchNotFound(OrtServeError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, batch_id: str):
        super().__init__(f"No batch found with id '{batch_id}'.", param="batch_id")


class BatchConflict(OrtServeError):
    """An action the batch's status does not allow (cancelling a completed batch)."""

    status = 409
    type = "invalid_request_error"


class FileTooLarge(OrtServeError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(
            f"file is larger than {limit} bytes (the limit is ORTSERVE_MAX_BATCH_FILE_BYTES)",
            param="file",
        )


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class BatchStore:
    """Files and batches under `root` (the library root), each owned by an API key name
    (`""` when the server asks no key)."""

    def __init__(self, root: Path, *, max_file_bytes: int, max_lines: int = MAX_BATCH_LINES):
        self.dir = Path(root) / "batches"
        self.files_dir = self.dir / "files"
        self.jobs_dir = self.dir / "jobs"
        self.tmp_dir = self.dir / "tmp"
        self.max_file_bytes = max_file_bytes
        self.max_lines = max_lines

    # ---- files ---------------------------------------------------------------------------

    def add_file(self, stream: BinaryIO, filename: str, purpose: str, owner: str) -> dict:
        """Store an upload: streamed to disk within the size limit, then checked to be JSONL
        (400 naming the first bad line); nothing is kept if either fails."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, not {purpose!r}",
                param="purpose",
            )
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        temp = self.tmp_dir / f"upload-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            size = self._write_limited(stream, temp)
            lines = check_jsonl(temp)
            if lines > self.max_lines:
                raise InvalidRequest(
                    f"the file has {lines} lines; a batch takes at most {self.max_lines}",
                    param="file",
                )
            file_id = new_id("file-")
            meta = _file_meta(file_id, filename, purpose, size, owner, lines=lines)
            self.files_dir.mkdir(parents=True, exist_ok=True)
            os.replace(temp, self._content(file_id))
        finally:
            temp.unlink(missing_ok=True)
        write_json_atomic(self._meta(file_id), meta)
        return public_file(meta)

    def _write_limited(self, stream: BinaryIO, path: Path) -> int:
        size = 0
        with open(path, "wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise FileTooLarge(self.max_file_bytes)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return size

    def file(self, file_id: str, owner: str) -> dict:
        return public_file(self._file_meta(file_id, owner))

    def file_content(self, file_id: str, owner: str) -> Path:
        self._file_meta(file_id, owner)
        return self._content(file_id)

    def list_files(self, owner: str, purpose: str | None = None) -> list[dict]:
        """The key's files, newest first."""
        metas = (read_json(p) for p in _glob(self.files_dir, "*.json"))
        mine = [m for m in metas if m and m.get("owner") == owner]
        if purpose is not None:
            mine = [m for m in mine if m["purpose"] == purpose]
        return [public_file(m) for m in sorted(mine, key=_newest_first)]

    def delete_file(self, file_id: str, owner: str) -> dict:
        self._file_meta(file_id, owner)
        self._meta(file_id).unlink(missing_ok=True)  # gone for clients from here on
        self._content(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def _file_meta(self, file_id: str, owner: str, param: str = "id") -> dict:
        meta = read_json(self._meta(file_id)) if _ID.match(file_id) else None
        if meta is None or meta.get("owner") != owner:
            raise FileNotFound(file_id, param)
        return meta

    def _meta(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.json"

    def _content(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def _publish(self, source: Path, file_id: str, filename: str, owner: str) -> str:
        """A file the server made (a batch's output or errors) as a /v1/files entry; again
        after a crash, the same id is written over."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        temp = self.tmp_dir / f"publish-{os.getpid()}-{secrets.token_hex(8)}"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, temp)  # no copy: the record file is complete and never appended to
        except OSError:
            shutil.copyfile(source, temp)
        os.replace(temp, self._content(file_id))
        size = self._content(file_id).stat().st_size
        write_json_atomic(self._meta(file_id),
                           _file_meta(file_id, filename, "batch_output", size, owner))  # fmt: skip
        return file_id

    # ---- batches -------------------------------------------------------------------------

    def create_batch(
        self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
        metadata: dict[str, str] | None = None,
    ) -> dict:  # fmt: skip
        """A batch of an uploaded file, in `validating` until the runner takes it."""
        if endpoint not in SUPPORTED_URLS:
            raise InvalidRequest(
                f"endpoint must be one of {', '.join(SUPPORTED_URLS)}, not {endpoint!r}",
                param="endpoint",
            )
        window = COMPLETION_WINDOWS.get(completion_window)
        if window is None:
            raise InvalidRequest(f"completion_window must be 24h, not {completion_window!r}",
                                 param="completion_window")  # fmt: skip
        source = self._file_meta(input_file_id, owner, "input_file_id")
        if source["purpose"] != "batch":
            raise InvalidRequest(f"file {input_file_id} has purpose {source['purpose']!r}, "
                                 "not 'batch'", param="input_file_id")  # fmt: skip
        batch_id = new_id("batch_")
        folder = self.jobs_dir / batch_id
        folder.mkdir(parents=True)
        # the batch keeps its input even if the file is deleted while it runs
        _link_or_copy(self._content(input_file_id), folder / "input.jsonl")
        now = int(time.time())
        batch = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window,
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + window,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": source.get("lines", 0), "completed": 0, "failed": 0},
            "metadata": metadata or None,
        }  # fmt: skip
        write_json_atomic(folder / "job.json", {"owner": owner, "batch": batch})
        return batch

    def batch(self, batch_id: str, owner: str) -> dict:
        return self._job(batch_id, owner)["batch"]

    def list_batches(self, owner: str) -> list[dict]:
        """The key's batches, newest first."""
        jobs = (read_json(p) for p in _glob(self.jobs_dir, "*/job.json"))
        mine = [j["batch"] for j in jobs if j and j.get("owner") == owner]
        return sorted(mine, key=_newest_first)

    def cancel(self, batch_id: str, owner: str) -> dict:
        """Ask the runner to stop starting lines; what was done is still published."""
        self._job(batch_id, owner)
        with self._locked(batch_id):
            batch = self._job(batch_id, owner)["batch"]
            if batch["status"] in ("cancelling", "cancelled"):
                return batch
            if batch["status"] not in ("validating", "in_progress"):
                raise BatchConflict(f"Cannot cancel a batch with status '{batch['status']}'.")
            return self._save(batch_id, status="cancelling", cancelling_at=int(time.time()))

    def pending(self) -> list[str]:
        """Batches not finished yet, oldest first: the runner's work."""
        jobs = (read_json(p) for p in _glob(self.jobs_dir, "*/job.json"))
        active = [j["batch"] for j in jobs if j and j["batch"]["status"] in ACTIVE]
        return [b["id"] for b in sorted(active, key=lambda b: b["created_at"])]

    def update(self, batch_id: str, **fields: Any) -> dict:
        """Set fields of a batch (read, changed and written under its lock)."""
        with self._locked(batch_id):
            return self._save(batch_id, **fields)

    def status(self, batch_id: str) -> str:
        return self._load(batch_id)["batch"]["status"]

    def job_dir(self, batch_id: str) -> Path:
        return self.jobs_dir / batch_id

    def owner(self, batch_id: str) -> str:
        return self._load(batch_id)["owner"]

    def _job(self, batch_id: str, owner: str) -> dict:
        job = read_json(self.jobs_dir / batch_id / "job.json") if _ID.match(batch_id) else None
        if job is None or job.get("owner") != owner:
            raise BatchNotFound(batch_id)
        return job

    def _load(self, batch_id: str) -> dict:
        job = read_json(self.jobs_dir / batch_id / "job.json")
        if job is None:
            raise BatchNotFound(batch_id)
        return job

    def outcome(self, batch_id: str) -> str | None:
        """The status a finalizing batch ends in (kept beside OpenAI's object)."""
        return self._load(batch_id).get("outcome")

    def _save(self, batch_id: str, outcome: str | None = None, **fields: Any) -> dict:
        job = self._load(batch_id)
        job["batch"].update(fields)
        if outcome is not None:
            job["outcome"] = outcome
        write_json_atomic(self.jobs_dir / batch_id / "job.json", job)
        return job["batch"]

    @contextlib.contextmanager
    def _locked(self, batch_id: str) -> Iterator[None]:
        """One read-change-write of job.json at a time, across threads and processes."""
        with FileLock(self.jobs_dir / batch_id / "job.lock"):
            yield


def public_file(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("owner", "lines")}


def _file_meta(file_id: str, filename: str, purpose: str, size: int, owner: str,
               lines: int | None = None) -> dict:  # fmt: skip
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None, "owner": owner, "lines": lines}  # fmt: skip


def _newest_first(item: dict) -> tuple[int, str]:
    return (-int(item["created_at"]), item["id"])


def _glob(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern)) if folder.is_dir() else []


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(source, target)


def page(items: list[dict], limit: int, after: str | None) -> dict:
    """OpenAI's cursor page: `limit` items after the one whose id is `after`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    chosen = items[:limit]
    return {"object": "list", "data": chosen, "has_more": len(items) > limit,
            "first_id": chosen[0]["id"] if chosen else None,
            "last_id": chosen[-1]["id"] if chosen else None}  # fmt: skip


# ---- the runner --------------------------------------------------------------------------------


class _Records(Results):
    """Results that, while the server stops, drop failures: a turn cut short by the shutdown
    is not the line's answer, and the line runs again when the batch resumes."""

    def __init__(self, output: Path, errors: Path, stopping: Callable[[], bool]):
        super().__init__(output, errors)
        self._stopping = stopping

    def write(self, record: dict[str, Any]) -> None:
        if self._stopping() and not succeeded(record):
            return
        super().write(record)


class BatchRunner:
    """One thread per server process working through pending batches, oldest first.

    A batch is run by one process at a time (its run.lock); a process that starts finds the
    batches left unfinished and resumes them.
    """

    def __init__(
        self, store: BatchStore, execute_factory: Callable[[str | None], Execute], *,
        concurrency: int, poll_s: float = 5.0,
    ):  # fmt: skip
        self.store = store
        self.execute_factory = execute_factory
        self.concurrency = max(1, concurrency)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="ortserve-batches",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def wake(self) -> None:
        """Look for work now (a batch was made or cancelled)."""
        self._wake.set()

    def stop(self, timeout: float = 0.0) -> None:
        """Start no more lines; lines in flight end with the runtime's own shutdown."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            for batch_id in self.store.pending():
                if self._stop.is_set():
                    return
                try:
                    self.run_one(batch_id)
                except Exception:  # noqa: BLE001 - one batch's failure must not stop the others
                    log.exception("batch %s could not be run", batch_id)
            self._wake.wait(self.poll_s)

    def run_one(self, batch_id: str) -> bool:
        """Run (or resume, or finish) one batch; False when another process runs it."""
        lock = FileLock(self.store.job_dir(batch_id) / "run.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            _Run(self, batch_id).go()
        finally:
            lock.release()
        return True


class _Run:
    """One pass over one batch by the runner."""

    def __init__(self, runner: BatchRunner, batch_id: str):
        self.runner = runner
        self.store = runner.store
        self.id = batch_id
        self.folder = self.store.job_dir(batch_id)
        self.input = self.folder / "input.jsonl"
        self._seen_status = ("", 0.0)
        self._saved_at = 0.0

    def go(self) -> None:
        batch = self.store.update(self.id)  # a fresh read, under the lock
        if batch["status"] == "validating" and not self._validate():
            return
        if self.store.status(self.id) in ("in_progress", "cancelling"):
            outcome = self._run_lines()
            if outcome is None:
                return  # the server is stopping: the batch resumes at the next start
        else:
            outcome = self.store.outcome(self.id) or "completed"
        self._finalize(outcome)

    def _validate(self) -> bool:
        try:
            total = check_jsonl(self.input)
        except (OSError, OrtServeError) as exc:
            message = exc.message if isinstance(exc, OrtServeError) else "the input file is gone"
            error = {"code": "invalid_file", "message": message, "param": "input_file_id",
                     "line": None}  # fmt: skip
            now = int(time.time())
            self.store.update(self.id, status="failed", failed_at=now,
                              errors={"object": "list", "data": [error]})  # fmt: skip
            return False
        now = int(time.time())
        counts = {"total": total, "completed": 0, "failed": 0}
        with self.store._locked(self.id):  # a cancel may have come meanwhile: keep it
            if self.store.status(self.id) == "validating":
                self.store._save(self.id, status="in_progress", in_progress_at=now,
                                 request_counts=counts)  # fmt: skip
            else:
                self.store._save(self.id, in_progress_at=now, request_counts=counts)
        return True

    def _run_lines(self) -> str | None:
        """Run what is left; the batch's outcome, or None when the server stops."""
        batch = self.store.update(self.id)
        owner = self.store.owner(self.id)
        results = _Records(self.folder / "output.jsonl", self.folder / "errors.jsonl",
                           lambda: self.runner.stopping)  # fmt: skip
        try:
            run_lines(
                parse_lines(self.input), self.runner.execute_factory(owner or None), results,
                concurrency=self.runner.concurrency,
                stopping=lambda: self._should_stop(batch["expires_at"]),
                on_record=lambda record: self._progress(results),
            )  # fmt: skip
            if self.runner.stopping:
                self._progress(results, force=True)
                return None
            outcome = "completed"
            if self._cancelled(fresh=True):
                outcome = "cancelled"
            elif time.time() >= batch["expires_at"]:
                outcome = "expired"
                self._expire_rest(results)
            self._progress(results, force=True)
        finally:
            results.close()
        return outcome

    def _should_stop(self, expires_at: float) -> bool:
        return self.runner.stopping or time.time() >= expires_at or self._cancelled()

    def _cancelled(self, fresh: bool = False) -> bool:
        """Whether a cancel came (read from job.json at most every _CANCEL_POLL_S seconds:
        the cancel may have come to another process)."""
        status, read_at = self._seen_status
        if fresh or time.monotonic() - read_at >= _CANCEL_POLL_S:
            status = self.store.status(self.id)
            self._seen_status = (status, time.monotonic())
        return status == "cancelling"

    def _expire_rest(self, results: Results) -> None:
        """OpenAI's expiry: every line not run gets an error record, batch_expired."""
        done = results.done()
        message = "This request could not be executed before the completion window expired."
        for line in parse_lines(self.input):
            if line.number not in done:
                results.write(failure_record(line.number, line.custom_id, "batch_expired", message))

    def _progress(self, results: Results, *, force: bool = False) -> None:
        """request_counts to job.json, at most once a second while lines finish."""
        now = time.monotonic()
        if not force and now - self._saved_at < _SAVE_EVERY_S:
            return
        self._saved_at = now
        with self.store._locked(self.id):
            counts = dict(self.store._load(self.id)["batch"]["request_counts"])
            counts.update(completed=results.completed, failed=results.failed)
            self.store._save(self.id, request_counts=counts)

    def _finalize(self, outcome: str) -> None:
        """Publish the output and error files, then the final status (again after a crash:
        the file ids are the batch's own, so a second pass writes the same entries)."""
        now = int(time.time())
        batch = self.store.update(self.id)
        if batch["status"] != "finalizing":
            batch = self.store.update(self.id, status="finalizing", finalizing_at=now,
                                      outcome=outcome)  # fmt: skip
        owner = self.store.owner(self.id)
        suffix = self.id.removeprefix("batch_")
        files = {}
        for name, key, kind in (("output.jsonl", "output_file_id", "output"),
                                ("errors.jsonl", "error_file_id", "error")):  # fmt: skip
            path = self.folder / name
            if path.is_file() and path.stat().st_size > 0:
                files[key] = self.store._publish(path, f"file-{suffix}{kind}",
                                                 f"{self.id}_{kind}.jsonl", owner)  # fmt: skip
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at",
                 "expired": "expired_at"}[outcome]  # fmt: skip
        self.store.update(self.id, status=outcome, **{stamp: int(time.time())}, **files)
        for name in ("output.jsonl", "errors.jsonl"):  # published: one copy is enough
            (self.folder / name).unlink(missing_ok=True)
        log.info("batch %s %s: %s", self.id, outcome, batch["request_counts"])
