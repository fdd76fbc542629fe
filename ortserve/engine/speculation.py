"""Speculative decoding for the continuous loop: prompt-lookup drafts and their acceptance.

Drafts come from the sequence itself (llama.cpp's lookup decoding, Hugging Face's
`prompt_lookup_num_tokens`): the last n tokens (n = 3, then 2, then 1) are looked up earlier
in prompt + output, and the tokens that followed that occurrence are proposed. A reply that
quotes or edits its prompt, code that repeats names, a model that loops: all continue a
sequence they already hold. The loop (continuous.py) feeds a row's drafts in one forward
pass, reads the logits of every fed position and keeps the longest prefix the model agrees
with, plus the model's own next token.

Acceptance keeps the output's distribution. Greedy: a draft is kept when it is the argmax
at its position, so the tokens equal those of decoding one at a time. Sampling: a
deterministic draft x (q = one-hot) is the standard rule of speculative sampling (Leviathan
et al. 2023; Chen et al. 2023) with q(x) = 1: keep x with probability p(x); otherwise draw
from p with x removed, renormalised. The token then has p's law exactly.

Pure numpy and plain Python: the loop calls it on its scheduler thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_NGRAM = 3  # the longest suffix looked up; a longer match is a better predictor
MAX_DRAFT = 8  # drafts one row proposes in a step at most
FIRST_DRAFT = 4  # a row's first proposal; then DraftLength adapts it
_MAX_PAUSE = 32  # steps a row that keeps missing waits before it drafts again, at most


class PromptLookup:
    """An n-gram index over one turn's tokens: where each 1-, 2- and 3-gram last occurred.

    Kept incrementally: each step adds only the tokens the row took since the last call, so
    a lookup costs a few dict probes however long the sequence is.
    """

    def __init__(self, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # n-gram -> the position right after its latest occurrence (where its continuation starts)
        self._after: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        """Append tokens; index every n-gram that now has a token after it."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        seq, after = self.tokens, self._after
        # the n-grams ending at e, for each e whose follower e + 1 was just added
        for end in range(max(0, start - 1), len(seq) - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                after[tuple(seq[end - n + 1 : end + 1])] = end + 1

    def draft(self, last: int, k: int) -> list[int]:
        """Up to k tokens to follow tokens + [last]: the continuation of the longest suffix
        seen before. A continuation that reaches the end repeats itself (a loop continues
        with its period)."""
        if k <= 0:
            return []
        seq = self.tokens
        for n in range(min(self.max_ngram, len(seq) + 1), 0, -1):
            key = (*seq[len(seq) - n + 1 :], last) if n > 1 else (last,)
            start = self._after.get(key)
            if start is not None:
                return _continuation(seq, last, start, k)
        return []


def _continuation(seq: list[int], last: int, start: int, k: int) -> list[int]:
    """k tokens of seq + [last] from `start` on, wrapping into the drafts themselves."""
    full = len(seq) + 1  # the length of seq + [last]
    drafts: list[int] = []
    for pos in range(start, start + k):
        if pos < len(seq):
            drafts.append(seq[pos])
        elif pos == len(seq):
            drafts.append(last)
        else:
            drafts.append(drafts[pos - full])
    return drafts


@dataclass
class DraftLength:
    """How many drafts a row proposes: grows while all are kept, shrinks when some are not
    (Hugging Face's assisted-generation heuristic); a row whose single draft keeps missing
    stops drafting for a while, doubling the pause each time, so a text that never repeats
    costs almost nothing."""

    k: int = FIRST_DRAFT
    pause: int = 0  # steps left without drafting
    backoff: int = 0  # the next pause's length
    proposed: int = 0  # totals for the turn (metrics, tests)
    accepted: int = 0
    gain: float | None = None  # tokens its own draft pass gives in a batch (PassRates)

    def wanted(self) -> int:
        """Drafts to propose this step (0: skip)."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.k = min(MAX_DRAFT, self.k + 2)
            self.backoff = 0
        elif accepted == 0 and self.k == 1:
            self.backoff = min(_MAX_PAUSE, max(1, 2 * self.backoff))
            self.pause = self.backoff
        else:
            self.k = max(1, self.k - 1)


class PassRates:
    """Whether a row's own pass over its drafts pays inside a batch.

    onnxruntime's CPU GroupQueryAttention takes several tokens per row only in a one-row
    batch, so in a batch a row whose first draft held verifies the rest in a pass of its own
    (continuous.py). On a CPU a pass costs about the same whatever it feeds (the weights are
    read once), so that pass pays only when the tokens it is expected to keep per second
    beat the shared step's tokens per second: a row keeping 3 drafts a pass is worth its
    pass beside 1 other row, not beside 7. Both rates are moving averages measured on the
    lane; while passes do not pay, one row still tries after EXPLORE shared steps without
    one (a few percent of the steps), so an estimate from a bad stretch does not stay
    forever; a row new to the batch starts from what the lane's rows kept so far."""

    EXPLORE = 16
    _WEIGHT = 0.2  # of the newest measurement in the moving averages

    def __init__(self) -> None:
        self.step_rate: float | None = None  # tokens/s of the shared step (rows per second)
        self.pass_seconds: float | None = None  # one row's own draft pass
        self.gain: float | None = None  # tokens such a pass gives, over the lane's rows
        self.idle_steps = 0  # shared steps since the last own pass

    def shared(self, rows: int, seconds: float) -> None:
        self.step_rate = _average(self.step_rate, rows / max(seconds, 1e-9), self._WEIGHT)
        self.idle_steps += 1

    def own(self, drafting: DraftLength, tokens: int, seconds: float) -> None:
        """A row's own pass took `seconds` and gave `tokens` tokens."""
        self.idle_steps = 0
        self.pass_seconds = _average(self.pass_seconds, seconds, self._WEIGHT)
        self.gain = _average(self.gain, float(tokens), self._WEIGHT)
        drafting.gain = _average(drafting.gain, float(tokens), self._WEIGHT)

    def pays(self, drafting: DraftLength) -> bool:
        gain = self.gain if drafting.gain is None else drafting.gain
        if self.step_rate is None or self.pass_seconds is None or gain is None:
            return True  # not measured yet: try
        return gain / self.pass_seconds >= self.step_rate or self.idle_steps >= self.EXPLORE


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def accept(ids: np.ndarray, probs: np.ndarray, draft: int, rng: np.random.Generator) -> int:
    """The token at a drafted position of a sampled turn: `draft`, kept with probability
    p(draft), else a draw from p without it. `ids`, `probs`: p's support and weights (the
    turn's temperature, top-k, top-p and penalty applied), probs summing to 1."""
    where = np.flatnonzero(ids == draft)
    p = float(probs[where[0]]) if where.size else 0.0
    if p > 0.0 and rng.random() < p:
        return draft
    rest = probs.astype(np.float64, copy=True)
    if where.size:
        rest[where[0]] = 0.0
    total = rest.sum()
    if total <= 0.0:  # p(draft) was 1 up to rounding: nothing else to draw
        return draft
    cumulative = np.cumsum(rest / total)
    return int(ids[min(int(np.searchsorted(cumulative, rng.random())), ids.size - 1)])
