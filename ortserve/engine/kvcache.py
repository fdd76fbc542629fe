"""Kept conversations: the keys and values of recently finished turns, for the next turn.

Design decision 5. A chat client sends the whole conversation again with every request, so
the next turn's prompt starts with the tokens of the previous turn (its prompt and answer).
Instead of prefilling all of them again, the continuous engine (engine/continuous.py) copies
the kept keys and values of the longest shared prefix into the new turn's batch row and
prefills only the rest. Any shared prefix counts, not only an exact extension: the next
prompt renders the previous answer from its text, and its tokens can differ from the
generated ids from some point on (a template that drops the thinking, a different BPE
split); everything before that point is reused.

Entries are bounded by count and by bytes and evicted least recently used first. An entry
that the newer one extends is dropped when the newer one is kept: a conversation holds one
entry, however many turns it has had.

Everything here runs on the model's scheduler thread.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class Entry:
    """The tokens of a finished turn and their keys and values, one array per cache input."""

    tokens: np.ndarray  # int32; position i of every layer array belongs to tokens[i]
    layers: list[np.ndarray]  # each [kv_heads, len(tokens), head_size]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class KVStore:
    """Kept entries, least recently used first, within `max_entries` and `max_bytes`."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max(0, int(max_entries))
        self.max_bytes = max(0, int(max_bytes))
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """Kept entries, least recently used first (for tests and metrics)."""
        return list(self._entries.values())

    def match(self, tokens: Sequence[int], minimum: int = 1) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that prefix's length;
        (None, 0) when none shares `minimum` tokens.

        Only such a match counts as a use: a few tokens of chat template every conversation
        begins with must not keep an unrelated conversation from being evicted."""
        wanted = np.asarray(tokens, dtype=np.int32)
        best, best_length = None, max(0, minimum - 1)
        for entry in self._entries.values():
            length = shared_prefix(entry.tokens, wanted)
            if length > best_length:
                best, best_length = entry, length
        if best is None:
            return None, 0
        if best is not None:
            self._entries.move_to_end(id(best))  # used: the last to be evicted
        return best, best_length

    def keep(self, tokens: Sequence[int], layers: list[np.ndarray]) -> Entry | None:
        """Keep a finished turn; None when it alone is larger than the store."""
        entry = Entry(np.asarray(tokens, dtype=np.int32), layers)
        if not self.enabled or entry.nbytes > self.max_bytes or not len(entry.tokens):
            return None
        for key, old in list(self._entries.items()):
            # an earlier turn of the same conversation: everything it holds, this one holds
            if shared_prefix(old.tokens, entry.tokens) == len(old.tokens):
                self._drop(key)
        self._entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
