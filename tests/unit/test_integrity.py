"""Integrity at load: Library.check refuses a damaged bundle, hashing only what changed."""

from __future__ import annotations

import json
import os

import pytest

from ortserve.errors import LibraryCorrupt
from ortserve.library import Library, store
from ortserve.library.store import VERIFIED_FILE


def _add(library: Library, files: dict[str, bytes], name: str = "m"):
    with library.staging("test") as staged:
        bundle = staged / "bundle"
        bundle.mkdir()
        for rel, data in files.items():
            (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
            (bundle / rel).write_bytes(data)
        return library.add(name, bundle, {"capabilities": ["completion"]})


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files store hashes, in order."""
    seen: list[str] = []
    real = store.file_sha256

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(store, "file_sha256", counting)
    return seen


def _flip_a_byte(path, at: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    stat = path.stat()  # a later mtime, whatever the clock's granularity
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_a_sound_bundle_passes_without_hashing_again(library, hashed):
    info = _add(library, {"model.onnx": b"graph", "model.onnx.data": b"weights" * 100})
    hashed.clear()  # adding hashed every file once, and remembered them
    library.check(info)
    Library(library.root).check(info)  # a new process (the record is on disk)
    assert hashed == []


def test_a_flipped_byte_refuses_the_load_naming_the_model_and_file_not_a_path(library):
    info = _add(library, {"model.onnx": b"graph", "model.onnx.data": b"weights" * 100})
    library.check(info)
    _flip_a_byte(info.path / "model.onnx.data")
    with pytest.raises(LibraryCorrupt) as refused:
        library.check(info)
    message = refused.value.message
    assert '"m:latest"' in message and "model.onnx.data" in message
    assert str(library.root) not in message and "/" not in message.replace("m:latest", "")
    (result,) = library.verify()  # `ortserve verify` agrees
    assert not result.ok and "model.onnx.data" in result.problem


def test_only_changed_files_are_hashed_again(library, hashed):
    info = _add(library, {"model.onnx": b"graph", "model.onnx.data": b"weights"})
    library.check(info)
    data = info.path / "model.onnx.data"
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched, same bytes
    hashed.clear()
    library.check(info)
    assert hashed == ["model.onnx.data"]
    hashed.clear()
    library.check(info)  # and remembered again
    assert hashed == []


def test_same_size_same_mtime_is_trusted_which_is_the_price_of_cheap(library):
    """Documented limit: a change that keeps size and mtime is caught by `verify` only."""
    info = _add(library, {"model.onnx.data": b"weights"})
    data = info.path / "model.onnx.data"
    stat = data.stat()
    data.write_bytes(b"WEIGHTS")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    library.check(info)
    assert not library.verify()[0].ok


def test_missing_and_extra_files_are_refused(library):
    info = _add(library, {"model.onnx": b"graph", "tokenizer.json": b"{}"})
    (info.path / "tokenizer.json").unlink()
    with pytest.raises(LibraryCorrupt, match="tokenizer.json"):
        library.check(info)
    (info.path / "tokenizer.json").write_bytes(b"{}")
    (info.path / "extra.onnx").write_bytes(b"smuggled")
    with pytest.raises(LibraryCorrupt, match="extra.onnx"):
        library.check(info)


def test_a_broken_index_is_refused(library):
    info = _add(library, {"model.onnx": b"graph"})
    (info.path / store.INDEX_FILE).write_text("{not json")
    with pytest.raises(LibraryCorrupt, match="missing or unreadable"):
        library.check(info)


def test_an_unreadable_record_only_costs_a_hash(library, hashed):
    info = _add(library, {"model.onnx": b"graph"})
    (library.root / VERIFIED_FILE).write_text("[garbage")
    fresh = Library(library.root)
    hashed.clear()
    fresh.check(info)
    assert hashed == ["model.onnx"]
    assert info.digest in json.loads((library.root / VERIFIED_FILE).read_text())


def test_a_read_only_library_still_checks(library, monkeypatch, hashed):
    info = _add(library, {"model.onnx": b"graph"})
    fresh = Library(library.root)
    (library.root / VERIFIED_FILE).unlink()

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(store, "_write_json_atomic", refuse)
    hashed.clear()
    fresh.check(info)
    fresh.check(info)  # remembered in memory
    assert hashed == ["model.onnx"]


def test_prune_forgets_removed_bundles(library):
    info = _add(library, {"model.onnx": b"graph"})
    library.delete("m")
    library.prune()
    record = json.loads((library.root / VERIFIED_FILE).read_text())
    assert info.digest not in record
