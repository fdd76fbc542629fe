"""OpenAI's Batch API: /v1/files (batch input and output files) and /v1/batches.

The files and batches are serving/batches.py's (on disk, under the library root); this module
maps HTTP onto them. Each belongs to the API key that made it (g.ortserve_key_name, set by
api/security.py): another key gets 404, as for an id that never existed. Errors take
OpenAI's shape in api/app.py.
"""

from __future__ import annotations

import functools
from typing import Any

from flask import Blueprint, Flask, current_app, g, request, send_file
from werkzeug.exceptions import RequestEntityTooLarge

from ortserve.api.batchexec import LineExecutor
from ortserve.api.protocol import (
    FILE,
    GUARDED,
    JSON_BODY,
    Protocol,
    Route,
    form_body,
    json_body,
    path_parameter,
    query,
    text,
)
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response
from ortserve.api.validation import parsed_body
from ortserve.errors import InvalidRequest
from ortserve.serving.batches import BatchStore, FileTooLarge, page

batch_bp = Blueprint("batch", __name__)

# Room for the multipart framing and the purpose field around the file itself.
_FORM_OVERHEAD = 64 * 1024


def _store() -> BatchStore:
    return current_state().batches


def _owner() -> str:
    """The key name the request came with; "" when the server asks no key."""
    return g.get("ortserve_key_name") or ""


# ---- files -------------------------------------------------------------------------------------


@batch_bp.post("/v1/files")
def upload_file():
    """multipart/form-data with `file` and `purpose` (the openai SDK's files.create)."""
    if request.mimetype != "multipart/form-data":
        raise InvalidRequest(
            "send multipart/form-data with the fields file and purpose", param="file"
        )
    store = _store()
    limit = store.max_file_bytes + _FORM_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        raise FileTooLarge(store.max_file_bytes)
    request.max_content_length = limit  # above the JSON body limit; the parser spills to disk
    try:
        upload, purpose = request.files.get("file"), request.form.get("purpose")
    except RequestEntityTooLarge:
        raise FileTooLarge(store.max_file_bytes) from None
    if upload is None:
        raise InvalidRequest("file is required", param="file")
    if not purpose:
        raise InvalidRequest("purpose is required", param="purpose")
    try:
        created = store.add_file(upload.stream, upload.filename or "file.jsonl", purpose, _owner())
    finally:
        upload.close()
    return json_response(created)


@batch_bp.get("/v1/files")
def list_files():
    files = _store().list_files(_owner(), request.args.get("purpose"))
    if request.args.get("order", "desc") == "asc":
        files.reverse()
    return json_response(page(files, _int_arg("limit", 10000, 10000), request.args.get("after")))


@batch_bp.get("/v1/files/<file_id>")
def get_file(file_id: str):
    return json_response(_store().file(file_id, _owner()))


@batch_bp.delete("/v1/files/<file_id>")
def delete_file(file_id: str):
    return json_response(_store().delete_file(file_id, _owner()))


@batch_bp.get("/v1/files/<file_id>/content")
def file_content(file_id: str):
    path = _store().file_content(file_id, _owner())
    return send_file(path, mimetype="application/octet-stream", as_attachment=False,
                     conditional=False, etag=False)  # fmt: skip


# ---- batches -----------------------------------------------------------------------------------


@batch_bp.post("/v1/batches")
def create_batch():
    body = parsed_body("batch_create")
    batch = _store().create_batch(
        _owner(), body["input_file_id"], body["endpoint"], body["completion_window"],
        body.get("metadata"),
    )  # fmt: skip
    start_runner(current_app._get_current_object(), current_state())  # type: ignore[attr-defined]
    return json_response(batch)


@batch_bp.get("/v1/batches")
def list_batches():
    batches = _store().list_batches(_owner())
    return json_response(page(batches, _int_arg("limit", 20, 100), request.args.get("after")))


@batch_bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    return json_response(_store().batch(batch_id, _owner()))


@batch_bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    batch = _store().cancel(batch_id, _owner())
    # the runner notices the cancel now, not at its next look
    start_runner(current_app._get_current_object(), current_state())  # type: ignore[attr-defined]
    return json_response(batch)


def start_runner(app: Flask, state: Any, *, only_if_pending: bool = False) -> None:
    """The batch runner of `app`: each line runs through the app itself, as its owner."""
    state.start_batches(functools.partial(LineExecutor, app), only_if_pending=only_if_pending)


def _int_arg(name: str, default: int, most: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise InvalidRequest(f"{name} must be an integer from 1 to {most}", param=name)
    return int(value)


_FILE_ID = path_parameter("file_id", "a file's id (file-...)")
_BATCH_ID = path_parameter("batch_id", "a batch's id (batch_...)")
_AFTER = query("after", "the id the page starts after", type="string")

# Errors in OpenAI's shape: its paths are under /v1, which openai.PROTOCOL owns.
PROTOCOL = Protocol("batch", batch_bp, rank=40, routes=(
    Route("POST", "/v1/files", "Upload a batch input file (JSONL, multipart/form-data)", None,
          json_body("OpenAIFile"), (*GUARDED, 400, 413),
          form=form_body(("file", "purpose"), file=FILE, purpose={"enum": ["batch"]})),
    Route("GET", "/v1/files", "This key's files, newest first", None, json_body("OpenAIFileList"),
          (*GUARDED, 400), (query("purpose", "only files of this purpose", type="string"),
                            query("limit", "files per page", type="integer", minimum=1,
                                  maximum=10000),
                            query("order", "by creation time", enum=["asc", "desc"]), _AFTER)),
    Route("GET", "/v1/files/{file_id}", "One file", None, json_body("OpenAIFile"),
          (*GUARDED, 404), (_FILE_ID,)),
    Route("DELETE", "/v1/files/{file_id}", "Delete a file", None, json_body("FileDeleted"),
          (*GUARDED, 404), (_FILE_ID,)),
    Route("GET", "/v1/files/{file_id}/content", "A file's content", None,
          text("application/octet-stream", "the file's bytes (JSONL)"), (*GUARDED, 404),
          (_FILE_ID,)),
    Route("POST", "/v1/batches", "Run an uploaded file's lines as a batch", "batch_create",
          json_body("Batch"), (*JSON_BODY, 404)),
    Route("GET", "/v1/batches", "This key's batches, newest first", None, json_body("BatchList"),
          (*GUARDED, 400), (query("limit", "batches per page", type="integer", minimum=1,
                                  maximum=100), _AFTER)),
    Route("GET", "/v1/batches/{batch_id}", "One batch", None, json_body("Batch"),
          (*GUARDED, 404), (_BATCH_ID,)),
    Route("POST", "/v1/batches/{batch_id}/cancel", "Cancel a batch: no more lines start",
          None, json_body("Batch"), (*GUARDED, 404, 409), (_BATCH_ID,)),
))  # fmt: skip
