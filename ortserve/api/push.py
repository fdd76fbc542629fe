"""POST /api/push: a library model to a Hugging Face Hub repository, NDJSON progress.

Ollama's body is `{"model": NAME, "insecure", "stream"}` and pushes NAME to the registry its
name names; here NAME may be named after its destination (`hf.co/ORG/REPO[:VARIANT]`), or
`destination` says where it goes. The push uses the server's HF_TOKEN and HF_ENDPOINT."""

from __future__ import annotations

from flask import Blueprint

from ortserve.api.protocol import MODEL, Protocol, Route, ndjson_or_json
from ortserve.api.pull import ProgressJob, progress_lines
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response, stream_response
from ortserve.api.validation import read_json, validate
from ortserve.library import Library
from ortserve.models.push import PushResult, PushTarget, parse_target, push

push_bp = Blueprint("push", __name__)


@push_bp.post("/api/push")
def push_model():
    body = read_json()
    if "model" not in body and "name" in body:  # older clients send `name`
        body = {**body, "model": body.pop("name")}
    body = validate("push", body)
    library = current_state().library
    name = library.get(body["model"]).name  # an unknown model is a 404 before anything starts
    destination = body.get("destination")
    target = parse_target(destination if destination is not None else name,
                          "destination" if destination is not None else "model")  # fmt: skip
    job = _PushJob(name, target, library)
    if not body.get("stream", True):
        job.run()
        return json_response({"status": "success"})
    job.start()
    head = job.head()  # an error before any upload keeps its HTTP status
    return stream_response(progress_lines(head, job), on_close=job.cancel.set)


class _PushJob(ProgressJob):
    """One push."""

    first = "retrieving manifest"
    what = "push"

    def __init__(self, name: str, target: PushTarget, library: Library):
        super().__init__(name)
        self.target = target
        self.library = library

    def run(self) -> PushResult:
        return push(self.label, self.target.text, library=self.library,
                    progress=self.events.put, cancel=self.cancel)  # fmt: skip


PROTOCOL = Protocol("push", push_bp, rank=13, routes=(
    Route("POST", "/api/push", "Push a model to a Hugging Face Hub repository", "push",
          ndjson_or_json("Status"), (*MODEL, 502)),
))  # fmt: skip
