"""Gemma 3 vision end to end: a tiny random-weight Gemma3ForConditionalGeneration (SigLIP tower,
projector pooling 32x32 patches to og's 256 image tokens) with a processor configuration,
converted into og's gemma3 bundle, checked against transformers on a drawn picture, and served:
a turn with a picture through the Runtime and through `ortserve serve` under Ollama's client
gives transformers' greedy tokens."""

from __future__ import annotations

import io
import json

import numpy as np
import ollama
import pytest

from converters import convert, gemma3_vision, vision
from converters.verify import cosine_rows
from ortserve.config import Settings
from ortserve.engine.runtime import Runtime
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.errors import UnsupportedModel
from ortserve.library import Library
from ortserve.library.bundle import image_placeholder
from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

FP32, INT4, FP16 = "tiny-gemma3:fp32", "tiny-gemma3:int4", "tiny-gemma3:fp16"
QUESTION = "What is in the picture?"
GREEDY = GenerationOptions(temperature=0, num_predict=12, repeat_penalty=1.0, num_ctx=1024,
                           logprobs=0)  # fmt: skip


def chat(text: str, pictures: int = 1) -> str:
    """The tiny model's ChatML user turn with serving's placeholder per picture."""
    return (f"<|im_start|>user\n{gemma3_vision.BOI * pictures}{text}<|im_end|>\n"
            "<|im_start|>assistant\n")  # fmt: skip


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_gemma3) -> Library:
    """fp32, int4 and fp16 bundles, each verified against transformers while converted."""
    library = Library(tmp_path_factory.mktemp("gemma3") / "models")
    for name in (FP32, INT4, FP16):
        convert(tiny_gemma3, name, name.rsplit(":", 1)[1], library=library, progress=False)
    return library


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    return vision.make_image(folder / "sample.png", gemma3_vision.SAMPLE_SIZE)


def test_fp32_bundle_generates_what_transformers_does_from_a_picture(library):
    info = library.get(FP32)
    figures = info.manifest["verification"]
    assert figures["prompt_ids_equal"] and figures["image_tokens"] == 256
    assert figures["pixel_values_max_diff"] < 1e-4  # og's processor = Gemma3ImageProcessor
    assert figures["greedy_match"] == figures["greedy_tokens"] == 24
    assert figures["logits_cosine"] >= 0.999 and figures["top1_agreement"] == 1.0
    assert "vision" in info.capabilities
    assert (info.manifest["details"]["family"], info.manifest["details"]["graph"]) == (
        "gemma3", "builder")  # fmt: skip
    model = json.loads((info.path / "genai_config.json").read_text())["model"]
    assert model["type"] == "gemma3" and model["image_token_id"] == 514  # <image_soft_token>
    assert model["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds"
    assert model["vision"]["inputs"] == {"pixel_values": "pixel_values"}
    assert model["embedding"]["filename"] == "embedding.onnx"
    assert image_placeholder(info.path) == "<start_of_image>"


def test_the_picture_changes_the_answer(library, tiny_gemma3, picture, tmp_path):
    """The parity above could not pass with a broken vision stage."""
    from PIL import Image

    other = tmp_path / "flipped.png"
    Image.open(picture).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    produced = vision.genai_run(library.get(FP32).path, picture, 4, gemma3_vision.SAMPLE_PROMPT)
    same = gemma3_vision.reference_run(tiny_gemma3, picture, 4)
    different = gemma3_vision.reference_run(tiny_gemma3, other, 4)
    assert cosine_rows(same["logits"], produced["logits"]).mean() >= 0.999
    assert cosine_rows(different["logits"], produced["logits"]).mean() < 0.99


def test_a_picture_attends_to_itself_both_ways(library, tiny_gemma3, picture):
    """The builder's causal decoder matches transformers run causally (cosine 0.60 against its
    own run on this model); the rewritten attention matches transformers' own run."""
    import onnx

    bundle = library.get(FP32).path
    produced = vision.genai_run(bundle, picture, 4, gemma3_vision.SAMPLE_PROMPT)
    both_ways = gemma3_vision.reference_run(tiny_gemma3, picture, 4)
    causal = gemma3_vision.reference_run(tiny_gemma3, picture, 4, bidirectional=False)
    assert cosine_rows(both_ways["logits"], produced["logits"]).mean() >= 0.999
    assert cosine_rows(causal["logits"], produced["logits"]).mean() < 0.9
    decoder = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    assert {node.op_type for node in decoder.node} >= {"Attention", "RotaryEmbedding"}
    assert "GroupQueryAttention" not in {node.op_type for node in decoder.node}
    assert "input_ids" in {value.name for value in decoder.input}
    search = json.loads((bundle / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] is False


def test_a_prompt_longer_than_the_sliding_window(library, tiny_gemma3, picture):
    """Layer 0 attends within 512 tokens (transformers: query - key < window): a 700-token
    prompt with a picture gives transformers' greedy tokens."""
    words = " ".join(f"w{i % 37}" for i in range(160))
    prompt = f"{words} {gemma3_vision.SAMPLE_PROMPT}"
    produced = vision.genai_run(library.get(FP32).path, picture, 6, prompt)
    expected = gemma3_vision.reference_run(tiny_gemma3, picture, 6, prompt)
    assert len(expected["input_ids"]) > 600
    assert produced["tokens"] == expected["tokens"]
    assert cosine_rows(expected["logits"], produced["logits"]).mean() >= 0.999


def test_two_pictures_one_resized_match_transformers(library, tiny_gemma3, picture, tmp_path):
    """One vision run for both pictures ([2, 3, 128, 128] -> [2, 256, hidden]); a 56x140
    picture is resized by og (bilinear) as by transformers, within a grey level."""
    second = vision.make_image(tmp_path / "tall.png", (56, 140))
    prompt = gemma3_vision.SAMPLE_PROMPT.replace("Describe", f"Compare with {gemma3_vision.BOI}")
    produced = vision.genai_run(library.get(FP32).path, [picture, second], 8, prompt)
    expected = gemma3_vision.reference_run(tiny_gemma3, [picture, second], 8, prompt)
    assert produced["input_ids"] == expected["input_ids"]
    assert np.abs(produced["pixel_values"] - expected["pixel_values"]).max() <= 2 / 255 * 2
    assert produced["tokens"] == expected["tokens"]
    assert cosine_rows(expected["logits"], produced["logits"]).mean() >= 0.999


def test_the_vision_graph_matches_transformers_on_a_batch(library, tiny_gemma3):
    import onnxruntime as ort
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma3, dtype=torch.float32)
    path = library.get(FP32).path / "vision.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        expected = model.eval().model.get_image_features(pixels).numpy()
    (got,) = session.run(None, {"pixel_values": pixels.numpy()})
    assert got.shape == expected.shape == (3, 256, 64)
    assert np.abs(got - expected).max() < 1e-4


def test_int4_decoder_runs_beside_an_fp32_vision_encoder(library):
    import onnx

    info = library.get(INT4)
    figures = info.manifest["verification"]
    assert figures["prompt_ids_equal"] and figures["logits_cosine"] >= 0.97
    decoder = onnx.load(str(info.path / "model.onnx"), load_external_data=False)
    assert "MatMulNBits" in {node.op_type for node in decoder.graph.node}
    encoder = onnx.load(str(info.path / "vision.onnx"))
    assert "MatMulNBits" not in {node.op_type for node in encoder.graph.node}
    assert info.manifest["details"]["quantization"] == "int4"


def test_an_fp16_bundle_passes_one_dtype_through_its_three_graphs(library):
    """og hands vision features to the embedding graph, and its output to the decoder, as they
    are: an fp32 embedding graph between fp16 ones failed ("Unexpected input data type")."""
    import onnx

    info = library.get(FP16)
    figures = info.manifest["verification"]
    assert figures["greedy_match"] == 24 and figures["logits_cosine"] >= 0.999
    fp16 = onnx.TensorProto.FLOAT16
    embedding = onnx.load(str(info.path / "embedding.onnx")).graph
    vision_graph = onnx.load(str(info.path / "vision.onnx")).graph
    assert vision_graph.output[0].type.tensor_type.elem_type == fp16
    assert {v.name: v.type.tensor_type.elem_type for v in embedding.input}["image_features"] == fp16
    assert embedding.output[0].type.tensor_type.elem_type == fp16


def test_a_checkpoint_og_could_not_place_is_refused():
    """og's gemma3 processor writes 256 soft tokens per picture, whatever the checkpoint says."""
    gemma3_vision.check({"mm_tokens_per_image": 256})
    with pytest.raises(UnsupportedModel, match="64 tokens per image"):
        gemma3_vision.check({"mm_tokens_per_image": 64})


# ---- serving ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(library):
    runtime = Runtime(Settings(models=library.root), library)
    loaded = runtime.acquire(FP32)
    yield loaded
    runtime.release(loaded)
    runtime.shutdown()


def run(model, prompt: str, images=()) -> tuple[list[int], Finished]:
    events = list(model.generate(model.encode(prompt), GREEDY, images=images))
    ids = [lp.token_id for e in events if isinstance(e, TextChunk) for lp in e.logprobs]
    assert isinstance(events[-1], Finished)
    return ids, events[-1]


def until_eos(tokens: list[int], eos: int = 2) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_a_served_turn_with_a_picture_is_transformers_greedy_answer(model, tiny_gemma3, picture):
    prompt = chat(QUESTION)
    ids, finished = run(model, prompt, [picture.read_bytes()])
    expected = gemma3_vision.reference_run(tiny_gemma3, picture, 12, prompt)
    assert ids and ids == until_eos(expected["tokens"])
    # <start_of_image> became "\n\n<start_of_image>" + 256 soft tokens + "<end_of_image>\n\n"
    assert finished.usage.prompt_tokens == len(expected["input_ids"])
    from PIL import Image

    flipped = io.BytesIO()
    Image.open(picture).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, "PNG")
    assert run(model, prompt, [flipped.getvalue()])[0] != ids


def test_a_text_turn_on_the_gemma3_model(model, tiny_gemma3):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    prompt = chat(QUESTION, pictures=0)
    ids, _ = run(model, prompt)
    reference = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma3, dtype=torch.float32)
    tokens = torch.tensor([model.encode(prompt)])
    out = reference.eval().generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                                    do_sample=False, max_new_tokens=12, pad_token_id=0)  # fmt: skip
    assert ids == until_eos(out[0, tokens.shape[1] :].tolist())


def test_ollama_chat_with_a_picture_through_the_server(library, tiny_gemma3, picture):
    from transformers import AutoTokenizer

    server = Server(library)
    try:
        reply = ollama.Client(host=server.url).chat(
            model=FP32, messages=[{"role": "user", "content": QUESTION,
                                   "images": [picture.read_bytes()]}],
            options={"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0},
        )  # fmt: skip
    finally:
        server.stop()
    expected = gemma3_vision.reference_run(tiny_gemma3, picture, 12, chat(QUESTION))
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3)
    text = tokenizer.decode(until_eos(expected["tokens"]), skip_special_tokens=True)
    assert reply.message.content == text and text
    assert reply.prompt_eval_count == len(expected["input_ids"])
