"""LoRA: PEFT adapters -> .onnx_adapter, graph surgery, and what the adapted graph computes.

The reference is transformers with the LoRA merged into the weights (W + alpha/r * B @ A),
computed with torch; the bundle under test is a real fp32 conversion of the tiny llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters import adapter as lora
from ortserve.errors import InvalidRequest
from tests.support.lora import (
    PROMPT,
    cosine,
    genai_run,
    merged_reference,
    reference_greedy,
    reference_logits,
    write_peft_adapter,
)

pytestmark = pytest.mark.slow


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def fp32_bundle(llama, tmp_path_factory) -> Path:
    """The tiny llama converted at fp32 (verified against transformers by the converter)."""
    from converters import convert
    from ortserve.library import Library

    library = Library(tmp_path_factory.mktemp("lib") / "models")
    return convert(llama, "base", precision="fp32", library=library, progress=False).path


@pytest.fixture(scope="module")
def adapted(fp32_bundle, tmp_path_factory) -> tuple[Path, list]:
    """A copy of the fp32 bundle whose graph has LoRA inputs."""
    out = tmp_path_factory.mktemp("adapted") / "bundle"
    shutil.copytree(fp32_bundle, out)
    targets = lora.add_lora_inputs(fp32_bundle / "model.onnx", out / "model.onnx")
    return out, targets


@pytest.fixture(scope="module")
def peft_dir(llama, tmp_path_factory) -> Path:
    return write_peft_adapter(llama, tmp_path_factory.mktemp("peft") / "my-lora")


# ---- graph surgery ---------------------------------------------------------------------------


def test_surgery_adds_an_input_pair_per_projection(adapted):
    bundle, targets = adapted
    names = {t.module for t in targets}
    assert len(targets) == 2 * 7  # two layers, q k v o gate up down
    assert "model.layers.1.attn.q_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert {t.dtype for t in targets} == {"float32"}
    assert lora.lora_targets(bundle / "model.onnx") == targets
    down = next(t for t in targets if t.module == "model.layers.0.mlp.down_proj")
    assert (down.in_features, down.out_features) == (128, 64)


def test_surgery_refuses_a_graph_that_already_has_lora_inputs(adapted, tmp_path):
    bundle, _ = adapted
    with pytest.raises(InvalidRequest, match="already has LoRA inputs"):
        lora.add_lora_inputs(bundle / "model.onnx", tmp_path / "model.onnx")


def test_no_adapter_active_computes_exactly_the_base_model(fp32_bundle, adapted):
    bundle, _ = adapted
    base_logits, base_tokens = genai_run(fp32_bundle, PROMPT, 24)
    logits, tokens = genai_run(bundle, PROMPT, 24)
    assert tokens == base_tokens
    np.testing.assert_array_equal(logits, base_logits)


def test_active_adapter_matches_transformers_with_the_lora_merged(llama, adapted, peft_dir,
                                                                  tmp_path):  # fmt: skip
    bundle, targets = adapted
    adapter_file = tmp_path / "my-lora.onnx_adapter"
    shapes = lora.convert_peft_adapter(peft_dir, adapter_file, targets=targets)
    assert shapes["model.layers.0.attn.q_proj.lora_A.MatMul.weight"] == (64, 4)
    assert shapes["model.layers.1.mlp.down_proj.lora_B.MatMul.weight"] == (4, 64)
    merged = merged_reference(llama, peft_dir)
    base = merged_reference(llama, None)
    ids = list(range(5, 45))
    logits, tokens = genai_run(bundle, ids[:8], 24, adapter_file)
    full_logits, _ = genai_run(bundle, ids, 1, adapter_file)
    assert cosine(full_logits, reference_logits(merged, ids)) >= 0.999
    assert tokens == reference_greedy(merged, ids[:8], 24)
    # and the adapter really changes the model
    assert cosine(full_logits, reference_logits(base, ids)) < 0.99
    assert tokens != reference_greedy(base, ids[:8], 24)


def test_two_adapters_on_disjoint_weights_add_up(llama, adapted, tmp_path):
    bundle, targets = adapted
    both = write_peft_adapter(llama, tmp_path / "both", targets=("q_proj", "down_proj"))
    config = json.loads((both / "adapter_config.json").read_text())
    params = lora.peft_to_graph(lora.read_safetensors(both / "adapter_model.safetensors"), config)
    attn = {k: v for k, v in params.items() if ".attn." in k}
    mlp = {k: v for k, v in params.items() if ".mlp." in k}
    for name, part in (("both", params), ("attn", attn), ("mlp", mlp)):
        lora.write_onnx_adapter(part, tmp_path / f"{name}.onnx_adapter")
    together, _ = genai_run(bundle, PROMPT, 1, tmp_path / "both.onnx_adapter")
    split, _ = genai_run(bundle, PROMPT, 1, tmp_path / "attn.onnx_adapter",
                         tmp_path / "mlp.onnx_adapter")  # fmt: skip
    alone, _ = genai_run(bundle, PROMPT, 1, tmp_path / "attn.onnx_adapter")
    np.testing.assert_allclose(split, together, rtol=1e-5, atol=1e-5)
    assert not np.allclose(alone, together, atol=1e-3)


def test_bf16_adapters_are_read_without_torch(llama, adapted, tmp_path):
    _, targets = adapted
    peft = write_peft_adapter(llama, tmp_path / "bf16", bf16=True)
    f32 = write_peft_adapter(llama, tmp_path / "f32", bf16=False)
    bf16_tensors = lora.read_safetensors(peft / "adapter_model.safetensors")
    f32_tensors = lora.read_safetensors(f32 / "adapter_model.safetensors")
    for key, value in bf16_tensors.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, f32_tensors[key], rtol=1e-2, atol=1e-2)
    lora.convert_peft_adapter(peft, tmp_path / "x.onnx_adapter", targets=targets)


def test_scaling_follows_peft(llama, tmp_path):
    peft = write_peft_adapter(llama, tmp_path / "p", rank=4, alpha=16.0, targets=("q_proj",))
    tensors = lora.read_safetensors(peft / "adapter_model.safetensors")
    config = json.loads((peft / "adapter_config.json").read_text())
    params = lora.peft_to_graph(tensors, config)
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_allclose(params["model.layers.0.attn.q_proj.lora_B.MatMul.weight"], 4 * b.T)
    params = lora.peft_to_graph(tensors, {**config, "use_rslora": True})
    np.testing.assert_allclose(params["model.layers.0.attn.q_proj.lora_B.MatMul.weight"], 8 * b.T)


# ---- bad adapters get clear errors -----------------------------------------------------------


def test_adapter_for_another_shape_is_refused(adapted, tmp_path, tiny_checkpoint):
    _, targets = adapted
    peft = write_peft_adapter(tiny_checkpoint("llama"), tmp_path / "p")
    config = json.loads((peft / "adapter_config.json").read_text())
    tensors = lora.read_safetensors(peft / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = np.zeros((4, 32), dtype=np.float32)  # the model's hidden size is 64
    params = lora.peft_to_graph(tensors, config)
    lora.write_onnx_adapter(params, tmp_path / "bad.onnx_adapter")
    with pytest.raises(InvalidRequest, match=r"q_proj.lora_A.MatMul.weight has shape \[32, 4\]"):
        lora.check_onnx_adapter(tmp_path / "bad.onnx_adapter", targets)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "PEFT type 'IA3' is not supported"),
        ({"use_dora": True}, "DoRA"),
        ({"r": 0}, "r must be a positive number"),
    ],
)
def test_unsupported_peft_configs(llama, tmp_path, change, message):
    peft = write_peft_adapter(llama, tmp_path / "p")
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InvalidRequest, match=message):
        lora.convert_peft_adapter(peft, tmp_path / "x.onnx_adapter")


def test_embedding_lora_is_refused():
    tensors = {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 8))}
    with pytest.raises(InvalidRequest, match="not a LoRA weight of a layer projection"):
        lora.peft_to_graph(tensors, {"r": 4, "lora_alpha": 8})


def test_garbage_files_are_refused(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(InvalidRequest, match="not a safetensors file"):
        lora.read_safetensors(tmp_path / "w.safetensors")
    (tmp_path / "a.onnx_adapter").write_bytes(b"nonsense" * 10)
    with pytest.raises(InvalidRequest, match="not an .onnx_adapter file"):
        lora.read_onnx_adapter(tmp_path / "a.onnx_adapter")
