"""Audio uploads: decoded to 16 kHz mono with soundfile and soxr, bounded before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from ortserve.errors import InvalidRequest
from ortserve.serving.audio import (
    MAX_UPLOAD_BYTES,
    AudioTooLarge,
    TranscriptionRequest,
    _check_fields,
    decode_audio,
)


def _file(pcm: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_each_container_decodes_to_16khz_mono(fmt):
    pcm = decode_audio(_file(_tone(1.0, 16000), 16000, fmt))
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(len(pcm) - 16000) <= 1200  # mp3 and ogg add encoder padding
    assert 0.2 < np.abs(pcm).max() < 0.4


def test_other_rates_and_channels_are_resampled_and_mixed():
    pcm = decode_audio(_file(_tone(1.5, 44100, channels=2), 44100))
    assert abs(len(pcm) - 24000) <= 8
    assert abs(float(np.sqrt(np.mean(pcm[1000:-1000] ** 2))) - 0.3 / np.sqrt(2)) < 0.01


def test_the_duration_is_refused_from_the_header_before_decoding():
    data = _file(np.zeros(8000 * 11, np.float32), 8000, subtype="PCM_U8")
    with pytest.raises(InvalidRequest) as refused:
        decode_audio(data, max_seconds=10)
    assert refused.value.param == "file" and "11.0 seconds" in refused.value.message
    assert len(decode_audio(data, max_seconds=12)) == 16000 * 11


@pytest.mark.parametrize(
    ("data", "words"),
    [(b"", "empty"), (b"hello, not audio", "not audio"), (b"RIFF\0\0\0\0WAVEfmt ", "not audio")],
)
def test_what_is_not_audio_is_a_400_naming_file(data, words):
    with pytest.raises(InvalidRequest) as refused:
        decode_audio(data)
    assert refused.value.param == "file" and words in refused.value.message


def test_a_file_with_no_samples_is_refused():
    with pytest.raises(InvalidRequest, match="no audio samples"):
        decode_audio(_file(np.zeros(0, np.float32), 16000))


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"response_format": "xml"}, "response_format"), ({"temperature": 1.5}, "temperature"),
     ({"temperature": -0.1}, "temperature"), ({"prompt": "x" * 10_001}, "prompt")],
)  # fmt: skip
def test_fields_are_checked_before_the_audio(fields, param):
    with pytest.raises(InvalidRequest) as refused:
        _check_fields(TranscriptionRequest(model="m", audio=b"", **fields))
    assert refused.value.param == param


def test_an_upload_over_the_limit_is_a_413():
    with pytest.raises(AudioTooLarge) as refused:
        _check_fields(TranscriptionRequest(model="m", audio=b"\0" * (MAX_UPLOAD_BYTES + 1)))
    assert refused.value.status == 413 and refused.value.param == "file"


def test_non_finite_and_overloud_samples_are_made_finite():
    pcm = _tone(1.0, 16000)
    pcm[100:200] = np.nan
    pcm[300:400] = 7.0
    decoded = decode_audio(_file(pcm, 16000, subtype="FLOAT"))
    assert np.isfinite(decoded).all() and np.abs(decoded).max() <= 1.0
