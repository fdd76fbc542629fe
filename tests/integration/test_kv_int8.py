"""An int8 KV cache on continuous lanes (engine/kv_int8.py, ORTSERVE_KV_CACHE_TYPE=q8), on
demo-chat's trained weights converted to int4: the accuracy cost against the float32 cache,
greedy answers, rows of different lengths batched, kept turns, the scales written once and
removed with their bundle, and the float32 cache where the scales cannot be written."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from converters import convert
from converters.demo_model import CHECKPOINT
from converters.verify import cosine_rows
from ortserve.config import Settings
from ortserve.engine.continuous import BatchCache, ContinuousEngine, DecoderGraph
from ortserve.engine.kvcache import KVStore
from ortserve.engine.types import Finished, TextChunk
from ortserve.library import Library
from tests.support.decoding import run_turns, served_turn, teacher_forced_logits

pytestmark = pytest.mark.slow

NAME = "demo-chat:int4"
TEXT = (
    "<|im_start|>user\nWhat do you know about the moon, the tides and the sea? Tell me about "
    "them in a few sentences.<|im_end|>\n<|im_start|>assistant\nThe moon pulls on the sea, and "
    "the water rises and falls twice a day. These are the tides. The sea is large and deep, and "
    "the moon is far away, but its pull is strong enough to move the water.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France? And what colour is the sky?<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris. The sky is blue on a clear day."
    "<|im_end|>\n<|im_start|>user\nWhat is 47 plus 38? Show the steps.<|im_end|>\n"
    "<|im_start|>assistant\n7 plus 8 is 15: write 5, carry 1. 4 plus 3 plus 1 is 8. So 47 plus "
    "38 is 85.<|im_end|>\n<|im_start|>user\nThanks! Tell me one more thing about the sea."
    "<|im_end|>\n<|im_start|>assistant\nThe sea covers most of the earth, and it is salty "
    "because rivers carry salt into it."
)
QUESTIONS = (
    "What is the capital of France?",
    "What is 47 plus 38? Show the steps.",
    "Tell me about the moon and the tides in a few sentences.",
    "What colour is the sky?",
    "Hi! Please repeat after me: the quick brown fox jumps over the lazy dog.",
)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Library:
    library = Library(tmp_path_factory.mktemp("kv_int8") / "models")
    convert(CHECKPOINT, NAME, "int4", library=library, progress=False)
    return library


@pytest.fixture(scope="module")
def graphs(library, tmp_path_factory) -> tuple[DecoderGraph, DecoderGraph]:
    """The bundle's decoder with its float32 cache, and with an int8 one."""
    bundle = library.get(NAME).path
    folder = tmp_path_factory.mktemp("kv_scales") / "bundle"
    return DecoderGraph.load(bundle, 1), DecoderGraph.load(bundle, 1, kv_cache=folder)


def test_an_int8_cache_keeps_the_models_predictions(library, graphs):
    """The accuracy cost on trained weights, teacher-forced over a conversation (295 tokens):
    measured on demo-chat int4, next tokens agree on 0.959 of positions, logits cosine
    0.99973 (min 0.985); on its fp32 bundle 0.990 and 0.99990. The int4 weights themselves
    agree with fp32 on 0.71."""
    plain, q8 = graphs
    assert plain.kv_type is np.float32 and q8.kv_type is np.int8
    assert q8.token_bytes * 4 == plain.token_bytes and q8.kept_type is np.int8
    ids = _encode(library, TEXT)
    assert len(ids) > 250
    expected, got = teacher_forced_logits(plain, ids), teacher_forced_logits(q8, ids)
    agreement = float((expected.argmax(-1) == got.argmax(-1)).mean())
    cosines = cosine_rows(expected, got)
    print(f"int8 vs float32 cache: top-1 {agreement:.4f}, cosine {cosines.mean():.6f}")
    assert agreement >= 0.92 and cosines.mean() >= 0.9995 and cosines.min() >= 0.95


def test_greedy_answers_equal_the_float32_caches(library, graphs):
    """Measured: all five answers token for token (24-48 tokens each)."""
    plain, q8 = graphs
    prompts = [_encode(library, _asked(q)) for q in QUESTIONS]
    expected = [run(plain, [p])[0] for p in prompts]
    got = [run(q8, [p])[0] for p in prompts]
    assert sum(a == b for a, b in zip(expected, got)) >= 4
    assert all(a[:8] == b[:8] for a, b in zip(expected, got))


def test_rows_of_different_lengths_batch_as_each_alone(library, graphs):
    """Three turns of different prompt lengths in one batch give each one's lone tokens: the
    int8 kernel, as the float32 one, reads each row's own length."""
    q8 = graphs[1]
    prompts = [_encode(library, _asked(q)) for q in QUESTIONS[:3]]
    assert len({len(p) for p in prompts}) == 3
    alone = [run(q8, [p])[0] for p in prompts]
    assert run(q8, prompts) == alone
    assert len({tuple(t) for t in alone}) == 3  # the check can fail


def test_a_kept_turn_continues_exactly(library, graphs):
    """Kept keys and values are the cache's int8 values (a quarter of float32's bytes), so a
    turn continued from them answers exactly as a fresh prefill with the int8 cache."""
    q8 = graphs[1]
    ids = _encode(library, TEXT)
    split = len(ids) // 2
    cache = BatchCache(q8, 2)
    cache.reserve(2, len(ids))
    q8.forward(np.asarray([ids[:split]]), np.ones((1, split), np.int64), cache.view(0, 1))
    kept = cache.save(0, split)
    assert kept[0].dtype == np.int8 and sum(a.nbytes for a in kept) == split * q8.token_bytes
    cache.load(1, kept, split)
    mask = np.ones((1, len(ids)), np.int64)
    rest = q8.forward(np.asarray([ids[split:]]), mask, cache.view(1, 2), len(ids) - split)
    assert np.array_equal(rest[0, :, : q8.vocab_size], teacher_forced_logits(q8, ids)[split:])


def test_the_scales_are_calibrated_once(library, tmp_path):
    bundle = library.get(NAME).path
    DecoderGraph.load(bundle, 1, kv_cache=tmp_path / "scales")
    written = tmp_path / "scales" / "scales.npz"
    with np.load(written) as data:
        assert len(data.files) == 2 * 4  # a key and a value scale per layer
        assert all(data[name].shape == (2 * 64,) for name in data.files)  # kv heads x size
    before = written.stat().st_mtime_ns
    assert DecoderGraph.load(bundle, 1, kv_cache=tmp_path / "scales").kv_type is np.int8
    assert written.stat().st_mtime_ns == before
    with np.load(written) as data:
        good = {name: data[name] for name in data.files}
    written.write_bytes(b"PK damaged")  # a damaged file is calibrated again
    assert DecoderGraph.load(bundle, 1, kv_cache=tmp_path / "scales").kv_type is np.int8
    with np.load(written) as data:
        assert all(np.array_equal(data[name], good[name]) for name in good)


def test_an_unwritable_folder_keeps_the_float32_cache(library, tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ortserve.engine"):
        graph = DecoderGraph.load(library.get(NAME).path, 1, kv_cache=blocked / "scales")
    assert graph.kv_type is np.float32 and graph.kept_type is np.float16
    assert "int8 KV cache not used" in caplog.text


def test_a_served_turn_with_q8_and_the_scales_go_with_their_bundle(library):
    settings = Settings(models=library.root, kv_cache_type="q8", cpu_int8="off")
    folder = library.root / "cache" / "kv_int8" / library.get(NAME).path.name
    events = served_turn(settings, library, NAME, _asked(QUESTIONS[0]))
    assert isinstance(events[-1], Finished) and any(isinstance(e, TextChunk) for e in events)
    assert (folder / "scales.npz").is_file()
    library.delete(NAME)
    library.prune()
    assert not folder.exists()


def run(graph: DecoderGraph, prompts: list[list[int]], n: int = 48) -> list[list[int]]:
    """Greedy tokens of turns started together on one continuous engine."""
    return run_turns(ContinuousEngine(graph, 8, KVStore(0, 0), "off"), prompts, n)


def _asked(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def _encode(library: Library, text: str) -> list[int]:
    from tokenizers import Tokenizer

    bundle = library.get(NAME).path
    return Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text).ids
