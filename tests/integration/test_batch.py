"""Batch conversion end to end: real checkpoints, real entry processes, the real CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from converters import batch
from ortserve.library import Library

pytestmark = pytest.mark.slow


@pytest.fixture
def spec(tmp_path, tiny_checkpoint):
    """Two tiny checkpoints and one whose config.json is broken."""
    broken = tmp_path / "checkpoints" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{model_type: llama")
    path = tmp_path / "spec.yaml"
    path.write_text(
        "defaults:\n  verify: false\n"
        "models:\n"
        f"  - source: {tiny_checkpoint('llama')}\n    name: batch-llama:int4\n"
        f"  - source: {tiny_checkpoint('qwen2')}\n    name: batch-qwen\n    precision: fp32\n"
        "  - source: checkpoints/broken\n"
    )
    return path


def run_cli(*args, library, cwd=None):
    env = {**os.environ, "ORTSERVE_MODELS": str(library.root)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


def test_batch_converts_the_good_entries_and_reports_the_bad_one(spec, library):
    result = run_cli("-m", "ortserve", "convert", "--batch", str(spec), "--jobs", "2",
                     library=library)  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads((spec.parent / batch.REPORT_NAME).read_text())
    llama, qwen, broken = report["entries"]
    assert [e["status"] for e in report["entries"]] == ["converted", "converted", "failed"]
    assert report["summary"] == {"converted": 2, "skipped": 0, "failed": 1}
    assert broken["name"] == "broken:latest"
    assert "config.json is not valid JSON" in broken["error"]
    for entry in (llama, qwen):  # the sizes and digests are the library's own
        model = library.get(entry["name"])
        assert entry["size"] == model.size > 0 and entry["digest"] == model.digest
        assert 0 < entry["seconds"] <= report["seconds"]
        assert model.details["quantization"] == ("int4" if entry is llama else "fp32")
    assert sorted(m.name for m in library.list()) == ["batch-llama:int4", "batch-qwen:latest"]
    table = result.stdout
    assert "broken:latest" in table and "failed" in table and "not valid JSON" in table
    assert "2 converted, 0 skipped, 1 failed" in table
    for step in ("batch-qwen:latest: export", "batch-llama:int4: converted in"):
        assert step in result.stderr

    manifests = {p: p.stat().st_mtime_ns for p in library.manifests_dir.rglob("*.json")}
    bundles = sorted(p.name for p in library.bundles_dir.iterdir())
    again = run_cli("-m", "converters.batch", str(spec), "--jobs", "2", library=library)
    assert again.returncode == 1, again.stderr
    second = json.loads((spec.parent / batch.REPORT_NAME).read_text())
    assert [e["status"] for e in second["entries"]] == ["skipped", "skipped", "failed"]
    assert [e["digest"] for e in second["entries"][:2]] == [llama["digest"], qwen["digest"]]
    assert "0 converted, 2 skipped, 1 failed" in again.stdout
    # nothing was converted or rewritten
    assert {p: p.stat().st_mtime_ns for p in library.manifests_dir.rglob("*.json")} == manifests
    assert sorted(p.name for p in library.bundles_dir.iterdir()) == bundles


def test_batch_runs_from_python(tiny_checkpoint, tmp_path):
    library = Library(tmp_path / "models")
    source = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama")  # changed below
    entries = [{"source": str(source), "name": "py-llama", "precision": "fp32"}]
    report = batch.run(entries, library=library, progress=False)
    (entry,) = report.entries
    assert report.ok and entry.status == "converted"
    model = library.get("py-llama")
    assert model.manifest["verification"]["greedy_match"] == 32  # verified against transformers
    assert model.manifest["source"]["fingerprint"].startswith("sha256-")
    assert entry.size == model.size
    assert report.path is None  # no spec file, no report unless asked
    assert batch.run(entries, library=library, progress=False).entries[0].status == "skipped"
    # a checkpoint that changed since is converted again
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    again = batch.run(entries, library=library, progress=False).entries[0]
    assert again.status == "converted"
    assert (
        library.get("py-llama").manifest["source"]["fingerprint"]
        != (model.manifest["source"]["fingerprint"])
    )


@pytest.mark.parametrize(
    "args, problem",
    [
        (["convert"], "missing SOURCE"),
        (["convert", "some/repo", "--batch", "spec.yaml"], "not both"),
        (["convert", "--batch", "spec.yaml", "--precision", "fp16"], "--precision applies to one"),
        (["convert", "some/dir", "--jobs", "2"], "--jobs, --report and --ray go with --batch"),
        (["convert", "--batch", "no-such-spec.yaml"], "cannot read batch spec"),
        (["convert", "some/dir", "--ray", "auto"], "--jobs, --report and --ray go with --batch"),
        (["convert", "--batch", "s.yaml", "-j", "2", "--ray"], "--jobs does not apply with --ray"),
    ],
)
def test_batch_usage_errors_are_one_line(args, problem, library, tmp_path):
    result = run_cli("-m", "ortserve", *args, library=library, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and problem in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not library.root.exists()
