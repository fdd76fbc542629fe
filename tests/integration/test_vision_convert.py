"""Vision-language conversion (Qwen2.5-VL) end to end: a tiny random-weight checkpoint with a
processor configuration, converted into og's multimodal bundle, checked against transformers on
a generated picture, and pulled from the test hub as a ready bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from converters import convert, vision
from converters.checkpoint import inspect_checkpoint
from converters.convert import choose_graph
from ortserve.errors import InvalidRequest
from ortserve.library import Library
from tests.hub import LocalHub
from tests.support.http import free_port

pytestmark = pytest.mark.slow

REPO = "test/tiny-vl-onnx"
VARIANT = "cpu-int4"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_vl) -> Library:
    """tiny-vl:fp32 and tiny-vl:int4, each verified against transformers while converted."""
    library = Library(tmp_path_factory.mktemp("vision") / "models")
    for precision in ("fp32", "int4"):
        convert(tiny_vl, f"tiny-vl:{precision}", precision, library=library, progress=False)
    return library


def test_fp32_bundle_generates_what_transformers_does_from_a_picture(converted):
    info = converted.get("tiny-vl:fp32")
    figures = info.manifest["verification"]
    assert figures["prompt_ids_equal"] and figures["image_tokens"] == 12  # a 112x84 picture
    assert figures["pixel_values_max_diff"] < 1e-4  # og's processor = Qwen2VLImageProcessor
    assert figures["greedy_match"] == figures["greedy_tokens"] == 24
    assert figures["logits_cosine"] >= 0.999 and figures["top1_agreement"] == 1.0
    assert "vision" in info.capabilities and "completion" in info.capabilities
    details = info.manifest["details"]
    assert (details["format"], details["family"], details["graph"]) == (
        "onnx-genai", "qwen2_5_vl", "builder")  # fmt: skip
    model = json.loads((info.path / "genai_config.json").read_text())["model"]
    assert model["type"] == "qwen2_5_vl" and model["image_token_id"] == 514
    assert model["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds"
    assert model["vision"]["filename"] == "vision.onnx"
    assert model["embedding"]["filename"] == "embedding.onnx"
    for name in ("vision.onnx", "embedding.onnx", "processor_config.json", "model.onnx"):
        assert (info.path / name).is_file(), name


def test_the_picture_changes_the_answer(converted, tiny_vl, tmp_path):
    """The parity above could not pass with a broken vision stage: another picture gives
    transformers other logits than og's for the sample picture."""
    sample = vision.make_image(tmp_path / "sample.png")
    other = tmp_path / "other.png"
    from PIL import Image

    Image.open(sample).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    produced = vision.genai_run(converted.get("tiny-vl:fp32").path, sample, 8)
    same = vision.reference_run(tiny_vl, sample, 8)
    different = vision.reference_run(tiny_vl, other, 8)
    assert _cosine(same["logits"], produced["logits"]) >= 0.999
    assert _cosine(different["logits"], produced["logits"]) < 0.999


def test_two_pictures_of_different_sizes_match_transformers(converted, tiny_vl, tmp_path):
    """og runs the vision graph once per picture; the features land in the prompt in order."""
    first = vision.make_image(tmp_path / "wide.png")
    second = vision.make_image(tmp_path / "tall.png", (56, 140))
    prompt = vision.SAMPLE_PROMPT.replace("Describe", "Compare it with <|vision_start|>"
                                          "<|image_pad|><|vision_end|> and describe")  # fmt: skip
    produced = vision.genai_run(converted.get("tiny-vl:fp32").path, [first, second], 12, prompt)
    expected = vision.reference_run(tiny_vl, [first, second], 12, prompt)
    assert expected["image_tokens"] == 12 + 10
    assert produced["input_ids"] == expected["input_ids"]
    assert produced["tokens"] == expected["tokens"]
    assert _cosine(expected["logits"], produced["logits"]) >= 0.999


def test_the_vision_graph_takes_any_image_size(converted, tiny_vl):
    """One exported graph for every grid, ragged attention windows included, as transformers."""
    import onnxruntime as ort
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vl, dtype=torch.float32)
    path = converted.get("tiny-vl:fp32").path / "vision.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    for grid in ([1, 2, 2], [1, 6, 8], [1, 10, 6], [1, 14, 22]):
        thw = torch.tensor([grid])
        pixels = torch.randn(int(thw.prod()), 1176)
        with torch.no_grad():
            expected = model.eval().model.visual(pixels, grid_thw=thw).numpy()
        (got,) = session.run(None, {"pixel_values": pixels.numpy(), "image_grid_thw": thw.numpy()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4, grid


def test_int4_decoder_runs_beside_an_fp32_vision_encoder(converted):
    import onnx

    info = converted.get("tiny-vl:int4")
    figures = info.manifest["verification"]
    assert figures["prompt_ids_equal"] and figures["logits_cosine"] >= 0.97
    decoder = onnx.load(str(info.path / "model.onnx"), load_external_data=False)
    assert "MatMulNBits" in {node.op_type for node in decoder.graph.node}
    encoder = onnx.load(str(info.path / "vision.onnx"))
    assert "MatMulNBits" not in {node.op_type for node in encoder.graph.node}
    assert info.manifest["details"]["quantization"] == "int4"


def test_optimum_backend_is_refused_for_vision_checkpoints(tiny_vl):
    checkpoint = inspect_checkpoint(tiny_vl)
    assert checkpoint.kind == "vision"
    assert choose_graph(checkpoint, "auto") == "builder"
    with pytest.raises(InvalidRequest, match="vision-language"):
        choose_graph(checkpoint, "optimum")


def test_a_modelfile_template_keeps_vision():
    from ortserve.library.modelfile import ModelSpec
    from ortserve.models.create import merge

    manifest = merge({"capabilities": ["completion", "tools", "vision"]},
                     ModelSpec(template="{{ messages }}"))  # fmt: skip
    assert manifest["capabilities"] == ["completion", "vision"]


def test_a_ready_multimodal_bundle_is_pulled_from_a_hub(converted, tmp_path, library):
    """All of its graphs, configs and external data arrive checked against the hub's digests,
    and og runs the pulled copy as it ran the converted one."""
    source = converted.get("tiny-vl:int4").path
    repo = tmp_path / "repo"
    shutil.copytree(source, repo / VARIANT, ignore=shutil.ignore_patterns("ortserve-files.json"))
    (repo / "LICENSE").write_text("MIT License\n")
    hub = LocalHub()
    hub.add_repo(REPO, repo)
    hub.start()
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "ORTSERVE_MODELS": str(library.root),
               "ORTSERVE_HOST": f"127.0.0.1:{free_port()}"}  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "ortserve", "pull", f"hf.co/{REPO}"],
                                env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        hub.stop()
    assert result.returncode == 0, result.stderr
    info = library.get(f"hf.co/{REPO}")
    assert "vision" in info.capabilities
    assert info.manifest["details"]["family"] == "qwen2_5_vl"
    assert info.manifest["verification"]["files_checked"] >= 8
    for name in ("vision.onnx", "embedding.onnx", "model.onnx.data", "processor_config.json"):
        assert (info.path / name).is_file(), name
    assert library.verify(info.name)[0].ok
    picture = vision.make_image(tmp_path / "sample.png")
    pulled = vision.genai_run(info.path, picture, 8)
    original = vision.genai_run(source, picture, 8)
    assert pulled["tokens"] == original["tokens"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    from converters.verify import cosine_rows

    return float(cosine_rows(a, b).mean())
