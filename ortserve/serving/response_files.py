"""Stored Responses API answers as files under the library root, for several processes.

ResponseStore (store.py) keeps them in one process's memory. Replicas of a cluster (and
any servers sharing one library) each have their own process, so a follow-up turn
(previous_response_id) or a GET routed to another replica would not find the answer: with
ORTSERVE_RESPONSES_STORE=library they are kept as `<library>/responses/<id>.json` instead.

- Each file is written atomically (a temporary file renamed into place): a reader in another
  process sees the whole answer or none.
- Ids are checked against the exact shape new_id("resp") makes before any path is built, so
  no id can name a file outside the folder.
- Bounded as the memory store is: the MAX_STORED most recently created or read (a read
  touches the file's mtime), the oldest removed first; and an answer whose JSON is larger
  than max_entry_bytes is not stored (a 404 later, as for one dropped from the store).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import asdict
from pathlib import Path

from ortserve.errors import LibraryCorrupt
from ortserve.library.store import read_json, write_json_atomic
from ortserve.serving.store import MAX_STORED, ResponseNotFound, StoredResponse

log = logging.getLogger("ortserve.responses")

FOLDER = "responses"
# What new_id("resp") makes: "resp_" and 24 random bytes in hex. Nothing else is a file name.
_ID = re.compile(r"resp_[0-9a-f]{48}")
# One stored answer at most: a whole conversation far past any model's context, while the
# store's MAX_STORED files stay well below a library's size.
MAX_ENTRY_BYTES = 16 << 20
# The temporary file of an atomic write lives milliseconds; one this old was abandoned (a
# process killed mid-write) and is removed when the folder is trimmed.
_TEMP_GRACE_S = 600


class LibraryResponseStore:
    """ResponseStore's interface (put, get, delete, len) over files in `root`/responses."""

    def __init__(self, root: Path, capacity: int = MAX_STORED,
                 max_entry_bytes: int = MAX_ENTRY_BYTES):  # fmt: skip
        self.dir = Path(root) / FOLDER
        self.capacity = capacity
        self.max_entry_bytes = max_entry_bytes

    def __len__(self) -> int:
        return len(self._entries())

    def put(self, stored: StoredResponse) -> None:
        """Store `stored` under its id, then trim the folder to `capacity` (oldest first)."""
        response_id = stored.response["id"]
        if not _ID.fullmatch(response_id):  # our own ids always match: a bug, not input
            raise ValueError(f"not a response id: {response_id!r}")
        record = asdict(stored)
        size = len(json.dumps(record, ensure_ascii=False).encode())
        if size > self.max_entry_bytes:
            log.warning("response %s not stored: %d bytes, more than %d", response_id, size,
                        self.max_entry_bytes)  # fmt: skip
            return
        write_json_atomic(self._path(response_id), record)
        self._trim()

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response (now the most recently used); 404 naming `param` otherwise."""
        record = self._read(response_id) if _ID.fullmatch(response_id) else None
        if record is None:
            what = "Previous response" if param == "previous_response_id" else "Response"
            raise ResponseNotFound(f"{what} with id '{response_id}' not found.", param=param)
        with contextlib.suppress(OSError):  # removed meanwhile: it was read all the same
            os.utime(self._path(response_id))
        return StoredResponse(record["response"], record["conversation"])

    def delete(self, response_id: str) -> None:
        if _ID.fullmatch(response_id):
            with contextlib.suppress(FileNotFoundError):
                self._path(response_id).unlink()
                return
        raise ResponseNotFound(f"Response with id '{response_id}' not found.")

    def _path(self, response_id: str) -> Path:
        return self.dir / f"{response_id}.json"

    def _read(self, response_id: str) -> dict | None:
        """The record, or None; a file that is not one (damaged by hand) is not found."""
        try:
            record = read_json(self._path(response_id))
        except LibraryCorrupt:
            log.warning("stored response %s cannot be read", response_id, exc_info=True)
            return None
        if not isinstance(record, dict) or not {"response", "conversation"} <= record.keys():
            return None
        return record

    def _entries(self) -> list[os.DirEntry]:
        """The stored answers' files (not the temporary files of writes in progress)."""
        try:
            with os.scandir(self.dir) as entries:
                return [entry for entry in entries if _is_answer(entry.name)]
        except FileNotFoundError:
            return []

    def _trim(self) -> None:
        """Remove the oldest answers beyond `capacity`, and abandoned temporary files.
        Several processes may trim at once: a file another removed first is skipped."""
        entries, now = [], time.time_ns()
        with os.scandir(self.dir) as listing:
            for entry in listing:
                with contextlib.suppress(FileNotFoundError):
                    mtime = entry.stat().st_mtime_ns
                    if _is_answer(entry.name):
                        entries.append((mtime, entry.path))
                    elif entry.name.startswith(".resp_") and now - mtime > _TEMP_GRACE_S * 1e9:
                        os.unlink(entry.path)
        entries.sort()
        for _, path in entries[: max(0, len(entries) - self.capacity)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _is_answer(file_name: str) -> bool:
    """A stored answer's file: `<id>.json` (not a temporary file of a write in progress)."""
    return file_name.endswith(".json") and _ID.fullmatch(file_name[:-5]) is not None
