"""OpenAI's audio API: /v1/audio/transcriptions and /v1/audio/translations (speech to text).

multipart/form-data as the openai SDK sends it (`file`, `model`, `language`, `prompt`,
`response_format`, `temperature`), answered as json, text, srt, vtt or verbose_json. The
serving work (decode, bounds, lease, run) is serving/audio.py's; errors take OpenAI's shape
(the /v1 paths are openai.py's).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from ortserve.api.protocol import FILE, GENERATION, Protocol, Route, form_body, json_body, text
from ortserve.api.state import current_state
from ortserve.api.streaming import json_response
from ortserve.errors import InvalidRequest, NotSupportedYet
from ortserve.serving.audio import (
    MAX_UPLOAD_BYTES,
    AudioTooLarge,
    Transcription,
    TranscriptionRequest,
    transcribe,
)

audio_bp = Blueprint("audio", __name__)

# Room for the multipart framing and the text fields around the file itself.
_FORM_OVERHEAD = 64 * 1024


@audio_bp.post("/v1/audio/transcriptions")
def transcriptions():
    """Speech to text in the language spoken."""
    return _answer(_request("transcribe"))


@audio_bp.post("/v1/audio/translations")
def translations():
    """Speech in any language to English text."""
    return _answer(_request("translate"))


# ---- the form ----------------------------------------------------------------------------------


def _request(task: str) -> TranscriptionRequest:
    """The form as a TranscriptionRequest; the upload is bounded before it is parsed."""
    if request.mimetype != "multipart/form-data":
        raise InvalidRequest("send multipart/form-data with the fields file and model",
                             param="file")  # fmt: skip
    limit = MAX_UPLOAD_BYTES + _FORM_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        raise AudioTooLarge()
    request.max_content_length = limit  # werkzeug stops a longer (chunked) body there
    try:
        form, upload = request.form, request.files.get("file")
    except RequestEntityTooLarge:
        raise AudioTooLarge() from None
    if upload is None:
        raise InvalidRequest("file is required: the audio to transcribe", param="file")
    model = form.get("model", "").strip()
    if not model:
        raise InvalidRequest("model is required", param="model")
    _refuse_later(form)
    try:
        data = upload.stream.read(MAX_UPLOAD_BYTES + 1)
    finally:
        upload.close()
    return TranscriptionRequest(
        model=model, audio=data, task=task, language=_language(form.get("language")),
        prompt=form.get("prompt") or "", response_format=form.get("response_format") or "json",
        temperature=_temperature(form.get("temperature")),
    )  # fmt: skip


def _language(value: str | None) -> str | None:
    """ISO-639-1 (as OpenAI asks); the model says later whether it knows it."""
    if value is None or not value.strip():
        return None
    code = value.strip().lower()
    if not code.isascii() or not code.replace("_", "").isalpha() or len(code) > 8:
        raise InvalidRequest(f"language must be an ISO-639-1 code such as 'en', got {value!r}",
                             param="language")  # fmt: skip
    return code


def _temperature(value: str | None) -> float:
    if value is None or not value.strip():
        return 0.0
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(f"temperature must be a number, got {value!r}",
                             param="temperature") from None  # fmt: skip
    if not math.isfinite(number):
        raise InvalidRequest("temperature must be a finite number", param="temperature")
    return number


def _refuse_later(form) -> None:
    """Fields this server does not do, refused by name rather than ignored."""
    granularities = form.getlist("timestamp_granularities[]") or form.getlist(
        "timestamp_granularities"
    )
    if any(g == "word" for g in granularities):
        raise NotSupportedYet("word timestamps are not supported; use 'segment'",
                              param="timestamp_granularities")  # fmt: skip
    if any(g not in ("word", "segment") for g in granularities):
        raise InvalidRequest("timestamp_granularities takes 'segment' (or 'word')",
                             param="timestamp_granularities")  # fmt: skip
    if form.get("stream", "false").lower() not in ("false", "0", ""):
        raise NotSupportedYet("streamed transcriptions are not supported", param="stream")


# ---- the answer --------------------------------------------------------------------------------


def _answer(req: TranscriptionRequest) -> Response:
    done = transcribe(current_state(), req)
    render = _RENDERERS[req.response_format]
    return render(done)


def _json(done: Transcription) -> Response:
    return json_response({"text": done.transcript.text, "usage": _usage(done)})


def _verbose(done: Transcription) -> Response:
    t = done.transcript
    segments = [
        {
            "id": i, "seek": int(s.start * 100), "start": s.start, "end": s.end,
            "text": s.text, "tokens": list(s.tokens), "temperature": 0.0,
            "compression_ratio": _compression_ratio(s.text),
        }
        for i, s in enumerate(t.segments)
    ]  # fmt: skip
    body = {"task": done.task, "language": t.language, "duration": round(t.duration, 3),
            "text": t.text, "segments": segments, "usage": _usage(done)}  # fmt: skip
    return json_response(body)


def _text(done: Transcription) -> Response:
    return Response(done.transcript.text + "\n", mimetype="text/plain")


def _srt(done: Transcription) -> Response:
    cues = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(done.transcript.segments, start=1)]  # fmt: skip
    return Response("\n".join(cues) + "\n", mimetype="text/plain")


def _vtt(done: Transcription) -> Response:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n"
            for s in done.transcript.segments]  # fmt: skip
    return Response("WEBVTT\n\n" + "\n".join(cues) + "\n", mimetype="text/vtt")


def _clock(seconds: float, comma: str) -> str:
    """01:02:03,450 (SRT) or 01:02:03.450 (WebVTT)."""
    ms = int(round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{comma}{ms:03d}"


def _usage(done: Transcription) -> dict[str, Any]:
    """OpenAI's usage of a duration-billed model: whole seconds of audio."""
    return {"type": "duration", "seconds": math.ceil(done.transcript.duration)}


def _compression_ratio(text_: str) -> float:
    """Whisper's repetition measure: text bytes over their zlib size."""
    raw = text_.encode("utf-8")
    return round(len(raw) / len(zlib.compress(raw)), 3) if raw else 0.0


_RENDERERS = {"json": _json, "verbose_json": _verbose, "text": _text, "srt": _srt, "vtt": _vtt}

_RESPONSES = {
    "200": {
        "description": "json/verbose_json: the transcript as JSON; text, srt, vtt: plain text",
        "content": {
            **json_body("OpenAITranscription")["200"]["content"],
            **text("text/plain", "")["200"]["content"],
            **text("text/vtt", "")["200"]["content"],
        },
    }
}
_SCHEMAS = {
    "OpenAITranscription": {
        "type": "object",
        "required": ["text"],
        "properties": {
            "text": {"type": "string"},
            "task": {"type": "string"},
            "language": {"type": ["string", "null"]},
            "duration": {"type": "number"},
            "segments": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": "object"},
        },
    }
}

# The form fields both routes take (transcriptions adds language), as OpenAI documents them.
_FORM = {
    "file": FILE,
    "model": {"type": "string"},
    "prompt": {"type": "string"},
    "response_format": {"enum": ["json", "text", "srt", "vtt", "verbose_json"]},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
}

# What _language takes: an ISO-639-1 code (or any short alphabetic code Whisper may know).
_LANGUAGE = {"type": "string", "pattern": "^([A-Za-z][A-Za-z_]{0,7})?$"}

PROTOCOL = Protocol(
    "audio", audio_bp, rank=21,  # errors: OpenAI's, as the owner of /v1
    generation_paths=("/v1/audio/transcriptions", "/v1/audio/translations"),
    routes=(
        Route("POST", "/v1/audio/transcriptions",
               "Speech to text (multipart/form-data: file, model, language, prompt, "
               "response_format, temperature)", None, _RESPONSES, (*GENERATION, 413),
               form=form_body(("file", "model"), **_FORM, language=_LANGUAGE)),
        Route("POST", "/v1/audio/translations",
               "Speech to English text (multipart/form-data: file, model, prompt, "
               "response_format, temperature)", None, _RESPONSES, (*GENERATION, 413),
               form=form_body(("file", "model"), **_FORM)),
    ),
    schemas=_SCHEMAS,
)  # fmt: skip
