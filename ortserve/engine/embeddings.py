"""Sentence embeddings from encoder bundles through onnxruntime.InferenceSession.

An embedding bundle is a sentence-transformers export: model.onnx computes the model's own
pooling and L2 normalisation and returns "sentence_embedding"; tokenizer.json and
sentence_bert_config.json (max_seq_length) say how text becomes input ids.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ortserve.config import Settings
from ortserve.engine.providers import ORT_NAMES, load_candidates, load_on_best, session_providers
from ortserve.engine.resident import Resident
from ortserve.errors import InvalidRequest, ModelLoadError, OrtServeError, ServerBusy
from ortserve.library import Library, ModelInfo

log = logging.getLogger("ortserve.engine")

OUTPUT = "sentence_embedding"
BATCH_SIZE = 32  # texts per session.run: bounds the padded input tensor's memory
# A text is cut (or refused) before it is tokenized at max_length tokens times the vocabulary's
# longest entry, times this: WordPiece reads whitespace as no token at all, so indented or
# padded text takes more characters per token than any entry's length.
WHITESPACE_SLACK = 4


@dataclass(frozen=True)
class EmbeddingResult:
    """Vectors (float32, one row per text) and the tokens the model read."""

    vectors: np.ndarray
    prompt_tokens: int


def max_seq_length(bundle: Path) -> int:
    """The longest input the model reads, in tokens (sentence_bert_config.json)."""
    path = bundle / "sentence_bert_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return int(config.get("max_seq_length") or 512)


class Embedder:
    """One embedding bundle in memory: its session and tokenizer."""

    def __init__(self, bundle: Path, provider: str = "cpu", *, batch_size: int = BATCH_SIZE):
        import onnxruntime
        from tokenizers import Tokenizer

        self.bundle = Path(bundle)
        self.batch_size = batch_size
        self.max_length = max_seq_length(self.bundle)
        self.tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        pad = self.tokenizer.padding or {}
        # The exported tokenizer pads to a fixed length; pad to the batch's longest instead.
        self.tokenizer.enable_padding(
            pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]")
        )
        self.tokenizer.enable_truncation(max_length=self.max_length)
        longest = max((len(token) for token in self.tokenizer.get_vocab()), default=16)
        self.max_chars = self.max_length * max(1, longest) * WHITESPACE_SLACK
        options, providers = session_providers(provider)
        self.session = onnxruntime.InferenceSession(
            str(self.bundle / "model.onnx"), sess_options=options, providers=providers
        )
        self.provider = _provider_name(self.session.get_providers()[0])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dimension = int(self.session.get_outputs()[_output_index(self.session)].shape[-1])
        # Request threads share the tokenizer and its padding/truncation settings: encode one
        # batch at a time (cheap next to the session run, which needs no lock).
        self._lock = threading.Lock()

    def embed(
        self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None
    ) -> EmbeddingResult:
        """Embed `texts` in batches; over-long texts are cut, or refused when not `truncate`."""
        self._check_dimensions(dimensions)
        texts = self._bounded(texts, truncate)
        rows, tokens = [], 0
        for start in range(0, len(texts), self.batch_size):
            vectors, count = self._embed_batch(
                texts[start : start + self.batch_size], truncate, start
            )
            rows.append(vectors)
            tokens += count
        vectors = np.concatenate(rows) if rows else np.zeros((0, self.dimension), np.float32)
        if dimensions is not None and dimensions != self.dimension:
            vectors = shorten(vectors, dimensions)
        return EmbeddingResult(vectors.astype(np.float32, copy=False), tokens)

    def _bounded(self, texts: list[str], truncate: bool) -> list[str]:
        """`texts` within max_chars, before any is tokenized: a 30 MB text would take half a
        minute and gigabytes to tokenize, for the 256 tokens the model reads.

        Past max_chars a text holds more tokens than the model reads: it is cut there
        (`truncate`), or refused.
        """
        if truncate:
            return [text[: self.max_chars] for text in texts]
        for i, text in enumerate(texts):
            if len(text) > self.max_chars:
                raise InvalidRequest(
                    f"input[{i}] is too long: {len(text)} characters cannot fit the model's "
                    f"limit of {self.max_length} tokens (send truncate true to cut it)",
                    param="input",
                    code="context_length_exceeded",
                )
        return texts

    def _embed_batch(self, texts: list[str], truncate: bool, offset: int) -> tuple[np.ndarray, int]:
        with self._lock:
            encodings = self.tokenizer.encode_batch(texts)
        if not truncate:
            for i, encoding in enumerate(encodings):
                if encoding.overflowing:
                    self._too_long(offset + i, encoding)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (vectors,) = self.session.run(
            [OUTPUT], {k: v for k, v in feeds.items() if k in self.inputs}
        )
        return np.asarray(vectors, dtype=np.float32), int(mask.sum())

    def _too_long(self, index: int, encoding) -> None:
        length = _untruncated_length(encoding)
        raise InvalidRequest(
            f"input[{index}] is too long: {length} tokens exceed the model's limit of "
            f"{self.max_length} tokens (send truncate true to cut it)",
            param="input",
            code="context_length_exceeded",
        )

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and not 1 <= dimensions <= self.dimension:
            raise InvalidRequest(
                f"dimensions must be between 1 and {self.dimension} for this model, "
                f"got {dimensions}",
                param="dimensions",
            )


def shorten(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` components of each row, L2-normalised again (Matryoshka style)."""
    cut = vectors[:, :dimensions].astype(np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.clip(norms, 1e-12, None)  # an all-zero prefix stays zero, not NaN


@dataclass(eq=False, kw_only=True)
class LoadedEmbedder(Resident):
    """An embedding model in memory."""

    embedder: Embedder
    stopped: bool = False

    @property
    def context_length(self) -> int:
        return self.embedder.max_length

    def embed(self, texts: list[str], **kwargs) -> EmbeddingResult:
        """Embeddings of `texts` (see Embedder.embed); refused once the model is unloaded."""
        if self.stopped:
            raise ServerBusy("the model was unloaded or the server is stopping; try again")
        return self.embedder.embed(texts, **kwargs)

    def pending(self) -> int:
        return self.active

    def stop(self) -> None:
        """Stop taking requests; the session is freed once in-flight runs drop it."""
        self.stopped = True


class EmbeddingBackend:
    """Loads embedding bundles ("onnx-embedding") as onnxruntime sessions."""

    def load(self, info: ModelInfo, settings: Settings, library: Library) -> LoadedEmbedder:
        return load_embedder(info, settings.provider)

    def planned_provider(self, info: ModelInfo, requested: str) -> str | None:
        try:
            return load_candidates(requested, runtime="onnxruntime")[0]
        except (OrtServeError, OSError, KeyError, ValueError):
            return None


def load_embedder(info: ModelInfo, requested_provider: str) -> LoadedEmbedder:
    """Load an embedding bundle on the best usable provider, falling back as generation does."""
    started = time.perf_counter()
    candidates = load_candidates(requested_provider, runtime="onnxruntime")
    try:
        embedder, _ = load_on_best(
            info.name, candidates, lambda provider: Embedder(Path(info.path), provider)
        )
    except OrtServeError:
        raise  # ProviderUnavailable: a named provider's failure, already said for a client
    except Exception as exc:
        raise ModelLoadError(f'failed to load model "{info.name}": {exc}') from exc
    duration = int((time.perf_counter() - started) * 1e9)
    log.info("loaded %s on %s in %.2fs", info.name, embedder.provider, duration / 1e9)
    return LoadedEmbedder(
        info=info, provider=embedder.provider, embedder=embedder, load_duration_ns=duration
    )


def _untruncated_length(encoding) -> int:
    """Tokens a truncated text would take whole: its own tokens plus one set of specials."""
    # Every overflow piece repeats the special tokens, and padding counts as special.
    text = sum(m == 0 for p in (encoding, *encoding.overflowing) for m in p.special_tokens_mask)
    padding = encoding.attention_mask.count(0)
    return text + sum(encoding.special_tokens_mask) - padding


def _provider_name(ort_name: str) -> str:
    return next((k for k, v in ORT_NAMES.items() if v == ort_name), "cpu")


def _output_index(session) -> int:
    names = [o.name for o in session.get_outputs()]
    if OUTPUT not in names:
        raise ValueError(f"model.onnx has no {OUTPUT!r} output (outputs: {', '.join(names)})")
    return names.index(OUTPUT)
