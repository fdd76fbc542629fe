"""The model builder's compatibility layer: what it changes on a transformers 4.x config, the
options the converter passes, which graph a checkpoint gets, and LoRA parts of fused nodes.

The builder's real runs (every family, every precision) are in tests/integration/test_builder.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters import builder
from converters.adapter import LoraTarget, _qkv_widths, unpack_modules
from converters.checkpoint import Checkpoint
from converters.convert import ConvertOptions, choose_graph
from ortserve.errors import InvalidRequest


def _config(model_type: str, **values):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **values)


def test_unscaled_rope_gets_transformers_5_layout():
    config = _config("llama", rope_theta=500000.0)
    assert config.rope_scaling is None  # what the builder iterates, and fails on
    builder.adapt_config(config)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert not hasattr(config, "rope_scaling")


def test_a_config_without_rope_scaling_at_all():
    config = _config("gemma")  # transformers 4.57's gemma has no rope_scaling attribute
    builder.adapt_config(config)
    assert config.rope_parameters["rope_type"] == "default"


def test_rope_scaling_moves_into_rope_parameters():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = _config("llama", rope_scaling=scaling)
    builder.adapt_config(config)
    assert config.rope_parameters == {**scaling, "rope_theta": config.rope_theta}
    assert not hasattr(config, "rope_scaling")


def test_a_transformers_5_config_is_left_alone():
    config = _config("llama")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1.0}
    config.rope_scaling = "untouched"
    builder.adapt_config(config)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1.0}
    assert config.rope_scaling == "untouched"


def test_phi3_without_longrope_takes_the_plain_path():
    config = _config("phi3", max_position_embeddings=1024)
    assert config.original_max_position_embeddings != 1024  # the builder's LongRoPE test
    builder.adapt_config(config)
    assert config.original_max_position_embeddings == 1024


def test_mistral_window_shorter_than_the_context_marks_every_layer_sliding():
    config = _config("mistral", sliding_window=16, max_position_embeddings=1024,
                     num_hidden_layers=3)  # fmt: skip
    builder.adapt_config(config)
    assert config.layer_types == ["sliding_attention"] * 3
    wide = _config("mistral", sliding_window=4096, max_position_embeddings=1024)
    builder.adapt_config(wide)
    assert getattr(wide, "layer_types", None) is None  # never reached: the graph stays as built


@pytest.mark.parametrize(
    ("precision", "provider", "target"),
    [("int4", "cpu", "cpu"), ("fp32", "cpu", "cpu"), ("fp16", "cpu", "cuda"),
     ("fp16", "cuda", "cuda"), ("int4", "dml", "dml")],
)  # fmt: skip
def test_build_target(precision, provider, target):
    assert builder.build_target(precision, provider) == target


def test_options_per_precision():
    int4 = builder.extra_options("int4", "cpu", block_size=64)
    assert int4["block_size"] == "64" and int4["accuracy_level"] == "4"
    assert int4["op_types_to_quantize"] == "MatMul/Gather"
    assert int4["windowed_kv_cache"] == "false" and int4["fuse_mlp_gate_up"] == "true"
    assert "prune_lm_head" not in int4  # it breaks og.Engine
    assert "op_types_to_quantize" not in builder.extra_options("int8", "cpu")
    assert "block_size" not in builder.extra_options("fp32", "cpu")
    assert "accuracy_level" not in builder.extra_options("int4", "cuda")
    assert builder.extra_options("fp16", "cpu")["fuse_qk_norm_gqa"] == "false"
    assert "fuse_qk_norm_gqa" not in builder.extra_options("fp16", "cuda")


def test_stand_ins_refuse_to_be_used():
    stand_in = builder._unavailable("Qwen3_5ForConditionalGeneration")
    with pytest.raises(Exception, match="has no Qwen3_5ForConditionalGeneration"):
        stand_in.from_pretrained("x")


def _checkpoint(model_type: str, kind: str = "decoder") -> Checkpoint:
    return Checkpoint(path=Path("."), config={"model_type": model_type}, kind=kind)


def test_auto_chooses_the_builder_for_its_families_and_optimum_otherwise():
    for family in builder.FAMILIES:
        assert choose_graph(_checkpoint(family), "auto") == "builder"
    assert choose_graph(_checkpoint("bert", "encoder"), "auto") == "optimum"
    assert choose_graph(_checkpoint("llama"), "optimum") == "optimum"


def test_the_builder_backend_refuses_what_it_cannot_build():
    with pytest.raises(InvalidRequest, match="builds llama, qwen2.*not 'bert'"):
        choose_graph(_checkpoint("bert", "encoder"), "builder")


def _shaped(hidden: int, heads: int, kv_heads: int, **extra) -> Checkpoint:
    config = {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, **extra}  # fmt: skip
    return Checkpoint(path=Path("."), config=config, kind="decoder")


@pytest.mark.parametrize(
    ("checkpoint", "why"),
    [
        (_shaped(3200, 32, 32), "head size 100 is not a multiple of 16"),  # open_llama_3b
        (_shaped(96, 4, 2), "head size 24 is not a multiple of 16"),
        (_shaped(64, 4, 4, head_dim=8), "head size 8 is not a multiple of 16"),
        (_shaped(64, 4, 3), "4 attention heads are not a multiple of its 3 key/value heads"),
    ],
)
def test_auto_takes_optimum_for_a_shape_the_builders_graph_cannot_run(checkpoint, why, caplog):
    with caplog.at_level("WARNING", logger="ortserve.convert"):
        assert choose_graph(checkpoint, "auto") == "optimum"
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()
    with pytest.raises(InvalidRequest, match=why) as info:
        choose_graph(checkpoint, "builder")
    assert info.value.param == "backend"


def test_shapes_the_builders_graph_runs():
    for checkpoint in (_shaped(2048, 32, 8), _shaped(64, 4, 2), _shaped(64, 4, 2, head_dim=256)):
        assert builder.unrunnable_shape(checkpoint) is None
        assert choose_graph(checkpoint, "auto") == "builder"


def test_backend_is_validated_and_recorded():
    with pytest.raises(InvalidRequest, match="backend 'onnx' is not one of auto, builder"):
        ConvertOptions(backend="onnx").validate()
    assert ConvertOptions(backend="optimum").recorded()["backend"] == "optimum"


# ---- LoRA on fused projections --------------------------------------------------------------


def test_packed_qkv_widths_from_head_counts():
    assert _qkv_widths(128, 4, 2) == [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)]
    assert _qkv_widths(130, 4, 2) == []  # not a packed QKV of these heads: left whole


def test_a_packed_peft_module_is_split_into_the_graphs_projections():
    targets = [LoraTarget(f"model.layers.0.attn.{p}", 8, w, "float32")
               for p, w in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4))]  # fmt: skip
    a, b = np.ones((8, 2), np.float32), np.arange(32, dtype=np.float32).reshape(2, 16)
    params = {"model.layers.0.attn.qkv_proj.lora_A.MatMul.weight": a,
              "model.layers.0.attn.qkv_proj.lora_B.MatMul.weight": b}  # fmt: skip
    out = unpack_modules(params, targets)
    assert set(out) == {t.a_name for t in targets} | {t.b_name for t in targets}
    np.testing.assert_array_equal(out[targets[1].a_name], a)
    np.testing.assert_array_equal(out[targets[0].b_name], b[:, :8])
    np.testing.assert_array_equal(out[targets[2].b_name], b[:, 12:])


def test_a_packed_module_of_the_wrong_width_is_refused():
    targets = [LoraTarget(f"model.layers.0.mlp.{p}", 8, 4, "float32")
               for p in ("gate_proj", "up_proj")]  # fmt: skip
    params = {"model.layers.0.mlp.gate_up_proj.lora_B.MatMul.weight": np.zeros((2, 10))}
    with pytest.raises(InvalidRequest, match="has 10 outputs.*gate_proj, up_proj have 8"):
        unpack_modules(params, targets)


def test_a_graph_with_the_packed_module_keeps_it_whole():
    targets = [LoraTarget("model.layers.0.attn.qkv_proj", 8, 16, "float32")]
    params = {"model.layers.0.attn.qkv_proj.lora_B.MatMul.weight": np.zeros((2, 16))}
    assert unpack_modules(params, targets).keys() == params.keys()
