"""Batch conversion: spec loading, the skip decision, memory-bounded slots, the report."""

import json
import os
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from converters import batch
from converters.batch import BatchEntry, BatchReport, EntryResult, Slots, load_spec, parse_spec
from converters.source import fingerprint
from ortserve.errors import InvalidRequest

GB = 1_000_000_000


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- spec loading ----------------------------------------------------------------------------


def test_yaml_spec_with_defaults_and_relative_sources(tmp_path):
    (tmp_path / "ckpt" / "llama").mkdir(parents=True)
    spec = write(
        tmp_path / "spec.yaml",
        "defaults:\n  precision: int8\n  verify: false\n"
        "models:\n"
        "  - source: ckpt/llama\n"
        "  - source: Qwen/Qwen2.5-0.5B-Instruct\n    name: qwen:small\n    precision: fp16\n"
        "  - ./missing\n",
    )
    first, second, third = load_spec(spec)
    assert first == BatchEntry(
        source=str(tmp_path / "ckpt" / "llama"), name="llama", precision="int8", verify=False
    )
    assert (second.source, second.name, second.precision) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "qwen:small", "fp16"
    )  # fmt: skip
    assert second.verify is False and second.block_size == 32 and second.provider == "cpu"
    # a relative path is relative to the spec file, even when it does not exist
    assert third.source == str(tmp_path / "missing") and third.name == "missing"


def test_json_spec_as_a_bare_list(tmp_path):
    spec = write(
        tmp_path / "spec.json",
        json.dumps([{"source": "/ckpt/Mistral_7B", "block_size": 64, "revision": None}]),
    )
    (entry,) = load_spec(spec)
    assert entry.name == "mistral_7b" and entry.block_size == 64 and entry.revision is None
    assert entry.options.recorded() == {
        "precision": "int4", "block_size": 64, "provider": "cpu", "backend": "auto"}  # fmt: skip


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"models": [{"source": "a", "precison": "int4"}]}, "models[0].precison: unknown field"),
        ([{"source": "a"}, {"source": "b", "precision": "int3"}],
         "models[1].precision: precision 'int3' is not one of"),
        ([{"source": "a", "block_size": 48}], "models[0].block_size: block size 48 must be"),
        ([{"source": "a", "backend": "onnx"}], "models[0].backend: backend 'onnx' is not one of"),
        ([{"source": "a", "block_size": True}], "models[0].block_size: must be an integer"),
        ([{"source": "a", "verify": "no"}], "models[0].verify: must be true or false"),
        ([{"source": "a", "provider": "tpu"}], "models[0].provider: provider 'tpu'"),
        ([{"source": "a"}, {"name": "b"}], "models[1].source: required"),
        ([{"source": "a", "name": "../x"}], "models[0].name: invalid model name"),
        ([{"source": "a", "name": "X"}, {"source": "b", "name": "x:latest"}],
         "models[1].name: 'x:latest' is also models[0]'s"),
        ([{"source": "/d/llama"}, {"source": "/e/llama/"}], "models[1].name: 'llama' is also"),
        ([42], "models[0]: expected a mapping"),
        ({"defaults": {"name": "x"}, "models": ["a"]}, "defaults.name: set per entry"),
        ({"defaults": {"precison": "fp16"}, "models": ["a"]}, "defaults.precison: unknown"),
        ({"defaults": {"verify": 1}, "models": ["a"]}, "defaults.verify: must be true or false"),
        ({"model": ["a"]}, "unknown top-level key 'model'"),
        ([{"source": "a", "push": "not a repo"}], "models[0].push: 'not a repo' is not hf.co/"),
        ([{"source": "a", "push": "hf.co/org/repo@main"}], "models[0].push: 'hf.co/org/repo@main'"),
        ([{"source": "a", "push": "org/../x"}], "models[0].push: 'org/../x' is not"),
        ([{"source": "a", "push": 3}], "models[0].push: must be a string or null"),
        ({"defaults": {"push": "org/x"}, "models": ["a"]}, "defaults.push: set per entry"),
        ([{"source": "a", "push": "org/x:cpu"}, {"source": "b", "push": "hf.co/ORG/x:cpu"}],
         "models[1].push: 'hf.co/ORG/x:cpu' is also models[0]'s"),
        ([{"source": "a", "push": "org/x"}, {"source": "b", "push": "org/x:latest"}],
         "models[1].push: 'org/x:latest' is also models[0]'s"),
        ({"models": []}, "models: the list is empty"),
        ("just a string", "expected a list of models"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_entry_and_field(spec, problem):
    with pytest.raises(InvalidRequest) as info:
        parse_spec(spec)
    assert problem in info.value.message
    assert info.value.message.startswith("batch spec: ")


@pytest.mark.parametrize(
    "push", ["org/repo", "hf.co/org/repo:cpu-int4", "huggingface.co/Org/Re.po_1:v2", None]
)
def test_push_destinations_in_a_spec(push):
    (entry,) = parse_spec([{"source": "a", "push": push}])
    assert entry.push == push
    assert "push" not in entry.convert_options()  # a destination, not a conversion option
    assert entry.options.recorded() == BatchEntry("a", "a").options.recorded()


def test_a_push_entry_needs_a_publisher_before_anything_runs(tmp_path, library):
    spec = [{"source": "./a"}, {"source": "./b", "push": "org/b"}]
    with pytest.raises(InvalidRequest, match=r"models\[1\]\.push: pushing needs ortserve's push"):
        batch.run(spec, library=library, progress=False)
    assert not library.root.exists()


def test_every_problem_is_reported_at_once(tmp_path):
    spec = write(
        tmp_path / "spec.yaml",
        "models:\n  - {source: a, precision: int3, color: red}\n  - {source: b, verify: 2}\n",
    )
    with pytest.raises(InvalidRequest) as info:
        load_spec(spec)
    message = info.value.message
    for problem in ("models[0].color", "models[0].precision", "models[1].verify"):
        assert problem in message


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("spec.yaml", "models: [\n", "is not valid YAML"),
        ("spec.json", "{not json", "is not valid JSON"),
    ],
)
def test_unparsable_spec_is_one_line_error(tmp_path, name, text, problem):
    with pytest.raises(InvalidRequest) as info:
        load_spec(write(tmp_path / name, text))
    assert problem in info.value.message and "\n" not in info.value.message


def test_missing_spec_file(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read batch spec"):
        load_spec(tmp_path / "nope.yaml")


def test_bad_spec_fails_before_anything_runs(tmp_path, library):
    spec = write(tmp_path / "spec.yaml", "- {source: ./a}\n- {source: ./b, precision: int2}\n")
    with pytest.raises(InvalidRequest, match=r"models\[1\]\.precision"):
        batch.run(spec, library=library, progress=False)
    assert not library.root.exists()
    assert not (tmp_path / batch.REPORT_NAME).exists()


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5])
def test_jobs_must_be_a_positive_integer(jobs, library):
    with pytest.raises(InvalidRequest, match="jobs"):
        batch.run([{"source": "./a"}], jobs=jobs, library=library, progress=False)


# ---- the skip decision -----------------------------------------------------------------------


def checkpoint(path, parameters=1000):
    path.mkdir(parents=True, exist_ok=True)
    write(path / "config.json", json.dumps({"model_type": "llama"}))
    save_file({"w": np.zeros(parameters, dtype=np.float16)}, str(path / "model.safetensors"))
    return path


def converted(library, tmp_path, name, source_record):
    """A library model whose manifest records `source_record` as the converter writes it."""
    with library.staging() as staged:
        bundle = staged / "bundle"
        bundle.mkdir()
        write(bundle / "model.onnx", "graph")
        return library.add(name, bundle, {"source": source_record})


def local_record(path, **options):
    recorded = {"precision": "int4", "block_size": 32, "provider": "cpu", "backend": "auto",
                **options}  # fmt: skip
    return {"source": str(path.resolve()), "revision": None,
            "fingerprint": fingerprint(path.resolve()), "options": recorded}  # fmt: skip


def test_same_local_source_and_options_is_up_to_date(tmp_path, library):
    source = checkpoint(tmp_path / "llama")
    converted(library, tmp_path, "llama", local_record(source))
    entry = BatchEntry(source=str(source), name="llama")
    found = batch.probe(entry)
    assert found.identity == {"fingerprint": fingerprint(source.resolve())}
    assert batch.up_to_date(entry, found, library).name == "llama:latest"


def test_a_model_converted_before_backends_existed_is_converted_again(tmp_path, library):
    # its graph is optimum's: a re-run gives it the model builder's
    source = checkpoint(tmp_path / "llama")
    record = local_record(source)
    del record["options"]["backend"]
    converted(library, tmp_path, "llama", record)
    entry = BatchEntry(source=str(source), name="llama")
    assert batch.up_to_date(entry, batch.probe(entry), library) is None


def test_other_options_name_or_source_are_not_up_to_date(tmp_path, library):
    source = checkpoint(tmp_path / "llama")
    other = checkpoint(tmp_path / "other")
    converted(library, tmp_path, "llama", local_record(source))
    for entry in (
        BatchEntry(source=str(source), name="llama", precision="int8"),
        BatchEntry(source=str(source), name="llama", block_size=64),
        BatchEntry(source=str(source), name="llama", provider="cuda"),
        BatchEntry(source=str(source), name="llama", backend="optimum"),
        BatchEntry(source=str(source), name="llama:other-tag"),
        BatchEntry(source=str(other), name="llama"),
    ):
        assert batch.up_to_date(entry, batch.probe(entry), library) is None, entry


def test_a_changed_checkpoint_is_not_up_to_date(tmp_path, library):
    source = checkpoint(tmp_path / "llama")
    converted(library, tmp_path, "llama", local_record(source))
    entry = BatchEntry(source=str(source), name="llama")
    later = time.time() + 5
    os.utime(source / "model.safetensors", (later, later))  # rewritten in place
    assert batch.up_to_date(entry, batch.probe(entry), library) is None


def test_a_model_without_a_source_record_is_converted_again(tmp_path, library):
    source = checkpoint(tmp_path / "llama")
    converted(library, tmp_path, "llama", None)
    entry = BatchEntry(source=str(source), name="llama")
    assert batch.up_to_date(entry, batch.probe(entry), library) is None


def test_fingerprint_is_cheap_identity_of_files(tmp_path):
    source = checkpoint(tmp_path / "llama")
    first = fingerprint(source)
    assert fingerprint(source) == first
    (source / ".cache").mkdir()
    write(source / ".cache" / "lock", "x")  # huggingface-hub's local-dir bookkeeping
    assert fingerprint(source) == first
    write(source / "config.json", json.dumps({"model_type": "llama", "x": 1}))
    assert fingerprint(source) != first


def test_probe_estimates_peak_from_fp32_weights(tmp_path):
    source = checkpoint(tmp_path / "llama", parameters=5000)  # fp16 on disk
    found = batch.probe(BatchEntry(source=str(source), name="llama"))
    assert found.peak == batch.PEAK_FACTOR * 4 * 5000
    assert found.source == str(source.resolve())


def test_probe_of_a_missing_directory_knows_nothing(tmp_path):
    found = batch.probe(BatchEntry(source=str(tmp_path / "missing"), name="m"))
    assert found.identity == {} and found.peak == 0


def test_unreachable_repo_is_identified_by_the_cached_commit(tmp_path, monkeypatch):
    """Offline (or an unknown repo), the commit the hub cache holds is what a download uses."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "ortserve-tests/no-such-model-3f9a"
    entry = BatchEntry(source=repo, name="nothing")
    started = time.monotonic()
    assert batch.probe(entry).identity == {}  # nothing cached: unknown, so it is converted
    assert time.monotonic() - started < 30
    commit = "a" * 40
    folder = tmp_path / "hub" / "models--ortserve-tests--no-such-model-3f9a"
    checkpoint(folder / "snapshots" / commit, parameters=2000)
    (folder / "refs").mkdir()
    write(folder / "refs" / "main", commit)
    found = batch.probe(entry)
    assert found.identity == {"revision": commit}
    assert found.peak == batch.PEAK_FACTOR * 4 * 2000


# ---- memory-bounded slots --------------------------------------------------------------------


def test_slots_bound_parallel_jobs():
    slots = Slots(jobs=2, memory=None)
    assert slots.fits(GB)
    slots.take(GB)
    assert slots.fits(GB)
    slots.take(GB)
    assert not slots.fits(1)
    slots.release(GB)
    assert slots.fits(GB)


def test_slots_bound_estimated_memory():
    slots = Slots(jobs=4, memory=10 * GB)
    slots.take(6 * GB)
    assert not slots.fits(6 * GB)  # 12 GB > 10 GB: waits although a job slot is free
    assert slots.fits(4 * GB)
    slots.take(4 * GB)
    assert not slots.fits(1)
    slots.release(6 * GB)
    assert slots.fits(6 * GB)


def test_an_entry_bigger_than_all_memory_runs_alone():
    slots = Slots(jobs=4, memory=10 * GB)
    assert slots.fits(50 * GB)
    slots.take(50 * GB)
    assert not slots.fits(1)


def test_available_memory_is_known_here():
    available = batch.available_memory()
    assert available is not None and available > 0


def test_failing_entries_do_not_stop_the_others_and_report_each(tmp_path, library, capsys):
    """Real entry processes: every entry runs and records its own error."""
    (tmp_path / "empty").mkdir()
    spec = [
        {"source": str(tmp_path / "missing")},
        {"source": str(tmp_path / "empty")},
        {"source": "./not/a/repo/id"},
    ]
    report = batch.run(spec, library=library, jobs=2, memory=1, report=tmp_path / "r.json")
    assert [e.status for e in report.entries] == ["failed"] * 3
    assert "does not exist" in report.entries[0].error
    assert "has no config.json" in report.entries[1].error
    assert all(e.seconds > 0 for e in report.entries)
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["summary"] == {"converted": 0, "skipped": 0, "failed": 3}
    assert [e["error"] for e in written["entries"]] == [e.error for e in report.entries]
    progress = capsys.readouterr().err
    assert "[2/3] empty:latest: failed in" in progress


# ---- the report ------------------------------------------------------------------------------


def test_report_table_and_atomic_json(tmp_path):
    report = BatchReport(
        [
            EntryResult("a:latest", "/a", "converted", 12.34, 2_500_000, "sha256-ab"),
            EntryResult("b:latest", "/b", "skipped", 0.0, 1_000, "sha256-cd"),
            EntryResult("c:latest", "/c", "failed", 0.5, error="checkpoint directory missing"),
        ],
        seconds=13.0,
        jobs=2,
    )
    report.entries[0].node = "a" * 56  # a Ray node id, shortened in the table
    report.entries[2].node = "host-1"
    table = report.table()
    assert "a:latest    converted    12.3s    2.5 MB    aaaaaaaaaaaa" in table
    assert "NODE" in table and "host-1" in table
    assert report.nodes() == {"a" * 56: 1, "host-1": 1}
    report.entries[0].node = None
    assert "checkpoint directory missing" in table
    assert table.endswith("1 converted, 1 skipped, 1 failed in 13.0s")
    assert not report.ok
    path = report.write(tmp_path / "out" / "report.json")
    data = json.loads(path.read_text())
    assert data["jobs"] == 2 and data["summary"]["failed"] == 1
    assert data["entries"][0] == {
        "name": "a:latest", "source": "/a", "status": "converted", "seconds": 12.34,
        "size": 2_500_000, "digest": "sha256-ab", "error": None, "node": None, "pushed": None,
    }  # fmt: skip
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no scratch left


def test_a_killed_entry_process_is_reported():
    assert "killed (SIGKILL; out of memory?)" in batch._died(-9)
    assert "exited with code 3" in batch._died(3)
