"""`ortserve batch`'s files, without a model: resume bookkeeping, atomic output, refusals.
(The runs with real models are tests/integration/test_batch_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortserve.batch import run_batch, sidecars
from ortserve.config import Settings
from ortserve.errors import InvalidRequest
from ortserve.serving.batchlines import BatchLine, Results, answer_record, failure_record

# Lines that fail before any model is needed: the run writes them without an engine.
BAD_LINES = [
    {"url": "/v1/chat/completions", "body": {}},  # no custom_id
    {"custom_id": "b", "url": "/v1/models", "body": {}},
    {"custom_id": "c", "url": "/v1/embeddings", "body": {"stream": True}},
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"ORTSERVE_MODELS": str(tmp_path / "models")})


def test_results_know_the_lines_written_since_they_were_opened(tmp_path):
    """A rerun copies an old OUTPUT's records in before it runs: they must count as done."""
    results = Results(tmp_path / "out", tmp_path / "err")
    line = BatchLine(3, "x", "/v1/embeddings", {})
    results.write(answer_record(line, 200, {}, None))
    results.write(failure_record(5, "y", "invalid_request", "bad"))
    assert results.done() == {3, 5}
    results.close()
    assert Results(tmp_path / "out", tmp_path / "err").done() == {3, 5}


def test_bad_lines_are_written_whole_and_atomically(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    output = tmp_path / "out.jsonl"
    summary = run_batch(source, output, settings=settings(tmp_path), progress=False)
    assert (summary.total, summary.ok, summary.failed, summary.complete) == (3, 0, 3, True)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in written] == ["batch_req_1", "batch_req_2", "batch_req_3"]
    assert "stream" in written[2]["error"]["message"]
    assert not any(path.exists() for path in sidecars(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp left


def test_a_rerun_keeps_the_old_records_and_splits_errors_on_request(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    output = tmp_path / "out.jsonl"
    run_batch(source, output, settings=settings(tmp_path), progress=False)
    before = output.read_text()
    errors = tmp_path / "errors.jsonl"
    summary = run_batch(source, output, errors=errors, settings=settings(tmp_path), progress=False)
    assert summary.failed == 3 and output.read_text() == "" and errors.read_text() == before


def test_a_crash_cut_sidecar_resumes_from_its_complete_lines(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    output = tmp_path / "out.jsonl"
    done = failure_record(2, "b", "invalid_request", "written before the crash")
    sidecars(output)[1].write_text(json.dumps(done) + '\n{"id": "batch_req_3", "cus')
    run_batch(source, output, settings=settings(tmp_path), progress=False)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert written[1] == done and len(written) == 3  # line 2 kept, line 3 run again


@pytest.mark.parametrize(
    "existing",
    [
        b"not a batch output\n",
        json.dumps(failure_record(1, "someone-else", "x", "y")).encode() + b"\n",
    ],  # fmt: skip
)
def test_an_output_that_is_not_this_inputs_is_never_overwritten(tmp_path, existing):
    source = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    output = tmp_path / "out.jsonl"
    output.write_bytes(existing)
    with pytest.raises(InvalidRequest, match="out.jsonl"):
        run_batch(source, output, settings=settings(tmp_path), progress=False)
    assert output.read_bytes() == existing


def test_errors_and_output_must_differ(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    with pytest.raises(InvalidRequest, match="--errors"):
        run_batch(source, tmp_path / "o", errors=tmp_path / "o", settings=settings(tmp_path))
