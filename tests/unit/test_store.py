import json
import os
import subprocess
import sys
import time

import pytest

from ortserve.errors import InvalidName, LibraryCorrupt, ModelNotFound
from ortserve.library import Library
from ortserve.library.store import INDEX_FILE


def _stage(library: Library, files: dict[str, bytes]):
    """A staged bundle directory that outlives the staging context (the test adds it)."""
    path = (
        library.tmp_dir
        / f"test-{len(list(library.tmp_dir.glob('*'))) if library.tmp_dir.exists() else 0}"
    )
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _manifest(**extra):
    return {"details": {"family": "llama"}, "capabilities": ["completion"], **extra}


def _snapshot(library: Library):
    return sorted((m.name, m.digest) for m in library.list())


def test_add_get_list(library):
    staged = _stage(library, {"model.onnx": b"weights", "sub/tokenizer.json": b"{}"})
    info = library.add("tiny", staged, _manifest(parameters={"temperature": 0.5}))
    assert info.name == "tiny:latest"
    assert info.path == library.bundles_dir / info.digest
    assert (info.path / "model.onnx").read_bytes() == b"weights"
    assert (info.path / "sub" / "tokenizer.json").is_file()
    assert info.size == len(b"weights") + 2
    assert not staged.exists()
    got = library.get("TINY:latest")
    assert got.manifest["parameters"] == {"temperature": 0.5}
    assert [m.name for m in library.list()] == ["tiny:latest"]


def test_digest_depends_on_content_only(library):
    a = library.add("a", _stage(library, {"m": b"1"}), _manifest())
    b = library.add("b", _stage(library, {"m": b"1"}), _manifest())
    c = library.add("c", _stage(library, {"m": b"2"}), _manifest())
    assert a.digest == b.digest != c.digest
    assert len(list(library.bundles_dir.iterdir())) == 2


def test_copy_shares_the_bundle_and_delete_keeps_it_for_the_other_name(library):
    info = library.add("base", _stage(library, {"m": b"x"}), _manifest(system="be brief"))
    copy = library.copy("base", "team/alias:v1")
    assert copy.name == "team/alias:v1"
    assert copy.path == info.path
    assert copy.manifest["system"] == "be brief"
    library.delete("base")
    assert info.path.is_dir()
    with pytest.raises(ModelNotFound):
        library.get("base")
    library.delete("team/alias:v1")
    assert not info.path.exists()
    assert library.list() == []


def test_overwrite_replaces_and_removes_the_unused_old_bundle(library):
    old = library.add("m", _stage(library, {"m": b"old"}), _manifest())
    new = library.add("m", _stage(library, {"m": b"new"}), _manifest())
    assert library.get("m").digest == new.digest
    assert not old.path.exists()
    assert library.get("m").manifest["created"] != ""


def test_unknown_model_errors(library):
    with pytest.raises(ModelNotFound) as info:
        library.get("nope")
    assert info.value.message == 'model "nope:latest" not found, try pulling it first'
    with pytest.raises(ModelNotFound):
        library.delete("nope")
    with pytest.raises(ModelNotFound):
        library.copy("nope", "other")


@pytest.mark.parametrize("bad", ["../escape", "/abs", "a\\b", "a//b", ""])
def test_bad_names_leave_the_library_unchanged(library, bad):
    library.add("keep", _stage(library, {"m": b"x"}), _manifest())
    before = _snapshot(library)
    staged = _stage(library, {"m": b"y"})
    with pytest.raises(InvalidName):
        library.add(bad, staged, _manifest())
    with pytest.raises(InvalidName):
        library.copy("keep", bad)
    assert _snapshot(library) == before
    assert len(list(library.bundles_dir.iterdir())) == 1
    assert not any(p.name.startswith("..") for p in library.root.rglob("*"))


def test_verify_detects_tampering(library):
    info = library.add("m", _stage(library, {"model.onnx": b"good"}), _manifest())
    assert [r.ok for r in library.verify()] == [True]
    (info.path / "model.onnx").write_bytes(b"evil")
    (result,) = library.verify("m")
    assert not result.ok
    assert "model.onnx" in result.problem
    assert result.names == ["m:latest"]


def test_verify_detects_a_forged_index(library):
    info = library.add("m", _stage(library, {"model.onnx": b"good"}), _manifest())
    (info.path / "model.onnx").write_bytes(b"evil")
    index = json.loads((info.path / INDEX_FILE).read_text())
    index["files"][0]["sha256"] = "0" * 64
    (info.path / INDEX_FILE).write_text(json.dumps(index))
    (result,) = library.verify()
    assert "digest" in result.problem


def test_prune_removes_unused_bundles_and_dead_staging(library):
    library.add("m", _stage(library, {"m": b"used"}), _manifest())
    orphan = library.add_bundle(_stage(library, {"m": b"orphan"}))
    # staging left by a process that was killed: its pid is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    leftover = library.tmp_dir / f"convert-{dead}-abc"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    assert library.prune() == [orphan]
    assert not leftover.exists()
    assert [m.name for m in library.list()] == ["m:latest"]


def test_staging_is_removed_when_the_block_fails(library):
    with pytest.raises(RuntimeError), library.staging("convert") as staged:
        (staged / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("export crashed")
    assert not staged.exists()
    assert library.list() == []


def test_manifest_pointing_at_missing_bundle_is_refused(library):
    with pytest.raises(LibraryCorrupt):
        library.save("m", _manifest(bundle="sha256-" + "a" * 64))
    with pytest.raises(LibraryCorrupt):
        library.save("m", _manifest(bundle="sha256-../../etc"))
    assert library.list() == []


def test_list_is_newest_first_and_ignores_partial_manifest_writes(library):
    library.add("first", _stage(library, {"m": b"1"}), _manifest())
    time.sleep(0.01)
    library.add("second", _stage(library, {"m": b"2"}), _manifest())
    # a temporary file from an interrupted manifest write is not a manifest
    (library.manifests_dir / "library" / "first" / ".latest.json.tmp123").write_text("{")
    assert [m.name for m in library.list()] == ["second:latest", "first:latest"]


def test_update_changes_fields_and_keeps_the_bundle(library):
    info = library.add("m", _stage(library, {"m": b"1"}), _manifest())
    updated = library.update("m", system="new system")
    assert updated.digest == info.digest
    assert library.get("m").manifest["system"] == "new system"


def test_manifest_files_are_written_atomically(library, monkeypatch):
    library.add("m", _stage(library, {"m": b"1"}), _manifest(system="v1"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        library.update("m", system="v2")
    monkeypatch.undo()
    assert library.get("m").manifest["system"] == "v1"
    leftovers = [p for p in library.manifests_dir.rglob("*") if p.is_file()]
    assert [p.name for p in leftovers] == ["latest.json"]


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_prune_removes_leftovers_of_crashed_writes(library):
    library.add("m", _stage(library, {"m": b"used"}), _manifest())
    folder = library.manifests_dir / "library" / "m"
    # a manifest write killed between its temporary file and the rename
    abandoned = folder / ".latest.json.k2j3h4"
    abandoned.write_text("{")
    _age(abandoned, 3600)
    in_progress = folder / ".other.json.x9y8z7"  # a write happening right now
    in_progress.write_text("{")
    # staging of a killed convert: a directory, and a stray file, both of a dead process
    staged = library.tmp_dir / f"convert-{_dead_pid()}-abc"
    (staged / "sub").mkdir(parents=True)
    (staged / "sub" / "model.onnx.data").write_bytes(b"half")
    stray = library.tmp_dir / f"pull-{_dead_pid()}-file"
    stray.write_bytes(b"half")
    old_record = library.root / ".verified.json.q1w2e3"
    old_record.write_text("{")
    _age(old_record, 3600)

    assert library.prune() == []  # the names it returns are bundles' and blobs'
    assert not abandoned.exists() and not staged.exists() and not stray.exists()
    assert not old_record.exists()
    assert in_progress.exists()
    assert [m.name for m in library.list()] == ["m:latest"]


def test_prune_keeps_the_staging_of_a_live_process(library):
    with library.staging("convert") as staged:
        (staged / "model.onnx").write_bytes(b"in progress")
        library.prune()
        assert staged.exists()
