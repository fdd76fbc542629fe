"""Speech to text: ORT GenAI Whisper bundles ("onnx-genai-speech") behind engine/backend.py.

A bundle is what converters/speech.py writes (or og's own Whisper bundles): encoder.onnx,
decoder.onnx, genai_config.json (model type "whisper") and audio_processor_config.json, og's
log-mel feature extractor. og computes the features from a 16 kHz WAV (og.Audios.open_bytes),
so the caller hands 16 kHz float32 PCM (serving/audio.py decodes and resamples uploads) and
each 30-second window is written as an in-memory WAV for og.

og is not thread-safe: every call into a model's og objects happens on that model's one worker
thread; request threads wait on their job's future. Measured on og 0.18 (converters/speech.py):
get_logits() before the first generate_next_token holds the first step's logits (the language
is detected from them), and a Whisper generator is not done at max_length (the next step
raises), so the loop counts tokens itself.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ortserve.config import Settings
from ortserve.engine.providers import bundle_target, configure, load_candidates, load_on_best
from ortserve.engine.resident import Resident
from ortserve.errors import InvalidRequest, ModelLoadError, OrtServeError, ServerBusy
from ortserve.library import Library, ModelInfo

log = logging.getLogger("ortserve.engine")

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30  # Whisper reads 30-second windows (3000 feature frames)
WINDOW = SAMPLE_RATE * WINDOW_SECONDS
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")
_TIMESTAMP = re.compile(r"^<\|(\d+\.\d\d)\|>$")
TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class Segment:
    """A stretch of the transcript with its times in seconds from the clip's start."""

    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """What transcribe returns: the text, its segments, the language and the token count."""

    text: str
    language: str | None  # the code given or detected ("en"), None if the model has none
    duration: float  # seconds of audio read
    segments: list[Segment] = field(default_factory=list)
    tokens: int = 0  # tokens generated, timestamps included
    timestamps: bool = False  # segments come from the model's timestamp tokens


class Vocabulary:
    """Whisper's control tokens, read from the bundle's tokenizer (thread-safe)."""

    def __init__(self, bundle: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.ids = vocab
        self.languages = {t[2:-2]: i for t, i in vocab.items() if _is_language_token(t, vocab)}
        self.timestamps = {i: float(m.group(1)) for t, i in vocab.items()
                           if (m := _TIMESTAMP.match(t))}  # fmt: skip
        self.special = {i for t, i in vocab.items() if _SPECIAL.fullmatch(t)}
        self.end = vocab.get("<|endoftext|>")

    def has(self, token: str) -> bool:
        return token in self.ids

    def prompt_ids(self, text: str, limit: int) -> list[int]:
        """The last `limit` tokens of `text`, control tokens taken out (a prompt is text)."""
        cleaned = text
        while _SPECIAL.search(cleaned):  # removing one may join the pieces of another
            cleaned = _SPECIAL.sub("", cleaned)
        cleaned = cleaned.strip()
        if not cleaned:
            return []
        return self.tokenizer.encode(" " + cleaned, add_special_tokens=False).ids[-limit:]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.special
                                      and i not in self.timestamps])  # fmt: skip


def _is_language_token(token: str, vocab: dict[str, int]) -> bool:
    """<|en|>, <|yue|>...: the short lowercase control tokens between <|startoftranscript|>
    and <|translate|> in Whisper's layout."""
    start, task = vocab.get("<|startoftranscript|>"), vocab.get("<|translate|>")
    if start is None or task is None:
        return False
    return start < vocab[token] < task and bool(re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", token))


class Whisper:
    """One Whisper bundle's og objects, used only on its worker thread."""

    def __init__(self, bundle: Path, provider: str, context_length: int, vocab_size: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(bundle))
        configure(config, provider)
        self.model = og.Model(config)
        self.processor = self.model.create_multimodal_processor()
        self.context_length = context_length
        self.vocab_size = vocab_size  # top_k when sampling: every token may be drawn

    def detect_language(self, window: np.ndarray, vocab: Vocabulary) -> str | None:
        """The language the model reads in `window`: its likeliest language token."""
        if not vocab.languages:
            return None
        generator = self._generator("<|startoftranscript|>", window, 2, 0.0)
        logits = np.asarray(generator.get_logits()).reshape(-1)
        codes = list(vocab.languages)
        ids = np.asarray([vocab.languages[c] for c in codes])
        return codes[int(np.argmax(logits[ids]))]

    def generate(self, prompt: str, window: np.ndarray, temperature: float,
                 cancelled: threading.Event) -> tuple[list[int], list[int]]:  # fmt: skip
        """(prompt ids, generated ids) of one window, to <|endoftext|> or the context's end."""
        generator = self._generator(prompt, window, self.context_length, temperature)
        prompt_len = generator.token_count()
        while not generator.is_done() and generator.token_count() < self.context_length:
            if cancelled.is_set():
                raise ServerBusy("transcription was cancelled: the model was unloaded or the "
                                 "server is stopping")  # fmt: skip
            generator.generate_next_token()
        sequence = [int(t) for t in generator.get_sequence(0)]
        return sequence[:prompt_len], sequence[prompt_len:]

    def _generator(self, prompt: str, window: np.ndarray, max_length: int, temperature: float):
        og = self.og
        inputs = self.processor(prompt, audios=og.Audios.open_bytes(_wav(window)))
        params = og.GeneratorParams(self.model)
        if temperature > 0:
            params.set_search_options(do_sample=True, temperature=temperature, top_p=1.0,
                                      top_k=self.vocab_size, max_length=max_length)  # fmt: skip
        else:
            params.set_search_options(do_sample=False, max_length=max_length)
        generator = og.Generator(self.model, params)
        generator.set_inputs(inputs)
        return generator


def _wav(pcm: np.ndarray) -> bytes:
    """16 kHz float32 PCM as an in-memory WAV file: what og's AudioDecoder reads."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@dataclass(eq=False, kw_only=True)
class SpeechModel(Resident):
    """A Whisper model in memory: its og objects behind one worker thread."""

    whisper: Whisper
    vocab: Vocabulary
    max_queue: int = 64
    stopped: bool = False
    _worker: ThreadPoolExecutor = field(init=False)
    _queued: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"speech-{self.info.name}")

    @property
    def context_length(self) -> int:
        return self.whisper.context_length

    @property
    def languages(self) -> list[str]:
        return sorted(self.vocab.languages)

    def pending(self) -> int:
        return self._queued

    def running(self) -> int:
        return min(1, self._queued)

    def stop(self) -> None:
        """Stop taking jobs; a running one ends at its next token."""
        self.stopped = True
        self._cancel.set()
        self._worker.shutdown(wait=False, cancel_futures=True)

    def transcribe(self, pcm: np.ndarray, *, language: str | None = None,
                   task: str = "transcribe", prompt: str = "", temperature: float = 0.0,
                   timestamps: bool = False) -> Transcript:  # fmt: skip
        """Text (and segments) of 16 kHz mono float32 `pcm`, window by window (30 s each).

        `language` None: detected from the first window. `timestamps`: the model writes its
        timestamp tokens and each pair bounds a segment; without them (or if it writes none)
        each window is one segment.
        """
        self._check(language, task)
        job = self._submit(lambda: self._run(pcm, language, task, prompt, temperature,
                                             timestamps))  # fmt: skip
        try:
            return job.result()
        except CancelledError:  # still queued when the model was unloaded
            raise ServerBusy(
                "the model was unloaded or the server is stopping; try again"
            ) from None

    def _check(self, language: str | None, task: str) -> None:
        if task not in TASKS:
            raise InvalidRequest(f"task must be one of {', '.join(TASKS)}", param="task")
        if language is not None and language not in self.vocab.languages:
            known = ", ".join(sorted(self.vocab.languages)) or "none"
            raise InvalidRequest(f"language {language!r} is not one this model knows "
                                 f"(ISO-639-1 codes: {known})", param="language")  # fmt: skip
        if not self.vocab.has(f"<|{task}|>") and self.vocab.languages:
            raise InvalidRequest(f"this model cannot {task}", param="model")

    def _submit(self, job) -> Future:
        with self._lock:
            if self.stopped:
                raise ServerBusy("the model was unloaded or the server is stopping; try again")
            if self._queued >= self.max_queue:
                raise ServerBusy(f"too many transcriptions queued for {self.name} "
                                 f"({self.max_queue}); try again")  # fmt: skip
            self._queued += 1
        future = self._worker.submit(job)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future) -> None:
        with self._lock:
            self._queued -= 1

    def _run(self, pcm, language, task, prompt, temperature, timestamps) -> Transcript:
        windows = [pcm[i : i + WINDOW] for i in range(0, max(len(pcm), 1), WINDOW)]
        if language is None:
            language = self.whisper.detect_language(windows[0], self.vocab)
        # Whisper keeps at most half its context for the previous text (openai-whisper's rule)
        previous = self.vocab.prompt_ids(prompt, self.context_length // 2 - 1) if prompt else []
        segments: list[Segment] = []
        generated, stamped = 0, False
        for index, window in enumerate(windows):
            offset = index * WINDOW_SECONDS
            text = self._prompt(previous, language, task, timestamps)
            _, ids = self.whisper.generate(text, window, temperature, self._cancel)
            generated += len(ids)
            duration = len(window) / SAMPLE_RATE
            ids = ids[: ids.index(self.vocab.end)] if self.vocab.end in ids else ids
            if timestamps and any(i in self.vocab.timestamps for i in ids):
                stamped = True
                segments.extend(self._segments(ids, offset, duration))
            else:  # the whole window is one segment
                segments.append(self._segment(offset, 0.0, duration, ids))
        segments = [s for s in segments if s.text.strip()]
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, language, len(pcm) / SAMPLE_RATE, segments, generated, stamped)

    def _prompt(self, previous: list[int], language, task, timestamps) -> str:
        """The decoder prompt: [<|startofprev|> text] <|startoftranscript|> <|lang|> <|task|>
        [<|notimestamps|>], as text for og's processor (the previous text re-decoded)."""
        parts = []
        if previous:
            parts += ["<|startofprev|>", self.vocab.tokenizer.decode(previous)]
        parts.append("<|startoftranscript|>")
        if language is not None:
            parts.append(f"<|{language}|>")
        if self.vocab.languages:  # English-only models have no task or language tokens
            parts.append(f"<|{task}|>")
        if not timestamps and self.vocab.has("<|notimestamps|>"):
            parts.append("<|notimestamps|>")
        return "".join(parts)

    def _segments(self, ids: list[int], offset: float, duration: float) -> list[Segment]:
        """Segments between timestamp tokens; text with no timestamp around it spans the
        window. Times are clamped to the window, and never run backwards."""
        stamps = self.vocab.timestamps
        segments, current, start = [], [], 0.0
        for token in ids:
            if token in stamps:
                at = min(stamps[token], duration)
                if current:
                    end = max(at, start)
                    segments.append(self._segment(offset, start, end, current))
                    current = []
                start = at
            else:
                current.append(token)
        if current:
            segments.append(self._segment(offset, start, duration, current))
        return segments

    def _segment(self, offset: float, start: float, end: float, ids: list[int]) -> Segment:
        text = self.vocab.decode(ids)  # timestamps and control tokens left out
        return Segment(round(offset + start, 2), round(offset + max(end, start), 2), text,
                       tuple(ids))  # fmt: skip


class SpeechBackend:
    """Loads Whisper bundles ("onnx-genai-speech") on the best usable provider."""

    def load(self, info: ModelInfo, settings: Settings, library: Library) -> SpeechModel:
        started = time.perf_counter()
        bundle = Path(info.path)
        try:
            candidates = load_candidates(settings.provider, bundle_target(bundle))
            vocab = Vocabulary(bundle)
            context = int(info.details.get("context_length") or 448)
        except OrtServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f'failed to load model "{info.name}": {exc}') from exc
        try:
            whisper, provider = load_on_best(
                info.name,
                candidates,
                lambda provider: Whisper(bundle, provider, context, len(vocab.ids)),
            )
        except OrtServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f'failed to load model "{info.name}": {exc}') from exc
        duration = int((time.perf_counter() - started) * 1e9)
        log.info("loaded %s on %s in %.2fs", info.name, provider, duration / 1e9)
        return SpeechModel(info=info, provider=provider, whisper=whisper, vocab=vocab,
                           max_queue=settings.max_queue, load_duration_ns=duration)  # fmt: skip

    def planned_provider(self, info: ModelInfo, requested: str) -> str | None:
        try:
            return load_candidates(requested, bundle_target(Path(info.path)))[0]
        except (OrtServeError, OSError, KeyError, ValueError):
            return None
