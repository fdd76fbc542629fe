"""Speculative decoding with a draft model: a small decoder of the same tokenizer proposes.

llama.cpp's `--model-draft`, vLLM's draft-model method. Each step a row asks the draft model
for k tokens to follow its context and next token; the continuous loop (continuous.py)
verifies them in one forward pass of the target and keeps the longest agreeing prefix, as it
does for prompt-lookup drafts (speculation.py).

The drafts are the draft model's greedy tokens: deterministic given the prefix, so q is one-hot
and the loop's acceptance rule for a sampled turn (keep draft x with probability p(x), else
draw from p without x, renormalised) gives each token the target's law exactly, as with prompt
lookup. Greedy turns keep the target's tokens: a draft is kept only where it is the argmax.

A draft model runs the same decoder graph class as the target (continuous.DecoderGraph, a
builder graph on onnxruntime's CPU provider), one row per turn: each turn holds a one-row
cache of its own and the tokens whose keys and values it holds. Everything here runs on the
model's scheduler thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ortserve.engine import continuous
from ortserve.library.bundle import genai_config

_CHUNK = 256  # tokens fed in one pass while catching up (as a prefill chunk)
# Catch-up fed in one step at most: a long prompt's catch-up spreads over steps (drafting
# waits meanwhile), so the other rows never wait for a whole prefill of the draft model.
_CATCH_UP = 4 * _CHUNK


@dataclass
class DraftState:
    """One turn's draft row: its cache and the tokens whose keys and values the cache holds."""

    cache: continuous.BatchCache
    tokens: list[int] = field(default_factory=list)


class DraftModel:
    """A small builder-graph decoder that proposes greedy drafts for a target model."""

    def __init__(self, graph: continuous.DecoderGraph):
        self.graph = graph
        self.vocab_size = graph.vocab_size  # ids a draft may take: the target's (see target())
        self.eos = graph.eos  # the target's end-of-turn ids: drafting stops at one

    @classmethod
    def load(cls, bundle: Path, threads: int | None = None) -> DraftModel:
        """The draft model of `bundle` (never int8: a small model gains little from it)."""
        if not continuous.supports(bundle):
            raise ValueError(
                f"{bundle} cannot be a draft model: it is not a model builder text decoder "
                "(the graph the continuous loop runs)"
            )
        return cls(continuous.DecoderGraph.load(bundle, threads))

    def target(self, graph: continuous.DecoderGraph) -> None:
        """Draft for `graph`: ids below its vocabulary only, stopping at its EOS ids."""
        self.vocab_size = min(graph.vocab_size, self.graph.logits_width or graph.vocab_size)
        self.eos = graph.eos

    def start(self) -> DraftState:
        return DraftState(continuous.BatchCache(self.graph, 1))

    def propose(self, state: DraftState, sequence: list[int], k: int) -> list[int]:
        """Up to k greedy tokens to follow `sequence` (the target row's context and next
        token). Fewer at an EOS id or the draft's context length; none while a long catch-up
        is still being fed."""
        limit = self.graph.context_length
        if k <= 0 or not sequence or len(sequence) >= limit:
            return []
        # rejected drafts of the last step are forgotten: the row's length is the mask's,
        # and the keys and values past it are written over
        common = min(_common_prefix(state.tokens, sequence), len(sequence) - 1)
        del state.tokens[common:]
        missing = sequence[common:]
        if len(missing) > _CATCH_UP:  # feed some now, draft in a later step
            self._feed(state, missing[:_CATCH_UP])
            return []
        logits = self._feed(state, missing)
        drafts: list[int] = []
        while True:
            token = int(np.argmax(logits[: self.vocab_size]))
            if token in self.eos:
                break
            drafts.append(token)
            if len(drafts) >= k or len(state.tokens) + 1 > limit:  # no room to feed it
                break
            logits = self._feed(state, [token])
        return drafts

    def release(self, state: DraftState) -> None:
        state.cache.release()
        state.tokens.clear()

    def _feed(self, state: DraftState, tokens: list[int]) -> np.ndarray:
        """Feed tokens after the state's, in chunks: the last position's logits."""
        logits = None
        for start in range(0, len(tokens), _CHUNK):
            chunk = tokens[start : start + _CHUNK]
            total = len(state.tokens) + len(chunk)
            state.cache.reserve(1, total)
            ids = np.asarray(chunk, dtype=np.int64)[None, :]
            mask = np.ones((1, total), dtype=np.int64)
            logits = self.graph.forward(ids, mask, state.cache.view(0, 1))[0, -1]
            state.tokens.extend(chunk)
        return logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (one extends the other), at C speed
        return n
    differs = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(np.argmax(differs))


def same_tokenizer(target: Path, draft: Path) -> bool:
    """Whether `draft` can draft for `target`: the same vocabulary and added tokens in both
    tokenizer.json files, and a draft vocabulary (its logits) that covers every id."""
    from tokenizers import Tokenizer

    try:
        ours = Tokenizer.from_file(str(Path(target) / "tokenizer.json"))
        theirs = Tokenizer.from_file(str(Path(draft) / "tokenizer.json"))
        vocab = ours.get_vocab(with_added_tokens=True)
        if vocab != theirs.get_vocab(with_added_tokens=True):
            return False
        size = int(genai_config(draft)["model"]["vocab_size"])
    except Exception:  # tokenizers raises plain Exceptions; unreadable: not the same
        return False
    return max(vocab.values(), default=-1) < size
