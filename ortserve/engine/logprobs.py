"""Log probabilities of generated tokens: numbers on the scheduler thread, text on the caller's.

og.Engine (0.18) gives tokens but no logits; og.Generator gives `get_logits()`, which read
before `generate_next_token()` holds the raw logits the next token is chosen from (verified
equal to a teacher-forced forward pass, with sampling and penalties on too: og applies
temperature, top-k/top-p, repetition penalty and grammar masks to its own copy). So a turn
that asks for logprobs runs on a GeneratorEngine lane (engine/adapters.py), which calls
`step_logprobs` after each step: the log-softmax of those raw logits, the chosen token's
value and the top k. Only ids and floats cross to the request thread, where TokenTexts turns
ids into text and bytes with the model's tokenizer (thread-safe, unlike og's).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from ortserve.engine.types import TokenLogprob

MAX_TOP = 20  # OpenAI's top_logprobs bound; more alternatives are never computed


@dataclass(frozen=True)
class StepLogprobs:
    """One generated token's log probability and the top k ids at its position."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities of one position's logits (float64)."""
    values = np.asarray(logits, dtype=np.float64).reshape(-1)
    return values - _log_sum_exp(values)


def step_logprobs(logits: np.ndarray, token: int, k: int) -> StepLogprobs:
    """The chosen `token`'s log probability and the k most likely tokens (k clamped 0..20).

    Per token on the scheduler thread, so only the normaliser is computed over the whole
    vocabulary (float32 exp, float64 sum: ~10x less than a float64 log_softmax at 150k)."""
    values = np.asarray(logits, dtype=np.float32).reshape(-1)
    norm = _log_sum_exp(values)
    k = max(0, min(int(k), MAX_TOP, values.size))
    if k == 0:
        return StepLogprobs(float(values[token]) - norm)
    best = np.argpartition(-values, k - 1)[:k]
    # most likely first; equal values by id, so the order never depends on the partition
    best = best[np.lexsort((best, -values[best]))]
    return StepLogprobs(
        float(values[token]) - norm,
        tuple(int(i) for i in best),
        tuple(float(values[i]) - norm for i in best),
    )


def _log_sum_exp(values: np.ndarray) -> float:
    peak = float(values.max())
    return peak + math.log(float(np.exp(values - peak).sum(dtype=np.float64)))


# GPT-2's byte-level alphabet: each byte is written as one printable character in the vocab.
def _byte_level_alphabet() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


class TokenTexts:
    """Token id -> its own text and exact bytes, for one tokenizers.Tokenizer.

    Decoding one token alone loses what OpenAI's `bytes` exist for (the bytes of a partial
    character) and, for SentencePiece-style decoders, the leading space (their decoder
    strips the first one). So the vocabulary entry is mapped to bytes the way the model's
    decoder would inside a text: byte-level BPE through its byte alphabet, `<0xNN>` byte
    fallback pieces to that byte, `▁` to a space. Other decoders fall back to decoding alone.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self._byte_level = "ByteLevel" in kinds
        self._byte_fallback = "ByteFallback" in kinds
        self._metaspace = "Metaspace" in kinds or "Replace:\u2581" in kinds
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def of(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of one token."""
        found = self._cache.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found

    def resolve(self, token_id: int, step: StepLogprobs) -> TokenLogprob:
        """The TokenLogprob of a generated token, alternatives included."""
        top = tuple(
            self._one(i, value) for i, value in zip(step.top_ids, step.top_logprobs, strict=True)
        )
        text, raw = self.of(token_id)
        return TokenLogprob(token_id, text, step.logprob, top, raw)

    def _one(self, token_id: int, logprob: float) -> TokenLogprob:
        text, raw = self.of(token_id)
        return TokenLogprob(token_id, text, logprob, (), raw)

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:  # special and added tokens are never byte-mapped
            return self._added[token_id].encode("utf-8")
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return self._alone(token_id)
        if self._byte_fallback and (match := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(match.group(1), 16)])
        if self._byte_level:
            if all(char in _BYTE_LEVEL for char in piece):
                return bytes(_BYTE_LEVEL[char] for char in piece)
            return self._alone(token_id)
        if self._metaspace:
            return piece.replace(_METASPACE, " ").encode("utf-8")
        return self._alone(token_id)

    def _alone(self, token_id: int) -> bytes:
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _decoder_kinds(tokenizer) -> set[str]:
    """The decoder types in the tokenizer's decoder (Sequence members included)."""
    decoder = getattr(tokenizer, "decoder", None)
    if decoder is None:
        return set()
    try:
        state = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return set()
    kinds: set[str] = set()
    stack = [state]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        kind = str(node.get("type", ""))
        kinds.add(kind)
        if kind == "Replace" and (node.get("pattern") or {}).get("String") == _METASPACE:
            kinds.add("Replace:" + _METASPACE)
        stack.extend(node.get("decoders") or [])
    return kinds
