"""The converter, end to end: real checkpoints, the real model builder and optimum export,
real ORT GenAI."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from converters import convert
from converters.tiny import ARCHITECTURES
from converters.verify import SENTENCES, greedy_genai, greedy_transformers
from ortserve.errors import InvalidName, UnsupportedModel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fp32_bundle_generates_what_transformers_generates(architecture, tiny_checkpoint, library):
    checkpoint = tiny_checkpoint(architecture)
    info = convert(checkpoint, f"tiny-{architecture}:fp32", precision="fp32", backend="builder",
                   library=library)  # fmt: skip

    assert (info.path / "genai_config.json").is_file()
    assert info.details["graph"] == "builder"
    assert "GroupQueryAttention" in _op_types(info.path)
    assert info.details["family"] == architecture
    assert info.details["quantization"] == "fp32"
    assert info.manifest["verification"]["greedy_match"] == 32
    # independently of the recorded figures: 40 greedy tokens, token for token
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 100, 7, 250, 31, 64]
    assert greedy_genai(info.path, prompt, 40) == greedy_transformers(reference, prompt, 40)


# Figures measured on the tiny llama (hidden 64, random weights, so nearly flat logits), model
# builder graphs: int8 top-1 0.958, cosine 0.99994; int4 (embeddings quantized too) top-1 0.708,
# cosine 0.9895; fp16 top-1 1.0, cosine 1.0. (optimum's: 0.958/0.99994, 0.604/0.9885,
# 1.0/0.99997.) The bounds leave an honest margin below those.
@pytest.mark.parametrize(
    "precision, min_top1, min_cosine",
    [("int8", 0.9, 0.999), ("int4", 0.45, 0.97), ("fp16", 0.95, 0.999)],
)
def test_reduced_precision_reports_agreement(
    precision, min_top1, min_cosine, tiny_checkpoint, library
):
    info = convert(
        tiny_checkpoint("llama"), f"tiny:{precision}", precision=precision, library=library
    )
    figures = info.manifest["verification"]
    assert figures["top1_agreement"] >= min_top1
    assert figures["logits_cosine"] >= min_cosine
    assert info.details["quantization"] == precision
    fp32 = convert(tiny_checkpoint("llama"), "tiny:fp32", precision="fp32", library=library)
    if precision != "fp16":
        assert info.size < fp32.size
    assert "MatMulNBits" in _op_types(info.path) or precision == "fp16"


def _op_types(bundle):
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def test_manifest_records_what_show_needs(tiny_checkpoint, library):
    info = convert(
        tiny_checkpoint("qwen2"), "chat", precision="int4", block_size=16, library=library
    )
    m = info.manifest
    assert m["details"]["parameter_count"] > 100_000
    assert m["details"]["context_length"] == 1024
    assert m["details"]["embedding_length"] == 64
    assert m["capabilities"] == ["completion", "tools"]  # the template renders tools
    assert "<|im_start|>" in m["template"]
    assert m["license"].startswith("MIT")
    assert m["source"]["options"] == {
        "precision": "int4", "block_size": 16, "provider": "cpu", "backend": "auto"}  # fmt: skip
    assert m["details"]["graph"] == "builder"
    assert m["source"]["source"] == str(tiny_checkpoint("qwen2"))
    assert m["created"] and info.size > 0


def test_embedding_bundle_matches_transformers_reference(minilm_dir, minilm_reference, library):
    info = convert(minilm_dir, "all-minilm", precision="fp32", library=library)
    assert info.capabilities == ["embedding"]
    assert info.details["embedding_length"] == 384

    import onnxruntime as ort
    from transformers import AutoTokenizer

    reference = minilm_reference
    batch = AutoTokenizer.from_pretrained(minilm_dir)(
        SENTENCES, padding=True, truncation=True, return_tensors="pt"
    )

    session = ort.InferenceSession(
        str(info.path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {
        "input_ids": batch["input_ids"].numpy(),
        "attention_mask": batch["attention_mask"].numpy(),
    }
    (vectors,) = session.run(["sentence_embedding"], feeds)
    cosines = (reference * vectors).sum(1) / np.linalg.norm(vectors, axis=1)
    assert len(cosines) == 20
    assert cosines.min() >= 0.999
    # and the vectors mean something: a paraphrase ranks above unrelated sentences
    similarity = vectors @ vectors.T
    assert similarity[10, 11] > max(similarity[10, j] for j in range(20) if j not in (10, 11))


def test_unsupported_architecture_fails_fast_and_changes_nothing(tmp_path, library):
    checkpoint = tmp_path / "gpt2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (checkpoint / "model.safetensors").write_bytes(b"")
    started = time.monotonic()
    with pytest.raises(UnsupportedModel) as info:
        convert(checkpoint, "gpt2", library=library)
    assert time.monotonic() - started < 5
    assert "'gpt2' is not supported" in info.value.message
    assert "llama" in info.value.message and "qwen2" in info.value.message
    assert library.list() == []
    assert not library.bundles_dir.exists() or not any(library.bundles_dir.iterdir())


def test_pickle_weights_need_a_flag(tmp_path, tiny_checkpoint, library):
    checkpoint = tmp_path / "pickled"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_bytes(
        (tiny_checkpoint("llama") / "config.json").read_bytes()
    )
    (checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsupportedModel, match="--allow-pickle"):
        convert(checkpoint, "pickled", library=library)
    assert library.list() == []


def test_bad_name_fails_before_any_work(tiny_checkpoint, library):
    with pytest.raises(InvalidName):
        convert(tiny_checkpoint("llama"), "../../outside", library=library)
    assert not library.root.exists() or library.list() == []


def test_repo_id_without_network_fails_within_seconds(library, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ortserve", "convert", "someorg/some-model", "--name", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert "cannot download 'someorg/some-model'" in result.stderr
    assert "Traceback" not in result.stderr
    assert library.list() == []


@pytest.mark.parametrize("kill_at", ["export ...", "verify ..."])
def test_convert_killed_midway_leaves_library_unchanged(kill_at, tiny_checkpoint, library):
    existing = convert(tiny_checkpoint("llama"), "existing", precision="fp32", library=library)
    before = [(m.name, m.digest) for m in library.list()]
    command = [sys.executable, "-m", "ortserve", "convert", str(tiny_checkpoint("llama")),
               "--name", "victim", "--precision", "int8"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in process.stderr:
        if kill_at in line:
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -9, "the conversion finished before it could be killed"

    assert [(m.name, m.digest) for m in library.list()] == before
    assert list(library.tmp_dir.iterdir())  # the killed run's staging is still there ...
    assert library.prune() == []  # ... and prune clears it without touching bundles in use
    assert not list(library.tmp_dir.iterdir())
    assert existing.path.is_dir()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {m.name for m in library.list()} == {"existing:latest", "victim:latest"}
    assert all(r.ok for r in library.verify())
