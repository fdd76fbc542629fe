"""int8 products on continuous lanes (engine/int8_compute.py), on demo-chat's trained weights
converted to int4: the accuracy cost against the int4 kernels, the weights written once
beside hard links, a served turn, the fallback where the cache cannot be written, and the
cache removed with its bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from converters import convert
from converters.demo_model import CHECKPOINT
from converters.verify import cosine_rows
from ortserve.config import Settings
from ortserve.engine.continuous import BatchCache, DecoderGraph, _kept_type
from ortserve.engine.types import Finished, TextChunk
from ortserve.library import Library
from tests.support.decoding import served_turn, teacher_forced_logits

pytestmark = pytest.mark.slow

NAME = "demo-chat:int4"
TEXT = (
    "<|im_start|>user\nWhat do you know about the moon, the tides and the sea? Tell me "
    "about them in a few sentences.<|im_end|>\n<|im_start|>assistant\nThe moon pulls on the "
    "sea, and the water rises and falls twice a day. These are the tides. The sea is large "
    "and deep, and the moon is far away, but its pull is strong enough to move the water."
)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Library:
    library = Library(tmp_path_factory.mktemp("int8") / "models")
    convert(CHECKPOINT, NAME, "int4", library=library, progress=False)
    return library


def test_int8_products_keep_the_int4_models_predictions(library, tmp_path):
    """The accuracy cost on trained weights: next-token agreement and logits cosine over a
    conversation, int8 products against the int4 kernels of the same bundle. Measured on
    demo-chat: top-1 0.92, cosine 0.9994; rounding the weights alone to int8 gives 0.93 and
    0.9998, and quantizing activations per tensor (DynamicQuantizeMatMul) instead of per row
    0.80 and 0.993. Against fp32 the int4 kernels agree on 0.71, int8 products on 0.73."""
    bundle = library.get(NAME).path
    plain = DecoderGraph.load(bundle, 1)
    int8 = DecoderGraph.load(bundle, 1, tmp_path / "cache")
    assert int8.int8 and not plain.int8
    ids = _encode(bundle, TEXT)
    assert len(ids) > 60
    expected, got = teacher_forced_logits(plain, ids), teacher_forced_logits(int8, ids)
    agreement = float((expected.argmax(-1) == got.argmax(-1)).mean())
    cosine = float(cosine_rows(expected, got).mean())
    print(f"int8 products vs int4 kernels: top-1 agreement {agreement:.4f}, cosine {cosine:.5f}")
    assert agreement >= 0.9 and cosine >= 0.999
    written = tmp_path / "cache" / "int8.data"
    links = [p for p in (tmp_path / "cache").iterdir() if p.name != "int8.data"]
    assert written.stat().st_size > 0 and links
    assert all(os.path.samefile(link, bundle / link.name) for link in links)  # not copies
    before = written.stat().st_mtime_ns
    DecoderGraph.load(bundle, 1, tmp_path / "cache")
    assert written.stat().st_mtime_ns == before  # written once


def test_an_unwritable_cache_runs_the_int4_kernels(library, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    graph = DecoderGraph.load(library.get(NAME).path, 1, blocked / "cache")
    assert not graph.int8


def continued(graph: DecoderGraph, ids: list[int], split: int) -> np.ndarray:
    """The logits of ids[split:] fed after a kept turn of ids[:split] (saved, loaded back)."""
    cache = BatchCache(graph, 2)
    cache.reserve(2, len(ids))
    graph.forward(np.asarray([ids[:split]]), np.ones((1, split), np.int64), cache.view(0, 1))
    kept = cache.save(0, split)
    assert kept[0].dtype == graph.kept_type
    assert sum(a.nbytes for a in kept) * (4 // np.dtype(graph.kept_type).itemsize) == (
        split * graph.token_bytes
    )
    cache.load(1, kept, split)  # the next turn: the rest fed after the kept prefix
    mask = np.ones((1, len(ids)), np.int64)
    rest = graph.forward(np.asarray([ids[split:]]), mask, cache.view(1, 2), len(ids) - split)
    return rest[0, :, : graph.vocab_size].astype(np.float32)


def test_kept_turns_of_a_quantized_model_are_float16(library):
    """Kept keys and values (kvcache.py) of an int4 model are stored in float16 (half the
    memory). The cost on demo-chat's trained weights, a turn continued from them against a
    fresh prefill: next tokens agree on 20 of 21 positions (0.95), logits cosine 0.99991
    (the int4 kernels against fp32 agree on 0.71). Kept in float32 it is exact."""
    bundle = library.get(NAME).path
    half, exact = DecoderGraph.load(bundle, 1), DecoderGraph.load(bundle, 1, keep="f32")
    assert half.kept_type is np.float16 and exact.kept_type is np.float32
    ids = _encode(bundle, TEXT)
    split = len(ids) // 2
    fresh = teacher_forced_logits(exact, ids)[split:]
    assert np.array_equal(continued(exact, ids, split), fresh)
    got = continued(half, ids, split)
    agreement = float((fresh.argmax(-1) == got.argmax(-1)).mean())
    cosine = float(cosine_rows(fresh, got).mean())
    print(f"float16 kept turn vs fresh prefill: top-1 {agreement:.4f}, cosine {cosine:.6f}")
    assert agreement >= 0.9 and cosine >= 0.9995


def test_a_served_turn_with_int8_products_and_the_cache_goes_with_its_bundle(library):
    settings = Settings(models=library.root, cpu_int8="on")
    folder = library.root / "cache" / "int8" / library.get(NAME).path.name
    events = served_turn(settings, library, NAME, TEXT[:120])
    assert isinstance(events[-1], Finished) and any(isinstance(e, TextChunk) for e in events)
    assert (folder / "int8.data").is_file()
    library.delete(NAME)
    library.prune()
    assert not folder.exists()


def test_an_fp32_model_keeps_exact_keys_and_values(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"...MatMul...GroupQueryAttention...")  # no quantized projection
    assert _kept_type("auto", np.float32, graph) is np.float32
    assert _kept_type("f16", np.float32, graph) is np.float16
    graph.write_bytes(b"...MatMulNBits...")
    assert _kept_type("auto", np.float32, graph) is np.float16
    assert _kept_type("f32", np.float32, graph) is np.float32


def _encode(bundle, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text).ids


def test_auto_turns_int8_products_on_where_the_cpu_has_amx(monkeypatch):
    """The default, `auto`: int8 products where the CPU has AMX-INT8 (the suite pins the
    int4 kernels elsewhere, tests/conftest.py), never for `off`."""
    from ortserve.engine import int8_compute

    assert Settings(models=Path("models")).cpu_int8 == "auto"
    monkeypatch.setattr(int8_compute, "amx_available", lambda: True)
    assert int8_compute.wanted("auto") and int8_compute.wanted("on")
    assert not int8_compute.wanted("off")
    monkeypatch.setattr(int8_compute, "amx_available", lambda: False)
    assert not int8_compute.wanted("auto") and int8_compute.wanted("on")


def test_a_rows_int8_products_do_not_depend_on_the_other_rows(tmp_path):
    """One MatMulNBits (random 4-bit blocks) rewritten into int8 products: rows computed
    together equal each row computed alone, bit for bit (an all-positive row among them:
    quantized alone it would get a finer scale, were it not for the range columns), and they
    stay close to the int4 product."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ortserve.engine import int8_compute

    k, n, block = 64, 48, 32
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = (rng.random((n, k // block)) * 0.1 + 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], name="proj", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=4)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(blocks, "w"), numpy_helper.from_array(scales, "s")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    int4 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert int8_compute.rewrite(model, tmp_path, tmp_path / "cache")
    options = ort.SessionOptions()
    key = "session.model_external_initializers_file_folder_path"
    options.add_session_config_entry(key, str(tmp_path / "cache"))
    int8 = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip
    x = (
        rng.standard_normal((1, 6, k)).astype(np.float32)
        * np.arange(1, 7, dtype=np.float32)[:, None]
    )
    x[0, 2] = np.abs(x[0, 2])
    together = int8.run(None, {"x": x})[0]
    alone = np.concatenate([int8.run(None, {"x": x[:, i : i + 1]})[0] for i in range(6)], axis=1)
    assert np.array_equal(together, alone)
    reference = int4.run(None, {"x": x})[0]
    assert float(cosine_rows(reference[0], together[0]).min()) > 0.999
