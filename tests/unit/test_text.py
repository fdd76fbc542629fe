"""Incremental detokenizing with stop strings, on the tiny model's byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from converters.tiny import build_tokenizer
from ortserve.engine.text import REPLACEMENT, TextDecoder

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo 世界 🙂 naïve café — «quoted» 👩‍💻",
    "  leading spaces,\ttabs\nand\n\nnew lines  ",
    "emoji only: 🙂🙃🎉🇫🇷",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def stream(decoder: TextDecoder, ids: list[int]) -> tuple[list[str], bool]:
    """Every piece the decoder emits, flush included, and whether it stopped."""
    pieces = []
    for token_id in ids:
        text, stopped = decoder.push(token_id)
        pieces.append(text)
        if stopped:
            return pieces, True
    pieces.append(decoder.flush())
    return pieces, False


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(tokenizer, text):
    ids = ids_of(tokenizer, text)
    pieces, stopped = stream(TextDecoder(tokenizer), ids)
    assert not stopped
    assert "".join(pieces) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS[1:2] + TEXTS[3:])
def test_multibyte_characters_are_never_emitted_broken(tokenizer, text):
    ids = ids_of(tokenizer, text)
    # The test means something only if some character really spans several tokens.
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    pieces, _ = stream(TextDecoder(tokenizer), ids)
    assert all(REPLACEMENT not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_one_token_per_byte_still_decodes(tokenizer):
    """A character built from single-byte tokens comes out whole, once."""
    byte_ids = [tokenizer.token_to_id(c) for c in "ðŁĻĤ"]  # 🙂 as four byte-level symbols
    assert None not in byte_ids
    decoder = TextDecoder(tokenizer)
    assert [decoder.push(i) for i in byte_ids] == [("", False)] * 3 + [("🙂", False)]


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = ids_of(tokenizer, "ok 🙂")
    decoder = TextDecoder(tokenizer)
    emitted = "".join(decoder.push(i)[0] for i in ids[:-1])
    tail = decoder.flush()
    assert emitted == "ok "
    assert tail == REPLACEMENT  # the stream ended mid-character: say so rather than drop it
    assert decoder.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = [tokenizer.token_to_id("<|im_start|>"), *ids_of(tokenizer, "hi there")]
    ids.append(tokenizer.token_to_id("<|im_end|>"))
    pieces, _ = stream(TextDecoder(tokenizer), ids)
    assert "".join(pieces) == "hi there"
    pieces, _ = stream(TextDecoder(tokenizer, skip_special_tokens=False), ids)
    assert "".join(pieces) == "<|im_start|>hi there<|im_end|>"


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello world. The end. More text", ["The end"], "Hello world. "),
        ("alpha beta gamma delta", ["gamma", "beta"], "alpha "),  # the earliest one wins
        ("say 世界 then more", ["界 th"], "say 世"),  # across a multi-byte character
        ("User: hi\nAssistant: yo\nUser: again", ["\nUser:"], "User: hi\nAssistant: yo"),
        ("abcabcabd and on", ["abd"], "abcabc"),  # overlapping near-misses held then released
        ("the stop is first", ["the"], ""),
    ],
)
def test_stop_strings_cut_exactly(tokenizer, text, stop, expected):
    ids = ids_of(tokenizer, text)
    pieces, stopped = stream(TextDecoder(tokenizer, stop=stop), ids)
    assert stopped
    assert "".join(pieces) == expected
    assert not any(s in "".join(pieces) for s in stop)


def test_stop_string_spanning_tokens(tokenizer):
    text = "one two three four five"
    stop = "three fo"
    ids = ids_of(tokenizer, text)
    assert len(ids_of(tokenizer, stop)) > 1
    decoder = TextDecoder(tokenizer, stop=[stop])
    emitted = ""
    for token_id in ids:
        piece, stopped = decoder.push(token_id)
        emitted += piece
        # Nothing that could begin the stop string is ever shown early.
        assert not emitted.endswith(("t", "th", "thr", "three", "three ", "three f"))
        if stopped:
            break
    assert stopped and emitted == "one two "
    assert decoder.push(ids[0]) == ("", True)
    assert decoder.flush() == ""


def test_held_prefix_released_when_no_stop_follows(tokenizer):
    text = "the cat sat on the mat"
    ids = ids_of(tokenizer, text)
    pieces, stopped = stream(TextDecoder(tokenizer, stop=["the dog", "mat!"]), ids)
    assert not stopped
    assert "".join(pieces) == text
    assert pieces[-1].endswith("mat")  # "mat" could have begun "mat!": held until flush


def test_stop_string_made_of_special_tokens(tokenizer):
    ids = ids_of(tokenizer, "answer") + [tokenizer.token_to_id("<|im_end|>")]
    ids += ids_of(tokenizer, "junk")
    decoder = TextDecoder(tokenizer, stop=["<|im_end|>"], skip_special_tokens=False)
    pieces, stopped = stream(decoder, ids)
    assert stopped and "".join(pieces) == "answer"


def test_empty_stop_strings_are_ignored(tokenizer):
    ids = ids_of(tokenizer, "some text")
    pieces, stopped = stream(TextDecoder(tokenizer, stop=["", "zzz"]), ids)
    assert not stopped and "".join(pieces) == "some text"
