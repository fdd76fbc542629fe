"""Logprobs: the numbers, token texts and bytes, chunks they travel with, protocol shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from converters.tiny import build_tokenizer
from ortserve.api import logprobs as shape
from ortserve.engine.logprobs import StepLogprobs, TokenTexts, log_softmax, step_logprobs
from ortserve.engine.scheduler import Job
from ortserve.engine.text import TextDecoder
from ortserve.engine.turns import Turn
from ortserve.engine.types import Finished, GenerationOptions, TextChunk, TokenLogprob, Usage

MULTIBYTE = "héllo 世界 🙂 naïve café"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---- the numbers ---------------------------------------------------------------------------


def test_step_logprobs_is_the_log_softmax_and_its_top_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 1, 300)).astype(np.float32) * 4
    reference = log_softmax(logits)
    assert math.isclose(np.exp(reference).sum(), 1.0, rel_tol=1e-9)
    step = step_logprobs(logits, 17, 5)
    assert step.logprob == pytest.approx(reference[17], abs=1e-6)
    assert list(step.top_ids) == np.argsort(-reference)[:5].tolist()
    assert step.top_logprobs == pytest.approx(reference[list(step.top_ids)], abs=1e-6)
    assert list(step.top_logprobs) == sorted(step.top_logprobs, reverse=True)


def test_top_k_bounds_and_ties():
    logits = np.zeros(30, dtype=np.float32)
    logits[[4, 9]] = 2.0  # a tie: the smaller id first, whatever the partition did
    assert step_logprobs(logits, 0, 0).top_ids == ()
    assert step_logprobs(logits, 0, 3).top_ids[:2] == (4, 9)
    assert len(step_logprobs(logits, 0, 99).top_ids) == 20  # OpenAI's bound
    assert len(step_logprobs(logits[:7], 0, 20).top_ids) == 7  # a vocabulary smaller than k


# ---- token texts and bytes -----------------------------------------------------------------


def test_byte_level_tokens_give_the_exact_bytes(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = ids_of(tokenizer, MULTIBYTE)
    assert any("\ufffd" in texts.of(i)[0] for i in ids)  # some token holds half a character
    assert b"".join(texts.of(i)[1] for i in ids) == MULTIBYTE.encode("utf-8")
    assert texts.of(ids_of(tokenizer, " the")[0])[0] == " the"  # the space is kept
    assert texts.of(2) == ("<|im_end|>", b"<|im_end|>")  # special tokens by their content


def sentencepiece_like(decoder) -> Tokenizer:
    vocab = {"<unk>": 0, "\u2581Hello": 1, "<0xE2>": 2, "<0x82>": 3, "<0xAC>": 4, "world": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.decoder = decoder
    return tokenizer


@pytest.mark.parametrize(
    "decoder",
    [
        decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ),  # fmt: skip
        decoders.Metaspace(),
    ],
)
def test_sentencepiece_pieces_keep_their_space_and_bytes(decoder):
    texts = TokenTexts(sentencepiece_like(decoder))
    assert texts.of(1) == (" Hello", b" Hello")  # decoding it alone would drop the space
    assert texts.of(5) == ("world", b"world")
    if isinstance(decoder, decoders.Sequence):  # byte fallback pieces are single bytes
        assert b"".join(texts.of(i)[1] for i in (2, 3, 4)) == "€".encode()
        assert texts.of(2)[0] == "\ufffd"


def test_resolve_builds_the_alternatives(tokenizer):
    step = StepLogprobs(-0.5, (7, 2), (-0.25, -1.5))
    item = TokenTexts(tokenizer).resolve(7, step)
    assert (item.token_id, item.logprob) == (7, -0.5)
    assert [(alt.token_id, alt.token, alt.logprob) for alt in item.top] == [
        (7, tokenizer.id_to_token(7), -0.25),
        (2, "<|im_end|>", -1.5),
    ]
    assert item.top[1].top == ()


def test_utf8_bytes_of_a_token_logprob():
    assert TokenLogprob(1, "é", -1.0).utf8 == [195, 169]
    assert TokenLogprob(1, "\ufffd", -1.0, raw=b"\xe2").utf8 == [226]


# ---- logprobs travel with their text -------------------------------------------------------


class NoScheduler:
    def __init__(self):
        self.cancelled = []

    def cancel(self, job):
        self.cancelled.append(job)


def run_turn(tokenizer, ids, *, logprobs=3, stop=(), skip_special=True):
    """A Turn over scripted token events, each with made-up logprobs (-index - 1)."""
    job = Job(list(range(4)), GenerationOptions(logprobs=logprobs, stop=tuple(stop)))
    for n, token in enumerate(ids):
        step = StepLogprobs(-n - 1.0, (token, 1), (-n - 1.0, -50.0))
        job.events.put(("token", token, step) if logprobs is not None else ("token", token))
    job.events.put(("done", "length", Usage(4, len(ids))))
    job.finished = True
    decoder = TextDecoder(tokenizer, stop, skip_special)
    events = list(Turn(NoScheduler(), job, decoder))
    assert isinstance(events[-1], Finished)
    return [e for e in events if isinstance(e, TextChunk)]


def test_each_chunk_carries_the_tokens_its_text_completes(tokenizer):
    ids = ids_of(tokenizer, MULTIBYTE)
    chunks = run_turn(tokenizer, ids)
    assert "".join(c.text for c in chunks) == MULTIBYTE
    assert [lp.token_id for c in chunks for lp in c.logprobs] == ids
    assert [lp.logprob for c in chunks for lp in c.logprobs] == [-n - 1.0 for n in range(len(ids))]
    assert len(chunks) < len(ids)  # some characters took several tokens: held, then together
    seen_text, seen_bytes = "", b""
    for chunk in chunks:  # never a token before its text, never text before its token
        seen_text += chunk.text
        seen_bytes += b"".join(bytes(lp.utf8) for lp in chunk.logprobs)
        assert seen_bytes == seen_text.encode("utf-8")
        assert chunk.tokens == len(chunk.logprobs)
        assert [alt.token_id for alt in chunk.logprobs[0].top] == [chunk.logprobs[0].token_id, 1]


def test_a_stop_string_drops_the_tokens_it_cuts(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = ids_of(tokenizer, text)
    chunks = run_turn(tokenizer, ids, stop=[" jumps"])
    shown = "".join(c.text for c in chunks)
    assert shown == "The quick brown fox"
    kept = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in kept] == ids[: len(kept)]
    assert "".join(lp.token for lp in kept) == shown  # here the stop starts on a token edge
    assert len(kept) < len(ids)


def test_a_held_stop_prefix_keeps_its_token_until_released(tokenizer):
    ids = ids_of(tokenizer, "a\nb")
    newline = ids_of(tokenizer, "\n")[0]
    assert newline in ids  # "\n" is a token of its own: held as the start of "\n\n"
    chunks = run_turn(tokenizer, ids, stop=["\n\n"])
    assert [c.text for c in chunks][-1].endswith("b")
    for chunk in chunks:
        assert "".join(lp.token for lp in chunk.logprobs) == chunk.text
    assert [lp.token_id for c in chunks for lp in c.logprobs] == ids


def test_special_tokens_come_with_the_next_text_or_the_flush(tokenizer):
    hello, end = ids_of(tokenizer, "hello"), 2
    chunks = run_turn(tokenizer, [end, *hello, end])
    assert "".join(c.text for c in chunks) == "hello"
    assert [lp.token_id for lp in chunks[0].logprobs][:2] == [end, hello[0]]
    assert chunks[-1].text == "" and [lp.token_id for lp in chunks[-1].logprobs] == [end]
    assert [lp.token_id for c in chunks for lp in c.logprobs] == [end, *hello, end]


def test_a_plain_turn_has_no_logprobs_and_no_empty_chunks(tokenizer):
    ids = ids_of(tokenizer, MULTIBYTE) + [2]
    chunks = run_turn(tokenizer, ids, logprobs=None)
    assert "".join(c.text for c in chunks) == MULTIBYTE
    assert all(c.text and c.logprobs == () and c.tokens == 1 for c in chunks)


# ---- protocol shapes -----------------------------------------------------------------------


def item(token_id, text, logprob, top=(), raw=None):
    alts = tuple(TokenLogprob(i, t, v, (), r) for i, t, v, r in top)
    return TokenLogprob(token_id, text, logprob, alts, raw)


EURO = [  # "€" in two tokens, then " ok"
    item(2, "\ufffd", -0.1, [(2, "\ufffd", -0.1, b"\xe2"), (9, "x", -3.0, None)], b"\xe2"),
    item(3, "\ufffd", -0.2, [(3, "\ufffd", -0.2, b"\x82\xac")], b"\x82\xac"),
    item(4, " ok", -float("inf"), []),
]


def test_openai_chat_shape():
    out = shape.openai_chat(EURO)
    assert out["refusal"] is None
    first = out["content"][0]
    assert first == {"token": "\ufffd", "logprob": -0.1, "bytes": [226], "top_logprobs": [
        {"token": "\ufffd", "logprob": -0.1, "bytes": [226]},
        {"token": "x", "logprob": -3.0, "bytes": [120]}]}  # fmt: skip
    assert bytes(out["content"][0]["bytes"] + out["content"][1]["bytes"]).decode() == "€"
    assert out["content"][2]["logprob"] == shape.FLOOR and out["content"][2]["top_logprobs"] == []
    json.dumps(out, allow_nan=False)  # valid JSON: no -Infinity
    assert shape.openai_chat([]) == {"content": [], "refusal": None}


def test_openai_completion_shape_and_offsets():
    out = shape.openai_completion(EURO, text_offset=10)
    assert out["tokens"] == ["\ufffd", "\ufffd", " ok"]
    assert out["token_logprobs"] == [-0.1, -0.2, shape.FLOOR]
    assert out["top_logprobs"] == [{"\ufffd": -0.1, "x": -3.0}, {"\ufffd": -0.2},
                                   {" ok": shape.FLOOR}]  # fmt: skip
    # "€" is one character: both of its tokens start at 10, " ok" right after it
    assert out["text_offset"] == [10, 10, 11]
    ascii_items = [item(1, "ab", -1.0), item(2, "c", -1.0), item(3, "de", -1.0)]
    assert shape.openai_completion(ascii_items, 0)["text_offset"] == [0, 2, 3]


def test_openai_completion_top_has_the_chosen_token():
    chosen = item(5, "b", -2.0, [(1, "a", -0.5, None), (2, "c", -1.0, None)])
    assert shape.openai_completion([chosen], 0)["top_logprobs"] == [
        {"a": -0.5, "c": -1.0, "b": -2.0}
    ]


def test_ollama_shape():
    out = shape.ollama(EURO)
    assert out[0] == {"token": "\ufffd", "logprob": -0.1, "bytes": [226], "top_logprobs": [
        {"token": "\ufffd", "logprob": -0.1, "bytes": [226]},
        {"token": "x", "logprob": -3.0, "bytes": [120]}]}  # fmt: skip
    assert out[2] == {"token": " ok", "logprob": shape.FLOOR, "bytes": [32, 111, 107]}
    assert shape.ollama([]) == []


def test_the_ollama_client_reads_the_shape():
    from ollama import ChatResponse

    response = ChatResponse.model_validate(
        {
            "model": "m",
            "message": {"role": "assistant", "content": "€ ok"},
            "logprobs": shape.ollama(EURO),
        }  # fmt: skip
    )
    assert [lp.token for lp in response.logprobs] == ["\ufffd", "\ufffd", " ok"]
    assert response.logprobs[0].top_logprobs[1].logprob == -3.0


def test_the_openai_client_reads_the_shapes():
    from openai.types.chat import ChatCompletion
    from openai.types.completion import Completion

    chat = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": shape.openai_chat(EURO),
                     "message": {"role": "assistant", "content": "€ ok"}}]})  # fmt: skip
    assert chat.choices[0].logprobs.content[1].bytes == [130, 172]
    completion = Completion.model_validate({
        "id": "x", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "text": "€ ok",
                     "logprobs": shape.openai_completion(EURO, 0)}]})  # fmt: skip
    assert completion.choices[0].logprobs.text_offset == [0, 0, 1]
