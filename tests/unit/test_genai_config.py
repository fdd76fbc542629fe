import pytest

from converters.genai_config import build_genai_config

CONFIG = {
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "head_dim": 32,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "eos_token_id": 2,
}
INPUTS = ["input_ids", "attention_mask", "position_ids"] + [
    f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")
]
OUTPUTS = ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]


def test_names_come_from_the_graph():
    genai = build_genai_config(CONFIG, {}, INPUTS, OUTPUTS)
    decoder = genai["model"]["decoder"]
    assert decoder["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert decoder["head_size"] == 32  # head_dim wins over hidden / heads
    assert genai["model"]["type"] == "qwen3"
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == 2048


def test_graph_without_position_ids_and_other_cache_names():
    inputs = ["input_ids", "attention_mask", "cache.0.key", "cache.0.value"]
    outputs = ["logits", "new_cache.0.key", "new_cache.0.value"]
    decoder = build_genai_config(CONFIG, {}, inputs, outputs)["model"]["decoder"]
    assert "position_ids" not in decoder["inputs"]
    assert decoder["inputs"]["past_key_names"] == "cache.%d.key"
    assert decoder["outputs"]["present_key_names"] == "new_cache.%d.key"


def test_eos_ids_merge_generation_config_and_sampling_defaults():
    generation = {"eos_token_id": [7, 2], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    genai = build_genai_config(CONFIG, generation, INPUTS, OUTPUTS, provider="cuda")
    assert genai["model"]["eos_token_id"] == [7, 2]
    assert genai["model"]["pad_token_id"] == 7
    assert genai["search"]["do_sample"] is True
    assert genai["search"]["temperature"] == 0.6
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_head_size_defaults_to_hidden_over_heads():
    config = {k: v for k, v in CONFIG.items() if k != "head_dim"}
    assert build_genai_config(config, {}, INPUTS, OUTPUTS)["model"]["decoder"]["head_size"] == 16


def test_missing_cache_inputs_is_an_error():
    with pytest.raises(ValueError, match="key cache"):
        build_genai_config(CONFIG, {}, ["input_ids"], OUTPUTS)


def _builder_bundle(tmp_path, generation, provider_options):
    """A bundle directory with a genai_config.json as the model builder writes one."""
    import json

    checkpoint, bundle = tmp_path / "checkpoint", tmp_path / "bundle"
    checkpoint.mkdir(parents=True)
    bundle.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({**CONFIG, "eos_token_id": 2}))
    (checkpoint / "generation_config.json").write_text(json.dumps(generation))
    session = {"log_id": "onnxruntime-genai", "provider_options": provider_options}
    decoder = {"filename": "model.onnx", "session_options": session, "inputs": {"input_ids": "x"}}
    genai = {
        "model": {"type": "qwen3", "eos_token_id": 7, "decoder": decoder},
        "search": {"past_present_share_buffer": True, "repetition_penalty": 1.0},
    }
    (bundle / "genai_config.json").write_text(json.dumps(genai))
    return checkpoint, bundle


def test_builder_config_is_kept_and_completed(tmp_path):
    from converters.genai_config import complete_builder_config

    generation = {"eos_token_id": [7, 9], "repetition_penalty": 1.1}
    checkpoint, bundle = _builder_bundle(tmp_path, generation, [])
    genai = complete_builder_config(bundle, checkpoint, "cpu")
    assert genai["model"]["eos_token_id"] == [7, 9, 2]  # the builder's first, then every other
    assert genai["search"]["repetition_penalty"] == 1.1
    assert genai["search"]["past_present_share_buffer"] is True  # the builder's graph facts stay
    assert genai["model"]["decoder"]["inputs"] == {"input_ids": "x"}
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == []


def test_builder_config_records_the_provider_the_bundle_targets(tmp_path):
    from converters.genai_config import complete_builder_config

    # fp16 for the CPU is built as for CUDA: the bundle must still say CPU
    checkpoint, bundle = _builder_bundle(tmp_path, {}, [{"cuda": {"enable_cuda_graph": "0"}}])
    genai = complete_builder_config(bundle, checkpoint, "cpu")
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == []
    # built for CUDA and targeting CUDA: the builder's own options stay
    checkpoint, bundle = _builder_bundle(tmp_path / "2", {}, [{"cuda": {"enable_cuda_graph": "0"}}])
    genai = complete_builder_config(bundle, checkpoint, "cuda")
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [
        {"cuda": {"enable_cuda_graph": "0"}}
    ]
