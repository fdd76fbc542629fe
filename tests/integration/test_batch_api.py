"""OpenAI's Batch API on a real `ortserve serve` (gunicorn, real models), through the official
`openai` SDK: a mixed batch, a file that is not JSONL, a restart in the middle, a cancel,
another key, and interactive TTFT beside a running batch."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import statistics
import time

import openai
import pytest

from ortserve.library import Library
from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}},
          "required": ["label"], "additionalProperties": False}  # fmt: skip


def sdk(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _copy(served_library: Library, folder) -> Library:
    """A library of its own: the batches live under its root, and the restart reuses it."""
    shutil.copytree(served_library.root, folder / "models")
    return Library(folder / "models")


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory, served_library):
    running = Server(_copy(served_library, tmp_path_factory.mktemp("batch-api")))
    yield running
    running.stop()


def _jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _chat(i: int, max_tokens: int = 6) -> dict:
    return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-chat", "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": f"Question {i}?"}]}}  # fmt: skip


def _mixed(n: int) -> tuple[list, set[str]]:
    """n lines of every kind, 3 of them malformed; the malformed lines' ids."""
    rows: list = []
    for i in range(n - 3):
        kind = i % 5
        if kind == 0:
            rows.append(_chat(i))
        elif kind == 1:
            rows.append({"custom_id": f"completion-{i}", "method": "POST",
                         "url": "/v1/completions", "body": {"model": "tiny-chat",
                         "prompt": f"Once {i}", "max_tokens": 6}})  # fmt: skip
        elif kind == 2:
            fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}}
            rows.append({"custom_id": f"schema-{i}", "method": "POST",
                         "url": "/v1/chat/completions", "body": {
                             "model": "tiny-chat", "max_tokens": 40, "temperature": 0,
                             "response_format": fmt,
                             "messages": [{"role": "user", "content": f"Is {i} spam?"}]}})  # fmt: skip
        elif kind == 3:
            rows.append({"custom_id": f"embed-{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": "all-minilm", "input": [f"text {i}", "other"]}})  # fmt: skip
        else:
            rows.append({"custom_id": f"response-{i}", "method": "POST", "url": "/v1/responses",
                         "body": {"model": "tiny-chat", "input": f"Say {i}",
                                  "max_output_tokens": 6}})  # fmt: skip
    bad = [
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/images", "body": {}},
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # no custom_id
        {
            "custom_id": "bad-stream",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {**_chat(0)["body"], "stream": True},
        },  # fmt: skip
    ]
    for position, row in zip((10, 77, 150), bad, strict=True):
        rows.insert(position, row)
    return rows, {"bad-url", None, "bad-stream"}


def _upload(client: openai.OpenAI, rows: list):
    return client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")


def _wait(client: openai.OpenAI, batch_id: str, until, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} stuck: {batch}")


def _finished(batch) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def _records(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_mixed_batch_answers_every_good_line_and_fails_the_malformed_alone(batch_server):
    client = sdk(batch_server)
    rows, bad_ids = _mixed(200)
    upload = _upload(client, rows)
    assert upload.purpose == "batch" and upload.bytes > 0 and upload.id.startswith("file-")
    started = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "mixed"})  # fmt: skip
    assert batch.status == "validating" and batch.metadata == {"run": "mixed"}
    seen = {batch.status}
    deadline = time.monotonic() + 300
    while not _finished(batch) and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
        seen.add(batch.status)
    elapsed = time.monotonic() - started
    print(f"200-line mixed batch through the server: {elapsed:.1f} s, {200 / elapsed:.1f} lines/s")
    assert batch.status == "completed", batch
    assert "in_progress" in seen
    assert batch.request_counts.total == 200
    assert (batch.request_counts.completed, batch.request_counts.failed) == (197, 3)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    output = _records(client, batch.output_file_id)
    errors = _records(client, batch.error_file_id)
    assert {e["custom_id"] for e in errors} == bad_ids and len(errors) == 3
    assert all(e["response"] is None and e["error"]["message"].startswith("line ") for e in errors)
    good = {r.get("custom_id") for r in rows} - bad_ids
    assert len(output) == 197 and {r["custom_id"] for r in output} == good
    by_id = {r["custom_id"]: r for r in output}
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in output)
    assert by_id["chat-0"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["completion-1"]["response"]["body"]["object"] == "text_completion"
    assert len(by_id["embed-3"]["response"]["body"]["data"]) == 2
    assert by_id["response-4"]["response"]["body"]["object"] == "response"
    label = json.loads(by_id["schema-2"]["response"]["body"]["choices"][0]["message"]["content"])
    assert label["label"] in ("spam", "ham")

    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_a_file_that_is_not_jsonl_is_refused_naming_the_line(batch_server):
    client = sdk(batch_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", io.BytesIO(_jsonl([_chat(1), b"{not json"]))),
                            purpose="batch")  # fmt: skip
    assert "line 2" in caught.value.message and caught.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", io.BytesIO(_jsonl([_chat(1)]))), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"


def test_a_cancelled_batch_stops_and_keeps_what_it_did(batch_server):
    client = sdk(batch_server)
    upload = _upload(client, [_chat(i, max_tokens=64) for i in range(400)])
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    _wait(client, batch.id, lambda b: b.request_counts.completed >= 3)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, _finished, timeout=60)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 3 <= done < 400
    assert len(_records(client, batch.output_file_id)) == done


def test_interactive_ttft_stays_within_twice_idle_beside_a_running_batch(batch_server):
    client = sdk(batch_server)
    # A chat turn's prompt as users send them (a few hundred tokens): on a tiny model a
    # one-line prompt's TTFT is HTTP overhead alone, and the ratio would measure only that.
    # Each its own (no turn's KV reused from the one before, which would skip the prefill).
    context = " ".join(f"fact{i} is {i * 7 % 13}." for i in range(100))
    asked = itertools.count()

    def ttft() -> float:
        messages = [{"role": "user", "content": f"Question {next(asked)}. {context} How are you?"}]
        started = time.perf_counter()
        stream = client.chat.completions.create(model="tiny-chat", messages=messages,
                                                max_tokens=4, stream=True)  # fmt: skip
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
                first = time.perf_counter() - started
        return first if first is not None else time.perf_counter() - started

    ttft()  # the model is loaded, its prompt path warm
    idle = statistics.median(ttft() for _ in range(7))
    upload = _upload(client, [_chat(i, max_tokens=96) for i in range(400)])
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    _wait(client, batch.id, lambda b: b.status == "in_progress" and b.request_counts.completed)
    busy = []
    for _ in range(7):
        busy.append(ttft())
        time.sleep(0.05)
    still = client.batches.retrieve(batch.id)
    client.batches.cancel(batch.id)
    _wait(client, batch.id, _finished, timeout=60)
    during = statistics.median(busy)
    print(f"interactive TTFT: idle {idle * 1000:.1f} ms, beside a batch {during * 1000:.1f} ms, "
          f"ratio {during / idle:.2f} (batch at {still.request_counts.completed}/400 lines)")  # fmt: skip
    assert still.status == "in_progress", "the batch ended before the measurement did"
    assert during <= 2 * idle


# ---- a restart in the middle --------------------------------------------------------------------


def test_a_batch_resumes_after_a_restart_and_runs_no_line_twice(tmp_path, served_library):
    library = _copy(served_library, tmp_path)
    rows = [_chat(i, max_tokens=24) for i in range(400)]
    first = Server(library)
    try:
        client = sdk(first)
        batch = client.batches.create(input_file_id=_upload(client, rows).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")  # fmt: skip
        _wait(client, batch.id, lambda b: b.request_counts.completed >= 20)
    finally:
        first.stop()
    job = json.loads((library.root / "batches" / "jobs" / batch.id / "job.json").read_text())
    assert job["batch"]["status"] == "in_progress"
    written = (library.root / "batches" / "jobs" / batch.id / "output.jsonl").read_text()
    before = len(written.splitlines())  # the answers on disk when the server stopped

    second = Server(library)  # the same library: it finds the batch and resumes it
    try:
        client = sdk(second)
        done = _wait(client, batch.id, _finished)
        output = _records(client, done.output_file_id)
    finally:
        second.stop()
    ids = [r["custom_id"] for r in output]
    print(
        f"restart: {before} lines done before the stop, {len(ids) - before} after; "
        f"{len(ids)} answers, {len(set(ids))} distinct custom_ids"
    )
    assert done.status == "completed" and done.error_file_id is None
    assert 20 <= before < 400
    assert len(ids) == len(set(ids)) == 400
    assert set(ids) == {r["custom_id"] for r in rows}


# ---- keys ---------------------------------------------------------------------------------------

ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdefgh"


def test_another_key_sees_nothing_of_a_batch(tmp_path, served_library):
    server = Server(_copy(served_library, tmp_path), ORTSERVE_API_KEYS=f"alice:{ALICE},bob:{BOB}")
    try:
        alice, bob = sdk(server, ALICE), sdk(server, BOB)
        upload = _upload(alice, [_chat(1), _chat(2)])
        batch = alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")  # fmt: skip
        for call in (lambda: bob.files.retrieve(upload.id),
                     lambda: bob.files.content(upload.id),
                     lambda: bob.files.delete(upload.id),
                     lambda: bob.batches.retrieve(batch.id),
                     lambda: bob.batches.cancel(batch.id),
                     lambda: bob.batches.create(input_file_id=upload.id,
                                                endpoint="/v1/chat/completions",
                                                completion_window="24h")):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                call()
        assert list(bob.batches.list()) == [] and list(bob.files.list()) == []
        done = _wait(alice, batch.id, _finished)
        assert done.status == "completed" and done.request_counts.completed == 2
        with pytest.raises(openai.NotFoundError):
            bob.files.content(done.output_file_id)
        assert len(_records(alice, done.output_file_id)) == 2
        with pytest.raises(openai.AuthenticationError):
            sdk(server, "no-such-key-0123456789").batches.list()
    finally:
        server.stop()
