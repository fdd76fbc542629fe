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
