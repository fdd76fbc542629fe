"""Incremental detokenizing for streaming, with stop strings cut out.

Decoding one token at a time breaks multi-byte characters (byte-level BPE splits them across
tokens) and loses the spaces some decoders add between tokens. As HF TGI and vLLM do, each
step decodes a short window of ids twice, with and without the new token, and emits the
difference once it no longer ends in an incomplete UTF-8 sequence (U+FFFD).

It also counts which tokens' text has been released (`completed_tokens`), so that per-token
data (log probabilities) travels with the text it belongs to: a token is complete once all
of its text is out; at a stop string, the tokens whose text reached the output are complete
and the rest are dropped with the text they made; a flush completes every token.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class TextDecoder:
    """Token ids in, text safe to show out; stops at the first stop string, never showing it.

    One instance per generated stream, used by one thread at a time.
    """

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)  # "" would stop before the first token
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this are already turned into text
        self._pending = ""  # decoded text held back: it may be the start of a stop string
        self._stopped = False
        # where each decoded token's text lies in the stream (tokens decoded together share
        # one span), how much of the stream is decoded and released, and tokens complete
        self._spans: list[tuple[int, int]] = []
        self._decoded = 0
        self._released = 0
        self._completed = 0

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def completed_tokens(self) -> int:
        """How many of the pushed tokens have all their text released (never decreases)."""
        return self._completed

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token: (text that is safe to emit now, whether a stop string hit)."""
        if self._stopped:
            return "", True
        self._ids.append(token_id)
        self._pending += self._decode_new(final=False)
        return self._release()

    def flush(self) -> str:
        """Text held back at the end of the stream (an incomplete character, a stop prefix)."""
        if self._stopped:
            return ""
        self._pending += self._decode_new(final=True)
        text, cut = self._release(final=True)
        self._stopped = True  # nothing more comes out of a flushed decoder
        if not cut:  # every token is complete, even one that made no text (a special token)
            self._completed = len(self._ids)
        return text

    def _decode_new(self, *, final: bool) -> str:
        """Text of the ids not yet read, or "" while it ends in a partial character."""
        window = self._ids[self._prefix_offset :]
        split = self._read_offset - self._prefix_offset
        prefix = self._tokenizer.decode(window[:split], skip_special_tokens=self._skip_special)
        full = self._tokenizer.decode(window, skip_special_tokens=self._skip_special)
        # A skipped special token adds nothing: keep the window and wait for real text.
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT) and not final):
            return ""
        text = full[len(prefix) :]
        start, self._decoded = self._decoded, self._decoded + len(text)
        self._spans.extend([(start, self._decoded)] * (len(self._ids) - self._read_offset))
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text

    def _release(self, *, final: bool = False) -> tuple[str, bool]:
        """Emit pending text up to a stop string, or up to a tail that may begin one."""
        cut = self._first_stop()
        if cut is not None:
            text, self._pending, self._stopped = self._pending[:cut], "", True
            self._count_released(text, cut=True)
            return text, True
        keep = 0 if final else self._stop_prefix_length()
        split = len(self._pending) - keep
        text, self._pending = self._pending[:split], self._pending[split:]
        self._count_released(text, cut=False)
        return text, False

    def _count_released(self, text: str, *, cut: bool) -> None:
        """Advance completed_tokens past the tokens `text` finishes; at a stop string, past
        those it shows any of (the others are cut with the stop string)."""
        self._released += len(text)
        while self._completed < len(self._spans):
            start, end = self._spans[self._completed]
            if not (start < self._released if cut else end <= self._released):
                break
            self._completed += 1

    def _first_stop(self) -> int | None:
        """Where the earliest stop string starts in the pending text."""
        found = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the pending text that starts some stop string."""
        text = self._pending
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
