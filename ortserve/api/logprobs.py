"""Token log probabilities (engine TokenLogprobs) in each protocol's JSON shape.

Pure functions: the protocol modules call them on the TokenLogprobs of a response (or of one
streamed chunk). Items are ortserve.engine.types.TokenLogprob: token, logprob, top, utf8.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterable, Sequence
from typing import Any

# JSON has no -Infinity: OpenAI writes this floor for tokens that cannot occur.
FLOOR = -9999.0


def openai_chat(items: Iterable[Any]) -> dict:
    """OpenAI chat `choices[].logprobs` (also a streamed chunk's, for its tokens)."""
    return {"content": [_chat_entry(item) for item in items], "refusal": None}


def openai_completion(items: Sequence[Any], text_offset: int) -> dict:
    """OpenAI legacy completions `choices[].logprobs`; offsets count characters from
    `text_offset` (where this text starts: 0, the prompt's length when it is echoed, or
    what a stream has already sent)."""
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [_number(item.logprob) for item in items],
        "top_logprobs": [_top_dict(item) for item in items],
        "text_offset": _offsets(items, text_offset),
    }


def ollama(items: Iterable[Any]) -> list:
    """Ollama's `logprobs` on /api/generate and /api/chat (api.Logprob: top_logprobs is
    left out when empty, as Go's omitempty does)."""
    out = []
    for item in items:
        entry = _token(item)
        if item.top:
            entry["top_logprobs"] = [_token(alt) for alt in item.top]
        out.append(entry)
    return out


def _token(item: Any) -> dict:
    return {"token": item.token, "logprob": _number(item.logprob), "bytes": item.utf8}


def _chat_entry(item: Any) -> dict:
    return {**_token(item), "top_logprobs": [_token(alt) for alt in item.top]}


def _top_dict(item: Any) -> dict[str, float]:
    """token -> logprob of the alternatives, most likely first, and the chosen token (OpenAI:
    up to top_logprobs + 1 entries). Two ids with one text keep the likelier's value."""
    top: dict[str, float] = {}
    for alt in (*item.top, item):
        top.setdefault(alt.token, _number(alt.logprob))
    return top


def _offsets(items: Sequence[Any], start: int) -> list[int]:
    """Each token's character offset: the complete characters of the bytes before it (a
    token holding half a character starts where that character does)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # holds partial ones
    offsets, chars = [], start
    for item in items:
        offsets.append(chars)
        chars += len(decoder.decode(bytes(item.utf8)))
    return offsets


def _number(value: float) -> float:
    return float(value) if math.isfinite(value) else FLOOR
