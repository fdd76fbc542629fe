"""genai_config.json: written for an optimum export, completed for a model builder graph.

An optimum export gets one from the checkpoint's config and the exported graph's real input
and output names; the model builder writes its own, which `complete_builder_config` adds to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from converters.checkpoint import DECODERS

# Where ORT GenAI should run the bundle; the server still picks the provider at load time.
_PROVIDER_OPTIONS = {"cpu": [], "cuda": [{"cuda": {}}], "dml": [{"dml": {}}]}


# og's multimodal bundle: the graphs beside the decoder and its image processor's
# configuration (converters/vision.py and gemma3_vision.py write them).
VISION_FILE = "vision.onnx"
EMBEDDING_FILE = "embedding.onnx"
PROCESSOR_CONFIG = "processor_config.json"


def multimodal_sections(vision: dict[str, Any], vision_inputs: tuple[str, ...],
                        session: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """genai_config.json's `vision` and `embedding` sections of og's multimodal pipeline:
    `vision` holds the family's own settings, `vision_inputs` what its vision graph takes."""
    return {
        "vision": {
            "filename": VISION_FILE,
            "config_filename": PROCESSOR_CONFIG,
            **vision,
            "inputs": {name: name for name in vision_inputs},
            "outputs": {"image_features": "image_features"},
            "session_options": json.loads(json.dumps(session)),
        },
        "embedding": {
            "filename": EMBEDDING_FILE,
            "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
            "outputs": {"inputs_embeds": "inputs_embeds"},
            "session_options": json.loads(json.dumps(session)),
        },
    }


def graph_io(model_path: Path) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX graph, read without loading its weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def build_genai_config(
    config: dict[str, Any],
    generation: dict[str, Any],
    inputs: list[str],
    outputs: list[str],
    *,
    filename: str = "model.onnx",
    provider: str = "cpu",
) -> dict[str, Any]:
    """The genai_config.json dict for a decoder exported with past key values."""
    heads = config["num_attention_heads"]
    context = config.get("max_position_embeddings") or 4096
    eos = _token_ids(generation.get("eos_token_id"), config.get("eos_token_id"))
    decoder = {
        "filename": filename,
        "head_size": config.get("head_dim") or config["hidden_size"] // heads,
        "hidden_size": config["hidden_size"],
        "num_attention_heads": heads,
        "num_hidden_layers": config["num_hidden_layers"],
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "session_options": {
            "log_id": "onnxruntime-genai",
            "provider_options": _PROVIDER_OPTIONS[provider],
        },
        "inputs": _input_names(inputs),
        "outputs": _output_names(outputs),
    }
    model = {
        "type": DECODERS[config["model_type"]],
        "context_length": context,
        "vocab_size": config["vocab_size"],
        "bos_token_id": _first(generation.get("bos_token_id"), config.get("bos_token_id"), 0),
        "eos_token_id": eos,
        "pad_token_id": _first(config.get("pad_token_id"), generation.get("pad_token_id"), eos[0]),
        "decoder": decoder,
    }
    return {"model": model, "search": _search(generation, context)}


def write_genai_config(bundle: Path, checkpoint: Path, provider: str) -> dict[str, Any]:
    """Write bundle/genai_config.json; return it."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    generation = read_generation_config(checkpoint)
    inputs, outputs = graph_io(bundle / "model.onnx")
    genai = build_genai_config(config, generation, inputs, outputs, provider=provider)
    (bundle / "genai_config.json").write_text(json.dumps(genai, indent=2), encoding="utf-8")
    return genai


def complete_builder_config(bundle: Path, checkpoint: Path, provider: str) -> dict[str, Any]:
    """Add to the model builder's genai_config.json what the optimum route's has too; return it.

    The builder's file is kept (its decoder inputs, KV sharing, sliding windows and token ids
    describe its graph); on top: every end-of-sequence id of config.json and
    generation_config.json (the builder keeps one), the checkpoint's repetition penalty, and
    the provider the bundle targets where the builder built it for another (fp16 on CPU).
    """
    path = bundle / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    generation = read_generation_config(checkpoint)
    model = genai["model"]
    model["eos_token_id"] = _token_ids(
        model.get("eos_token_id"), generation.get("eos_token_id"), config.get("eos_token_id")
    )
    if "repetition_penalty" in generation:
        genai["search"]["repetition_penalty"] = generation["repetition_penalty"]
    session = model["decoder"].setdefault("session_options", {})
    built_for = [name.lower() for entry in session.get("provider_options", []) for name in entry]
    if built_for[:1] != ([] if provider == "cpu" else [provider]):
        session["provider_options"] = _PROVIDER_OPTIONS[provider]
    path.write_text(json.dumps(genai, indent=2), encoding="utf-8")
    return genai


def read_generation_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "generation_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _input_names(inputs: list[str]) -> dict[str, str]:
    names = {"input_ids": "input_ids"}
    for optional in ("attention_mask", "position_ids"):
        if optional in inputs:
            names[optional] = optional
    names["past_key_names"] = _pattern(inputs, "key")
    names["past_value_names"] = _pattern(inputs, "value")
    return names


def _output_names(outputs: list[str]) -> dict[str, str]:
    return {
        "logits": "logits",
        "present_key_names": _pattern(outputs, "key"),
        "present_value_names": _pattern(outputs, "value"),
    }


def _pattern(names: list[str], kind: str) -> str:
    """'past_key_values.0.key' -> 'past_key_values.%d.key' (likewise present.N.value)."""
    for name in names:
        match = re.fullmatch(rf"(.*\.)0(\.{kind})", name)
        if match:
            return f"{match.group(1)}%d{match.group(2)}"
    raise ValueError(f"exported graph has no layer-0 {kind} cache tensor among {names[:6]}")


def _search(generation: dict[str, Any], context: int) -> dict[str, Any]:
    return {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": context,
        "past_present_share_buffer": False,
        "num_beams": 1,
        "top_k": generation.get("top_k", 50),
        "top_p": generation.get("top_p", 1.0),
        "temperature": generation.get("temperature", 1.0),
        "repetition_penalty": generation.get("repetition_penalty", 1.0),
    }


def _token_ids(*candidates: Any) -> list[int]:
    ids: list[int] = []
    for value in candidates:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids or [0]


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)
