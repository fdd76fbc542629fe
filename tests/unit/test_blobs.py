"""The blob store (Library.add_blob & co) and HEAD/POST /api/blobs/:digest."""

from __future__ import annotations

import hashlib
import io
import os
import time

import pytest

from ortserve.errors import InvalidRequest

DATA = b"some adapter weights" * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
OTHER = "sha256:" + hashlib.sha256(b"something else").hexdigest()


@pytest.fixture
def runtime():
    return None  # blobs never need the engine


class Trickle(io.RawIOBase):
    """A stream that hands out a few bytes per read, as a socket does."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def readable(self):
        return True

    def read(self, size=-1):
        return self.data.read(min(size, 7) if size and size > 0 else 7)


def test_add_blob_checks_the_digest_while_writing(library):
    path = library.add_blob(Trickle(DATA), DIGEST)
    assert path == library.blob_path(DIGEST) == library.blobs_dir / DIGEST.replace(":", "-")
    assert path.read_bytes() == DATA and library.has_blob(DIGEST)
    # the `sha256-` form and upper-case hex name the same blob
    assert library.has_blob(DIGEST.replace(":", "-").upper().replace("SHA256", "sha256"))


def test_a_wrong_digest_leaves_nothing(library):
    with pytest.raises(InvalidRequest) as err:
        library.add_blob(io.BytesIO(DATA), OTHER)
    assert err.value.message == f"digest mismatch: expected {OTHER}, got {DIGEST}"
    assert err.value.param == "digest"
    assert not library.has_blob(OTHER) and list(library.blobs_dir.iterdir()) == []


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 64, "sha256:" + "g" * 64, "", 7])
def test_malformed_digests_are_refused(library, bad):
    with pytest.raises(InvalidRequest, match="invalid digest"):
        library.blob_path(bad)


def test_prune_keeps_used_and_recent_blobs(library):
    old = library.add_blob(io.BytesIO(DATA), DIGEST)
    recent_data = b"recent"
    recent = library.add_blob(
        io.BytesIO(recent_data), "sha256:" + hashlib.sha256(recent_data).hexdigest()
    )
    partial = library.blobs_dir / ".partial-abandoned"
    partial.write_bytes(b"half")
    hour_ago = time.time() - 3700
    for path in (old, partial):
        os.utime(path, (hour_ago, hour_ago))
    assert library.prune() == [old.name]
    assert not old.exists() and not partial.exists() and recent.exists()


def test_prune_keeps_blobs_a_manifest_names(library, tmp_path):
    path = library.add_blob(io.BytesIO(DATA), DIGEST)
    hour_ago = time.time() - 3700
    os.utime(path, (hour_ago, hour_ago))
    staged = tmp_path / "b"
    staged.mkdir()
    (staged / "genai_config.json").write_text("{}")
    library.add("adapted", staged, {"adapters": [{"name": "a", "digest": DIGEST}]})
    assert library.prune() == [] and path.exists()


# ---- HTTP -----------------------------------------------------------------------------------------


def test_head_and_post(client, library):
    assert client.head(f"/api/blobs/{DIGEST}").status_code == 404
    response = client.post(f"/api/blobs/{DIGEST}", data=DATA)
    assert response.status_code == 201
    assert library.blob_path(DIGEST).read_bytes() == DATA
    assert client.head(f"/api/blobs/{DIGEST}").status_code == 200
    assert client.post(f"/api/blobs/{DIGEST}", data=DATA).status_code == 200  # already there


def test_post_with_a_wrong_digest_is_400_and_stores_nothing(client, library):
    response = client.post(f"/api/blobs/{OTHER}", data=DATA)
    assert response.status_code == 400
    assert response.get_json() == {"error": f"digest mismatch: expected {OTHER}, got {DIGEST}"}
    assert client.head(f"/api/blobs/{OTHER}").status_code == 404
    assert not any(library.blobs_dir.iterdir())


def test_malformed_digest_is_400(client):
    response = client.post("/api/blobs/sha256:nothex", data=b"x")
    assert response.status_code == 400
    assert "invalid digest 'sha256:nothex'" in response.get_json()["error"]
    assert client.head("/api/blobs/nothex").status_code == 400


def test_blobs_may_exceed_the_json_body_limit(client, library, monkeypatch):
    from ortserve.api import validation

    data = os.urandom(3 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    client.application.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # JSON bodies: 1 MiB here
    assert client.post(f"/api/blobs/{digest}", data=data).status_code == 201
    assert library.blob_path(digest).read_bytes() == data
    monkeypatch.setattr(validation, "MAX_BLOB_BYTES", 1024)  # the blob limit still applies
    monkeypatch.setattr("ortserve.api.create.MAX_BLOB_BYTES", 1024)
    response = client.post(f"/api/blobs/{OTHER}", data=data)
    assert response.status_code == 413
    assert not library.has_blob(OTHER)
