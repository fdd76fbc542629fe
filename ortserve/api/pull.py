"""POST /api/pull: a model from the Hugging Face Hub into the library, NDJSON progress.

`model` is a repository reference or a short name (`llama3.2`, what `ollama pull` sends),
which models.pull resolves through the catalog; the library name is the short name."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ortserve.api.protocol import MODEL, Protocol, Route, ndjson_or_json
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response, ndjson_line, stream_response
from ortserve.api.validation import read_json, validate
from ortserve.errors import OrtServeError
from ortserve.library import Library, ModelInfo
from ortserve.models.pull import PullRef, PullStatus, pull

log = logging.getLogger("ortserve.api")

pull_bp = Blueprint("pull", __name__)
_END = object()


@pull_bp.post("/api/pull")
def pull_model():
    body = read_json()
    if "model" not in body and "name" in body:  # older clients send `name`
        body = {**body, "model": body.pop("name")}
    body = validate("pull", body)
    # a client must not make the server read (or probe) its own folders
    ref = PullRef.parse(body["model"], local=False)
    job = _PullJob(ref, current_state().library, current_state().started_runtime)
    if not body.get("stream", True):
        job.run()
        return json_response({"status": "success"})
    job.start()
    head = job.head()  # an error before any progress keeps its HTTP status
    return stream_response(progress_lines(head, job), on_close=job.cancel.set)


class ProgressJob:
    """Work that reports PullStatus progress (a pull, a push), in the request thread or on a
    worker feeding a queue; `first` is its opening status, sent before anything can fail
    slowly, so an error up to then keeps its HTTP status."""

    first = "pulling manifest"
    what = "pull"

    def __init__(self, label: str):
        self.label = label
        self.events: queue.Queue = queue.Queue()
        self.cancel = threading.Event()

    def run(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        threading.Thread(target=self._work, name=f"ortserve-{self.what}", daemon=True).start()

    def _work(self) -> None:
        try:
            self.run()
        except OrtServeError as exc:
            self.events.put(exc)
        except Exception:
            log.exception("unexpected error in the %s of %s", self.what, self.label)
            self.events.put(OrtServeError("internal error"))
        finally:
            self.events.put(_END)

    def head(self) -> list[Any]:
        """Events up to the first beyond `first`; raise if the job failed before that."""
        items: list[Any] = []
        while True:
            item = self.events.get()
            if isinstance(item, OrtServeError):
                raise item
            items.append(item)
            if item is _END or item.status != self.first:
                return items

    def rest(self) -> Iterator[Any]:
        while (item := self.events.get()) is not _END:
            yield item


class _PullJob(ProgressJob):
    """One pull."""

    def __init__(self, ref: PullRef, library: Library, runtime: Any):
        super().__init__(ref.text)
        self.ref = ref
        self.library = library
        self.runtime = runtime

    def run(self) -> ModelInfo:
        name = self.ref.default_name()
        before = self.library.get(name).digest if self.library.exists(name) else None
        info = pull(self.ref, library=self.library, progress=self.events.put, cancel=self.cancel)
        if self.runtime is not None and before not in (None, info.digest):
            self.runtime.unload(info.name)  # the name means another bundle now
        return info


def progress_lines(head: list[Any], job: ProgressJob) -> Iterator[str]:
    """A job's progress as NDJSON lines; an error after the first line is the last line."""
    items = head if head[-1] is _END else itertools.chain(head, job.rest())
    for item in items:
        if item is _END:
            return
        if isinstance(item, OrtServeError):  # the status is sent already: the error goes last
            yield ndjson_line({"error": item.message})
            return
        if isinstance(item, PullStatus):
            yield ndjson_line(item.as_dict())


PROTOCOL = Protocol("pull", pull_bp, rank=12, routes=(
    Route("POST", "/api/pull", "Pull a model from the Hugging Face Hub", "pull",
          ndjson_or_json("Status"), (*MODEL, 501, 502)),
))  # fmt: skip
