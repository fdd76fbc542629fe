"""The Batch API's store and runner (serving/batches.py) with fake line executors: owners,
limits, statuses, resume without running a line twice, cancel, expiry, one runner per batch."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from filelock import FileLock

from ortserve.errors import InvalidRequest
from ortserve.serving.batches import (
    BatchConflict,
    BatchNotFound,
    BatchRunner,
    BatchStore,
    FileNotFound,
    FileTooLarge,
    page,
)
from ortserve.serving.batchlines import BatchLine, answer_record


def _lines(n: int, bad: tuple[int, ...] = ()) -> bytes:
    rows = []
    for i in range(1, n + 1):
        if i in bad:
            rows.append({"custom_id": f"c{i}", "url": "/v1/nowhere", "body": {}})
        else:
            rows.append({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}})  # fmt: skip
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture
def store(tmp_path) -> BatchStore:
    return BatchStore(tmp_path, max_file_bytes=1 << 20, max_lines=500)


def _ok(line: BatchLine) -> dict:
    return answer_record(line, 200, {"echo": line.custom_id}, None)


def _batch(store: BatchStore, data: bytes, owner: str = "") -> dict:
    upload = store.add_file(io.BytesIO(data), "in.jsonl", "batch", owner)
    return store.create_batch(owner, upload["id"], "/v1/chat/completions", "24h")


def _records(store: BatchStore, file_id: str | None, owner: str = "") -> list[dict]:
    if file_id is None:
        return []
    text = store.file_content(file_id, owner).read_text()
    return [json.loads(line) for line in text.splitlines()]


def _runner(store: BatchStore, execute, concurrency: int = 2) -> BatchRunner:
    return BatchRunner(store, lambda owner: execute, concurrency=concurrency)


def test_a_batch_runs_to_completed_with_output_and_error_files(store):
    batch = _batch(store, _lines(20, bad=(3, 7)))
    assert batch["status"] == "validating" and batch["request_counts"]["total"] == 20
    assert _runner(store, _ok).run_one(batch["id"])
    done = store.batch(batch["id"], "")
    assert done["status"] == "completed" and done["completed_at"] and done["finalizing_at"]
    assert done["request_counts"] == {"total": 20, "completed": 18, "failed": 2}
    output, errors = _records(store, done["output_file_id"]), _records(store, done["error_file_id"])
    assert sorted(r["custom_id"] for r in output) == sorted(f"c{i}" for i in range(1, 21)
                                                          if i not in (3, 7))  # fmt: skip
    assert [r["custom_id"] for r in errors] == ["c3", "c7"]
    assert all(r["response"] is None and "line" in r["error"]["message"] for r in errors)
    assert store.file(done["output_file_id"], "")["purpose"] == "batch_output"
    assert store.pending() == []


def test_files_and_batches_belong_to_their_key(store):
    batch = _batch(store, _lines(2), owner="alice")
    file_id = batch["input_file_id"]
    with pytest.raises(FileNotFound):
        store.file(file_id, "bob")
    with pytest.raises(FileNotFound):
        store.file_content(file_id, "")
    with pytest.raises(FileNotFound):
        store.delete_file(file_id, "bob")
    with pytest.raises(FileNotFound):  # bob cannot run alice's file either
        store.create_batch("bob", file_id, "/v1/chat/completions", "24h")
    with pytest.raises(BatchNotFound):
        store.batch(batch["id"], "bob")
    with pytest.raises(BatchNotFound):
        store.cancel(batch["id"], "bob")
    assert store.list_batches("bob") == [] and store.list_files("bob") == []
    assert [b["id"] for b in store.list_batches("alice")] == [batch["id"]]
    assert "owner" not in store.file(file_id, "alice")


@pytest.mark.parametrize("name", ["../../etc/passwd", "file-../x", "file-", "batch_a/b"])
def test_ids_that_could_leave_the_folder_are_not_found(store, name):
    with pytest.raises(FileNotFound):
        store.file(name, "")
    with pytest.raises(BatchNotFound):
        store.batch(name, "")


def test_uploads_are_checked_and_bounded(store):
    with pytest.raises(InvalidRequest, match="line 2 is not JSON") as caught:
        store.add_file(io.BytesIO(b'{"a": 1}\nnot json\n'), "x.jsonl", "batch", "")
    assert caught.value.param == "file"
    with pytest.raises(InvalidRequest) as caught:
        store.add_file(io.BytesIO(_lines(1)), "x.jsonl", "fine-tune", "")
    assert caught.value.param == "purpose"
    with pytest.raises(InvalidRequest):  # only the server makes batch_output files
        store.add_file(io.BytesIO(_lines(1)), "x.jsonl", "batch_output", "")
    with pytest.raises(FileTooLarge):
        store.add_file(io.BytesIO(b" " * ((1 << 20) + 1)), "x.jsonl", "batch", "")
    with pytest.raises(InvalidRequest, match="at most 500"):
        store.add_file(io.BytesIO(_lines(501)), "x.jsonl", "batch", "")
    assert store.list_files("") == []
    assert not any(store.tmp_dir.iterdir())  # nothing of the refused uploads is left


def test_batch_create_checks_endpoint_and_window(store):
    upload = store.add_file(io.BytesIO(_lines(1)), "x.jsonl", "batch", "")
    with pytest.raises(InvalidRequest) as caught:
        store.create_batch("", upload["id"], "/v1/images", "24h")
    assert caught.value.param == "endpoint"
    with pytest.raises(InvalidRequest) as caught:
        store.create_batch("", upload["id"], "/v1/embeddings", "1h")
    assert caught.value.param == "completion_window"


def test_a_resumed_batch_runs_no_line_twice(store):
    """The first run stops (the server going down) after some lines; the second finishes the
    rest: every custom_id once in the output, and no line executed twice."""
    batch = _batch(store, _lines(30))
    calls: list[str] = []
    lock = threading.Lock()
    first = _runner(store, None)

    def stop_after_ten(line: BatchLine) -> dict:
        with lock:
            calls.append(line.custom_id)
            if len(calls) == 10:
                first.stop()
        return _ok(line)

    first.execute_factory = lambda owner: stop_after_ten
    first.run_one(batch["id"])
    assert store.batch(batch["id"], "")["status"] == "in_progress"
    partial = store.batch(batch["id"], "")["request_counts"]["completed"]
    assert 10 <= partial < 30

    def count(line: BatchLine) -> dict:
        with lock:
            calls.append(line.custom_id)
        return _ok(line)

    _runner(store, count).run_one(batch["id"])
    done = store.batch(batch["id"], "")
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 30
    ids = [r["custom_id"] for r in _records(store, done["output_file_id"])]
    assert sorted(ids) == sorted(f"c{i}" for i in range(1, 31))
    assert len(calls) == len(set(calls)) == 30


def test_failures_while_the_server_stops_are_not_written(store):
    """A turn cancelled by the shutdown is not the line's answer: it runs again on resume."""
    batch = _batch(store, _lines(4))
    runner = _runner(store, None, concurrency=1)

    def cut(line: BatchLine) -> dict:
        runner.stop()
        return answer_record(line, 503, {"error": {"message": "shutting down"}}, None)

    runner.execute_factory = lambda owner: cut
    runner.run_one(batch["id"])
    _runner(store, _ok).run_one(batch["id"])
    done = store.batch(batch["id"], "")
    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert done["error_file_id"] is None


def test_cancel_stops_new_lines_and_publishes_what_was_done(store):
    batch = _batch(store, _lines(40))
    started = threading.Event()

    def slow(line: BatchLine) -> dict:
        started.set()
        time.sleep(0.05)
        return _ok(line)

    runner = _runner(store, slow)
    thread = threading.Thread(target=runner.run_one, args=(batch["id"],))
    thread.start()
    started.wait(5)
    assert store.cancel(batch["id"], "")["status"] == "cancelling"
    thread.join(10)
    done = store.batch(batch["id"], "")
    assert done["status"] == "cancelled" and done["cancelled_at"] and done["cancelling_at"]
    completed = done["request_counts"]["completed"]
    assert 0 < completed < 40
    assert len(_records(store, done["output_file_id"])) == completed
    with pytest.raises(BatchConflict):
        store.cancel(_finished(store)["id"], "")


def _finished(store: BatchStore) -> dict:
    batch = _batch(store, _lines(1))
    _runner(store, _ok).run_one(batch["id"])
    return store.batch(batch["id"], "")


def test_a_batch_cancelled_before_it_starts_runs_nothing(store):
    batch = _batch(store, _lines(5))
    store.cancel(batch["id"], "")
    ran = []
    _runner(store, lambda line: ran.append(line) or _ok(line)).run_one(batch["id"])
    done = store.batch(batch["id"], "")
    assert done["status"] == "cancelled" and not ran and done["output_file_id"] is None


def test_an_expired_batch_answers_the_rest_with_batch_expired(store):
    batch = _batch(store, _lines(6))
    store.update(batch["id"], expires_at=int(time.time()) - 1)
    _runner(store, _ok).run_one(batch["id"])
    done = store.batch(batch["id"], "")
    assert done["status"] == "expired" and done["expired_at"]
    errors = _records(store, done["error_file_id"])
    assert len(errors) == 6 and {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_an_unreadable_input_fails_the_batch(store):
    batch = _batch(store, _lines(3))
    (store.job_dir(batch["id"]) / "input.jsonl").write_text("garbage\n")
    _runner(store, _ok).run_one(batch["id"])
    done = store.batch(batch["id"], "")
    assert done["status"] == "failed" and done["failed_at"]
    assert "line 1" in done["errors"]["data"][0]["message"]


def test_a_batch_another_process_runs_is_left_alone(store):
    batch = _batch(store, _lines(2))
    held = FileLock(store.job_dir(batch["id"]) / "run.lock")
    held.acquire()
    try:
        assert not _runner(store, _ok).run_one(batch["id"])
    finally:
        held.release()
    assert store.batch(batch["id"], "")["status"] == "validating"


def test_deleting_the_input_file_does_not_break_its_batch(store):
    batch = _batch(store, _lines(3))
    store.delete_file(batch["input_file_id"], "")
    _runner(store, _ok).run_one(batch["id"])
    assert store.batch(batch["id"], "")["request_counts"]["completed"] == 3


def test_the_runner_thread_picks_up_batches_and_stops(store):
    batch = _batch(store, _lines(5))
    runner = BatchRunner(store, lambda owner: _ok, concurrency=2, poll_s=0.05)
    runner.start()
    deadline = time.monotonic() + 10
    while store.batch(batch["id"], "")["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.stop(timeout=5)
    assert store.batch(batch["id"], "")["status"] == "completed"
    assert not runner._thread.is_alive()


def test_pages_follow_openai_cursor_shape():
    items = [{"id": f"x{i}"} for i in range(5)]
    first = page(items, 2, None)
    assert first["has_more"] and [i["id"] for i in first["data"]] == ["x0", "x1"]
    assert (first["first_id"], first["last_id"]) == ("x0", "x1")
    last = page(items, 2, "x3")
    assert not last["has_more"] and [i["id"] for i in last["data"]] == ["x4"]
    assert page(items, 2, "nope")["data"] == []


# ---- the HTTP layer (api/batch.py) on the Flask test client ------------------------------------


@pytest.fixture
def http(tmp_path):
    from ortserve.api import create_app
    from ortserve.config import Settings

    app = create_app(Settings(models=tmp_path, max_batch_file_bytes=40 << 20))
    return app.test_client()


def _form(data: bytes, purpose: str = "batch") -> dict:
    return {"file": (io.BytesIO(data), "in.jsonl"), "purpose": purpose}


def test_uploads_above_the_json_body_limit_are_taken_up_to_their_own(http):
    """The app's JSON limit is 32 MiB; a batch file may be up to its own setting."""
    row = json.dumps({"custom_id": "x", "url": "/v1/embeddings", "body": {"input": "a" * 1000}})
    rows = (row.replace('"x"', f'"x{i}"') for i in range(34_000))
    data = "\n".join(rows).encode()
    assert 32 << 20 < len(data) < 40 << 20
    answer = http.post("/v1/files", data=_form(data), content_type="multipart/form-data")
    assert answer.status_code == 200, answer.json
    assert answer.json["bytes"] == len(data) and answer.json["purpose"] == "batch"

    too_big = http.post("/v1/files", data=_form(data + b"\n" + data[: 8 << 20]),
                        content_type="multipart/form-data")  # fmt: skip
    assert too_big.status_code == 413
    assert "ORTSERVE_MAX_BATCH_FILE_BYTES" in too_big.json["error"]["message"]


def test_http_errors_name_the_field(http):
    answer = http.post("/v1/files", data=_form(b"[1]\n"), content_type="multipart/form-data")
    assert answer.status_code == 400 and answer.json["error"]["param"] == "file"
    assert "line 1" in answer.json["error"]["message"]
    answer = http.post("/v1/files", data=_form(_lines(1), "assistants"),
                       content_type="multipart/form-data")  # fmt: skip
    assert answer.status_code == 400 and answer.json["error"]["param"] == "purpose"
    answer = http.post("/v1/files", json={"file": "x"})
    assert answer.status_code == 400 and answer.json["error"]["param"] == "file"
    answer = http.get("/v1/batches?limit=0")
    assert answer.status_code == 400 and answer.json["error"]["param"] == "limit"
    body = {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}  # fmt: skip
    answer = http.post("/v1/batches", json=body)
    assert answer.status_code == 404 and answer.json["error"]["param"] == "input_file_id"
    answer = http.post("/v1/batches", json={**body, "completion_window": "1h"})
    assert answer.status_code == 400 and answer.json["error"]["param"] == "completion_window"
    answer = http.post("/v1/batches/batch_nope/cancel")
    assert answer.status_code == 404 and answer.json["error"]["type"] == "invalid_request_error"
