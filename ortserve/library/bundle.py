"""What a bundle directory holds: its kind, chat template, capabilities and shape.

Read from the bundle's own files, so a converted bundle and a downloaded one are described
the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
SENTENCE_CONFIG = "sentence_bert_config.json"
POOLING_CONFIG = "1_Pooling/config.json"
# Files a bundle keeps from its checkpoint besides the ONNX model.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    SENTENCE_CONFIG,
    "config_sentence_transformers.json",
    POOLING_CONFIG,
)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE")
# Thinking sections' (open, close) tags, the usual first; templates are matched on them.
THINKING_TAGS = (
    ("<think>", "</think>"),  # Qwen3, QwQ, DeepSeek-R1, Phi-4-reasoning, SmolLM3, GLM-4.5
    ("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ("[THINK]", "[/THINK]"),  # Magistral
)
# Template variables of thinking: the switch and an earlier answer's thinking (Qwen3's names).
THINKING_VARIABLES = ("enable_thinking", "reasoning_content")
# Capabilities that come from the graphs (genai_config.json's model sections), not the template.
INPUT_CAPABILITIES = ("vision",)


def is_genai(bundle: Path) -> bool:
    """Whether `bundle` is an ORT GenAI bundle (it has a genai_config.json)."""
    return (Path(bundle) / GENAI_CONFIG).is_file()


def genai_config(bundle: Path) -> dict[str, Any]:
    """The bundle's genai_config.json, parsed: the one place that reads it.

    Raises OSError when it is missing and ValueError when it is not JSON.
    """
    return json.loads((Path(bundle) / GENAI_CONFIG).read_text(encoding="utf-8"))


def decoder_config(bundle: Path) -> dict[str, Any]:
    """genai_config.json's model.decoder section."""
    return genai_config(bundle)["model"]["decoder"]


def target_provider(bundle: Path) -> str:
    """The provider a bundle was converted for (its decoder's provider_options), else cpu."""
    options = decoder_config(bundle).get("session_options", {}).get("provider_options", [])
    for entry in options:
        for name in entry:
            return name.lower()
    return "cpu"


# og pipelines whose input is audio (an encoder-decoder): served by the speech backend.
SPEECH_TYPES = ("whisper",)
# bundle_kind -> details.format, the key that picks an engine backend (engine/backend.py)
FORMATS = {"generate": "onnx-genai", "speech": "onnx-genai-speech", "embedding": "onnx-embedding"}


def bundle_format(bundle: Path) -> str:
    """'onnx-genai', 'onnx-genai-speech' or 'onnx-embedding': the key that picks a backend."""
    return FORMATS[bundle_kind(bundle)]


def bundle_kind(bundle: Path) -> str:
    """'generate' for an ORT GenAI decoder bundle, 'speech' for an ORT GenAI speech
    recognition bundle (Whisper), 'embedding' for an encoder bundle."""
    if is_genai(bundle):
        model_type = genai_config(bundle).get("model", {}).get("type")
        return "speech" if model_type in SPEECH_TYPES else "generate"
    if (bundle / "modules.json").is_file() and (bundle / "model.onnx").is_file():
        return "embedding"
    raise ValueError(f"{bundle} is neither an ONNX GenAI bundle nor an embedding bundle")


def chat_template(bundle: Path) -> str | None:
    """The Hugging Face chat template: chat_template.jinja, .json, or tokenizer_config.json."""
    jinja = bundle / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(bundle / name).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template:
            return template
    return None


def capabilities(bundle: Path) -> list[str]:
    """What the bundle can do: 'embedding', 'audio' (speech to text), or 'completion' and what
    its template offers."""
    kind = bundle_kind(bundle)
    if kind == "embedding":
        return ["embedding"]
    if kind == "speech":
        return ["audio"]
    return template_capabilities(chat_template(bundle) or "") + input_capabilities(bundle)


def input_capabilities(bundle: Path) -> list[str]:
    """'vision' for og's multimodal pipeline (genai_config.json has a model.vision section):
    what the graphs take, so a Modelfile TEMPLATE does not change it (models/create.py)."""
    model = genai_config(bundle).get("model") or {}
    return [name for name in INPUT_CAPABILITIES if isinstance(model.get(name), dict)]


# og's gemma3 processor replaces this literal text (src/models/gemma_image_processor.cpp)
GEMMA3_IMAGE = "<start_of_image>"


def image_placeholder(bundle: Path) -> str | None:
    """The text that stands for one image in a prompt of a vision bundle (None otherwise);
    og's processor repeats its image token to the picture's token count. Qwen2.5-VL's is
    `<|vision_start|><|image_pad|><|vision_end|>`: the start and image ids come from
    genai_config.json, the end's from config.json (else the start token's text with "start"
    read as "end"), their text from tokenizer.json's added tokens. Gemma 3's is
    `<start_of_image>`, the text og's gemma3 processor expands (to 256 soft tokens)."""
    model = genai_config(bundle).get("model") or {}
    if not isinstance(model.get("vision"), dict):
        return None
    added = _read_json(Path(bundle) / "tokenizer.json").get("added_tokens") or []
    texts = {token.get("id"): token.get("content") for token in added}
    if model.get("type") == "gemma3":
        return GEMMA3_IMAGE if GEMMA3_IMAGE in texts.values() else None
    start = texts.get(model.get("vision_start_token_id"))
    image = texts.get(model.get("image_token_id"))
    end = texts.get(_read_json(Path(bundle) / "config.json").get("vision_end_token_id"))
    if end is None and start and start.replace("start", "end") in texts.values():
        end = start.replace("start", "end")
    if not (start and image and end):
        return None  # another family's scheme (Phi-3-vision's <|image_1|>, ...): no images
    return start + image + end


def template_capabilities(source: str) -> list[str]:
    """'completion', plus 'tools' and 'thinking' when the chat template renders them.

    One place for both a bundle's template and a Modelfile TEMPLATE that replaces it.
    """
    found = ["completion"]
    if "tools" in source:
        found.append("tools")
    if template_thinks(source):
        found.append("thinking")
    return found


def template_thinks(source: str) -> bool:
    """Whether a chat template has a thinking section (Qwen3's <think>, DeepSeek-R1's, ...).

    A tag in the source counts, the closing one alone too: DeepSeek-R1's first templates only
    cut '</think>' out of earlier answers. So do the variables Qwen3's template reads.
    """
    if any(tag in source for pair in THINKING_TAGS for tag in pair):
        return True
    return any(name in source for name in THINKING_VARIABLES)


def describe(bundle: Path) -> dict[str, Any]:
    """Shape details (family, context, embedding length, format) from the bundle's files."""
    config = _read_json(bundle / "config.json")
    kind = bundle_kind(bundle)
    if kind in ("generate", "speech"):
        model = genai_config(bundle)["model"]
        return {
            "format": FORMATS[kind],
            "family": model["type"],
            "context_length": model["context_length"],
            "embedding_length": model["decoder"]["hidden_size"],
        }
    sentence = _read_json(bundle / SENTENCE_CONFIG)
    pooling = _read_json(bundle / POOLING_CONFIG)
    return {
        "format": "onnx-embedding",
        "family": config.get("model_type", "unknown"),
        "context_length": sentence.get("max_seq_length") or config.get("max_position_embeddings"),
        "embedding_length": pooling.get("word_embedding_dimension") or config.get("hidden_size"),
    }


def license_text(directory: Path) -> str | None:
    for name in LICENSE_FILES:
        path = directory / name
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
