"""Speech to text, protocol-neutral: decode and bound the upload, lease the model, transcribe.

Every request is bounded before its expensive step: the upload's size by the HTTP layer
(MAX_UPLOAD_BYTES), the audio's duration from its header before any sample is decoded
(MAX_AUDIO_SECONDS), and the decode itself reads at most that many frames, block by block,
into 16 kHz mono (soundfile: libsndfile with WAV, FLAC, MP3 and Ogg/Vorbis/Opus; soxr
resamples), so a lying header cannot make it read more.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np

from ortserve.errors import InvalidRequest, OrtServeError
from ortserve.serving.core import require

SAMPLE_RATE = 16000
# OpenAI's own limit on an audio upload.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
# Audio one request may hold: 20 of Whisper's 30-second windows, each at most a context of
# tokens, so a request's time is bounded too.
MAX_AUDIO_SECONDS = 600  # ORTSERVE_MAX_AUDIO_SECONDS' default (config.py)
# What a header may claim before it is refused outright.
MAX_CHANNELS = 64
MAX_SAMPLE_RATE = 384_000
_BLOCK_SECONDS = 10  # decoded at a time: memory is one block plus the 16 kHz result
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# formats that show times: the model writes its timestamp tokens for them
TIMED_FORMATS = ("srt", "verbose_json", "vtt")


class AudioTooLarge(OrtServeError):
    """An upload over MAX_UPLOAD_BYTES (413, naming the field)."""

    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int = MAX_UPLOAD_BYTES):
        super().__init__(f"file is larger than {limit // 2**20} MiB, the limit of one audio "
                         "upload", param="file")  # fmt: skip


@dataclass
class TranscriptionRequest:
    """One transcription or translation, its fields checked by the protocol layer."""

    model: str
    audio: bytes
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # ISO-639-1; None: detected
    prompt: str = ""
    response_format: str = "json"
    temperature: float = 0.0
    keep_alive: float | None = None

    @property
    def timestamps(self) -> bool:
        return self.response_format in TIMED_FORMATS


@dataclass(frozen=True)
class Transcription:
    """The engine's Transcript and how long the request took."""

    transcript: object  # engine.speech.Transcript
    task: str
    total_ns: int
    load_ns: int


def transcribe(state, request: TranscriptionRequest) -> Transcription:
    """Check, decode, lease, run: the request's Transcription.

    `state` gives the library and runtime (api/state.ServerState). The model is checked
    before the audio is decoded, and the audio before the model is loaded.
    """
    started = time.perf_counter_ns()
    _check_fields(request)
    # 404 for an unknown model, 400 for one that does not hear, before decoding
    info = require(state.library, request.model, "audio",
                   "audio transcription; use a speech recognition model (Whisper)")  # fmt: skip
    pcm = decode_audio(request.audio, state.settings.max_audio_seconds)
    runtime = state.runtime
    loaded = runtime.acquire(info, request.keep_alive)
    failed = True
    try:
        load_ns = loaded.load_duration_ns
        transcript = loaded.transcribe(
            pcm, language=request.language, task=request.task, prompt=request.prompt,
            temperature=request.temperature, timestamps=request.timestamps,
        )  # fmt: skip
        failed = False
    finally:
        runtime.release(loaded, request.keep_alive, failed=failed)
    return Transcription(transcript, request.task, time.perf_counter_ns() - started, load_ns)


def _check_fields(request: TranscriptionRequest) -> None:
    if request.response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, "
                             f"got {request.response_format!r}", param="response_format")  # fmt: skip
    if not 0.0 <= request.temperature <= 1.0:
        raise InvalidRequest("temperature must be between 0 and 1", param="temperature")
    if len(request.prompt) > 10_000:  # the model reads its last 223 tokens at most
        raise InvalidRequest("prompt is longer than 10000 characters", param="prompt")
    if len(request.audio) > MAX_UPLOAD_BYTES:
        raise AudioTooLarge()


# ---- decoding ------------------------------------------------------------------------------


def decode_audio(data: bytes, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """16 kHz mono float32 PCM of an audio file (WAV, FLAC, MP3, Ogg...) in memory.

    The header's duration is checked before decoding; decoding stops past `max_seconds` in
    any case (a header may understate its frames).
    """
    import soundfile

    if not data:
        raise InvalidRequest("file is empty", param="file")
    try:
        source = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"file is not audio this server can decode (WAV, FLAC, MP3, Ogg "
                             f"Vorbis/Opus...): {_reason(exc)}", param="file") from None  # fmt: skip
    with source:
        _check_header(source, max_seconds)
        return _read_mono_16k(source, max_seconds)


def _check_header(source, max_seconds: float) -> None:
    if not 0 < source.samplerate <= MAX_SAMPLE_RATE or not 0 < source.channels <= MAX_CHANNELS:
        raise InvalidRequest(f"file has an unusable format ({source.samplerate} Hz, "
                             f"{source.channels} channels)", param="file")  # fmt: skip
    if source.frames > max_seconds * source.samplerate:
        raise _too_long(source.frames / source.samplerate, max_seconds)


def _read_mono_16k(source, max_seconds: float) -> np.ndarray:
    """Decode block by block: mixed to mono, resampled to 16 kHz as it streams."""
    import soundfile
    import soxr

    rate = source.samplerate
    limit = int(max_seconds * rate)
    resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
    pieces, read = [], 0
    try:
        for block in source.blocks(blocksize=rate * _BLOCK_SECONDS, dtype="float32",
                                   always_2d=True):  # fmt: skip
            read += len(block)
            if read > limit:
                raise _too_long(read / rate, max_seconds)
            pieces.append(resampler.resample_chunk(block.mean(axis=1)))
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise InvalidRequest(f"file could not be decoded: {_reason(exc)}", param="file") from None
    pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    pcm = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if not len(pcm):
        raise InvalidRequest("file holds no audio samples", param="file")
    # a float file may hold NaN or values past full scale: the features need finite samples
    return np.clip(np.nan_to_num(pcm, nan=0.0), -1.0, 1.0).astype(np.float32, copy=False)


def _too_long(seconds: float, limit: float) -> InvalidRequest:
    return InvalidRequest(f"file is too long: {seconds:.1f} seconds of audio, more than the "
                          f"{limit:g} seconds one request may transcribe", param="file",
                          code="audio_too_long")  # fmt: skip


def _reason(exc: BaseException) -> str:
    """libsndfile's own words, without the in-memory file's object name."""
    text = str(exc).split(": ", 1)[-1] if "<_io.BytesIO" in str(exc) else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
