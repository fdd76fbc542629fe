"""Speech to text end to end: a tiny random Whisper converted by the model builder, checked
against transformers at fp32, served by a real server and called with the official openai SDK.

Random weights transcribe into garbage: the server's answers are compared with the engine's
own output on the same decoded audio, and the engine's tokens with transformers', never with
words.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile

from converters import convert
from converters.speech import (
    genai_greedy,
    reference_features,
    sample_clip,
    transformers_greedy,
)
from ortserve.config import Settings
from ortserve.library import Library
from ortserve.models.create import described
from ortserve.serving.audio import MAX_AUDIO_SECONDS, MAX_UPLOAD_BYTES, decode_audio
from tests.integration.conftest import Server
from tests.support.bundles import cached_checkpoint, write_bundle

openai = pytest.importorskip("openai")

MODEL = "tiny-whisper"
PROMPT = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
CONTAINERS = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}


@pytest.fixture(scope="module")
def whisper_checkpoint(fixture_cache) -> Path:
    """The tiny random Whisper (converters/tiny.py), built once and cached."""
    from converters.tiny import build_whisper_checkpoint

    return cached_checkpoint(fixture_cache / "checkpoints" / "whisper", build_whisper_checkpoint)


@pytest.fixture(scope="module")
def speech_library(tmp_path_factory, whisper_checkpoint) -> Library:
    """tiny-whisper (fp32, through `convert`) and a text model that must refuse audio."""
    library = Library(tmp_path_factory.mktemp("speech") / "models")
    convert(whisper_checkpoint, MODEL, precision="fp32", library=library, progress=False)
    folder = write_bundle(tmp_path_factory.mktemp("text") / "bundle")
    with library.staging("text") as staged:
        shutil.copytree(folder, staged / "b")
        library.add("text-model", staged / "b", described(folder, "test"))
    return library


@pytest.fixture(scope="module")
def speech_server(speech_library):
    running = Server(speech_library)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(speech_server):
    return openai.OpenAI(base_url=speech_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(speech_library):
    """The same bundle loaded in this process, to compare the server's answers with."""
    from ortserve.engine.runtime import Runtime

    settings = replace(Settings.from_env(), models=speech_library.root, provider="cpu")
    runtime = Runtime(settings, speech_library)
    loaded = runtime.acquire(MODEL)
    yield loaded
    runtime.shutdown()


def encoded(container: str, pcm: np.ndarray | None = None, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, sample_clip() if pcm is None else pcm, rate,
                    format=CONTAINERS[container])  # fmt: skip
    return buffer.getvalue()


# ---- conversion and parity ---------------------------------------------------------------------


def test_the_converted_bundle_is_a_speech_bundle(speech_library):
    info = speech_library.get(MODEL)
    assert info.capabilities == ["audio"]
    assert info.details["format"] == "onnx-genai-speech"
    assert info.details["family"] == "whisper"
    files = {p.name for p in Path(info.path).iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "genai_config.json",
            "audio_processor_config.json", "tokenizer.json"} <= files  # fmt: skip
    figures = info.manifest["verification"]
    assert figures["greedy_match"] == figures["greedy_tokens"] == 32
    assert figures["logits_cosine"] >= 0.9999 and figures["top1_agreement"] == 1.0


def test_fp32_greedy_tokens_equal_transformers_end_to_end(speech_library, whisper_checkpoint):
    """og's own features and decoder vs transformers' feature extractor and model."""
    bundle = Path(speech_library.get(MODEL).path)
    pcm = sample_clip()
    ours = genai_greedy(bundle, pcm, PROMPT, 40)
    reference = reference_features(whisper_checkpoint, pcm)
    theirs, _ = transformers_greedy(whisper_checkpoint, reference, ours["prompt"], 40)
    assert np.abs(ours["features"] - reference).max() < 1e-3
    assert len(theirs) == 40 and len(set(theirs)) > 5  # varied tokens: a real comparison
    assert ours["tokens"] == theirs


def test_whisper_is_built_by_the_builder_only(whisper_checkpoint, tmp_path):
    from ortserve.errors import InvalidRequest

    library = Library(tmp_path / "models")
    with pytest.raises(InvalidRequest) as refused:
        convert(whisper_checkpoint, "w", backend="optimum", library=library, progress=False)
    assert refused.value.param == "backend"
    with pytest.raises(InvalidRequest) as refused:
        convert(whisper_checkpoint, "w", precision="fp16", library=library, progress=False)
    assert refused.value.param == "precision"
    assert library.list() == []


def test_timestamp_tokens_make_segments(engine):
    """Pairs of timestamps bound segments, offset by the window; text after the last one runs
    to the window's end; times are clamped to the audio."""
    ids = engine.vocab.ids
    words = engine.vocab.tokenizer.encode(" the model", add_special_tokens=False).ids
    at = {t: ids[f"<|{t:.2f}|>"] for t in (0.0, 1.0, 2.0, 29.0)}
    stream = [at[0.0], *words, at[1.0], at[1.0], *words, at[29.0], *words]
    segments = engine._segments(stream, 30.0, 2.5)
    assert [(s.start, s.end) for s in segments] == [(30.0, 31.0), (31.0, 32.5), (32.5, 32.5)]
    assert [s.text for s in segments] == [" the model"] * 3


# ---- serving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_each_container_transcribes_as_the_engine_does(client, engine, container):
    data = encoded(container)
    answer = client.audio.transcriptions.create(model=MODEL, file=(f"clip.{container}", data),
                                                language="en")  # fmt: skip
    direct = engine.transcribe(decode_audio(data), language="en")
    assert answer.text == direct.text and direct.text


def test_a_44khz_stereo_upload_is_mixed_and_resampled(client, engine):
    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1)
    data = encoded("wav", stereo.astype(np.float32), 44100)
    pcm = decode_audio(data)
    assert abs(len(pcm) - 32000) <= 16  # 2 s at 16 kHz
    answer = client.audio.transcriptions.create(model=MODEL, file=("s.wav", data), language="en")
    assert answer.text == engine.transcribe(pcm, language="en").text


def test_every_response_format(client, engine):
    data = encoded("wav")
    pcm = decode_audio(data)
    plain = engine.transcribe(pcm, language="en")
    timed = engine.transcribe(pcm, language="en", timestamps=True)

    def ask(fmt):
        return client.audio.transcriptions.create(model=MODEL, file=("c.wav", data),
                                                  language="en", response_format=fmt)  # fmt: skip

    assert ask("json").text == plain.text
    assert ask("text") == plain.text + "\n"
    verbose = ask("verbose_json")
    assert verbose.text == timed.text and verbose.language == "en"
    assert verbose.duration == pytest.approx(2.5)
    assert [s.text for s in verbose.segments] == [s.text for s in timed.segments]
    assert all(0 <= s.start <= s.end <= 2.5 for s in verbose.segments)
    srt, vtt = ask("srt"), ask("vtt")
    assert srt.count(" --> ") == vtt.count(" --> ") == len(timed.segments) >= 1
    assert srt.startswith("1\n00:00:0") and "," in srt.splitlines()[1]
    assert vtt.startswith("WEBVTT\n\n00:00:0")


def test_translation_and_prompt_and_detected_language(client, engine):
    data = encoded("flac")
    pcm = decode_audio(data)
    translated = client.audio.translations.create(model=MODEL, file=("c.flac", data))
    assert translated.text == engine.transcribe(pcm, task="translate").text
    prompted = client.audio.transcriptions.create(model=MODEL, file=("c.flac", data),
                                                  language="en", prompt="Hello there.")  # fmt: skip
    assert prompted.text == engine.transcribe(pcm, language="en", prompt="Hello there.").text
    detected = client.audio.transcriptions.create(model=MODEL, file=("c.flac", data),
                                                  response_format="verbose_json")  # fmt: skip
    assert detected.language == engine.transcribe(pcm).language in engine.languages


def test_long_audio_is_read_window_by_window(client, engine):
    pcm = np.tile(sample_clip(), 14)  # 35 s: two 30-second windows
    data = encoded("flac", pcm)
    verbose = client.audio.transcriptions.create(model=MODEL, file=("l.flac", data),
                                                 language="en", response_format="verbose_json")  # fmt: skip
    assert verbose.duration == pytest.approx(35.0)
    assert verbose.text == engine.transcribe(decode_audio(data), language="en",
                                             timestamps=True).text  # fmt: skip
    assert max(s.end for s in verbose.segments) > 30


def test_concurrent_requests_queue_on_the_one_model_and_agree(client, engine):
    from concurrent.futures import ThreadPoolExecutor

    data = encoded("ogg")

    def ask(_):
        return client.audio.transcriptions.create(model=MODEL, file=("c.ogg", data),
                                                  language="en").text  # fmt: skip

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert answers == [engine.transcribe(decode_audio(data), language="en").text] * 6


def test_show_ps_and_unload_know_the_audio_model(speech_server, client):
    url = speech_server.url
    client.audio.transcriptions.create(model=MODEL, file=("c.wav", encoded("wav")), language="en")
    shown = requests.post(url + "/api/show", json={"model": MODEL}, timeout=30).json()
    assert shown["capabilities"] == ["audio"]
    assert shown["details"]["format"] == "onnx-genai-speech"
    names = [m["name"] for m in requests.get(url + "/api/ps", timeout=30).json()["models"]]
    assert f"{MODEL}:latest" in names
    requests.post(url + "/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=30)
    names = [m["name"] for m in requests.get(url + "/api/ps", timeout=30).json()["models"]]
    assert f"{MODEL}:latest" not in names


# ---- bad input: a 400 (413 for the size) naming the field, never a 500 -----------------------


def _post(server, path="/v1/audio/transcriptions", **kwargs) -> requests.Response:
    return requests.post(server.url + path, timeout=60, **kwargs)


def _refused(response: requests.Response, status: int, param: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    return error["message"]


def _too_long_wav() -> bytes:
    """A valid WAV header claiming one second more than the limit (8-bit, 8 kHz: 4.8 MB)."""
    buffer = io.BytesIO()
    samples = np.zeros(8000 * (MAX_AUDIO_SECONDS + 1), np.float32)
    soundfile.write(buffer, samples, 8000, format="WAV", subtype="PCM_U8")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("form", "files", "status", "param"),
    [
        ({"model": MODEL}, {}, 400, "file"),
        ({"model": MODEL}, {"file": ("a.txt", b"this is not audio at all")}, 400, "file"),
        ({"model": MODEL}, {"file": ("empty.wav", b"")}, 400, "file"),
        ({}, {"file": ("c.wav", "wav")}, 400, "model"),
        ({"model": "text-model"}, {"file": ("c.wav", "wav")}, 400, "model"),
        ({"model": MODEL, "response_format": "xml"}, {"file": ("c.wav", "wav")}, 400,
         "response_format"),
        ({"model": MODEL, "language": "xx"}, {"file": ("c.wav", "wav")}, 400, "language"),
        ({"model": MODEL, "language": "en;rm"}, {"file": ("c.wav", "wav")}, 400, "language"),
        ({"model": MODEL, "temperature": "hot"}, {"file": ("c.wav", "wav")}, 400, "temperature"),
        ({"model": MODEL, "temperature": "1.5"}, {"file": ("c.wav", "wav")}, 400, "temperature"),
        ({"model": MODEL, "timestamp_granularities[]": "word"}, {"file": ("c.wav", "wav")}, 400,
         "timestamp_granularities"),
        ({"model": MODEL}, {"file": ("long.wav", "too-long")}, 400, "file"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_field(speech_server, form, files, status, param):
    content = {"wav": encoded("wav"), "too-long": _too_long_wav()}
    files = {k: (name, content.get(v, v) if isinstance(v, str) else v)
             for k, (name, v) in files.items()}  # fmt: skip
    _refused(_post(speech_server, data=form, files=files or None), status, param)


def test_a_json_body_and_an_oversized_upload_are_refused(speech_server):
    _refused(_post(speech_server, json={"model": MODEL}), 400, "file")
    big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    message = _refused(_post(speech_server, data={"model": MODEL}, files={"file": ("b.wav", big)}),
                       413, "file")  # fmt: skip
    assert "25 MiB" in message


def test_a_text_model_is_named_and_nothing_else_degrades(speech_server, client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="text-model", file=("c.wav", encoded("wav")))
    assert "does not support audio" in str(refused.value)
    answer = client.audio.transcriptions.create(model=MODEL, file=("c.wav", encoded("wav")),
                                                language="en")  # fmt: skip
    assert answer.text
    assert "Traceback" not in speech_server.output()
