"""Small model bundles written by hand: real configs and templates, stand-in graphs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ortserve.models.create import described

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def write_bundle(folder: Path, weights: bytes = b"graph") -> Path:
    """A bundle that create accepts: a real genai_config.json and template, no real graph."""
    folder.mkdir(parents=True)
    config = {"model": {"type": "qwen2", "context_length": 128,
                        "decoder": {"hidden_size": 8, "filename": "model.onnx"}}}  # fmt: skip
    (folder / "genai_config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (folder / "model.onnx").write_bytes(weights)
    (folder / "LICENSE").write_text("Apache 2.0")
    return folder


def add_base(library, tmp_path: Path):
    """`base:latest`: an int4 bundle with its own parameters, system prompt and messages."""
    folder = write_bundle(tmp_path / "src")
    manifest = {
        **described(folder, "src"),
        "parameters": {"temperature": 0.7, "top_k": 20},
        "system": "Base system.",
        "messages": [{"role": "user", "content": "old example"}],
    }
    manifest["details"]["quantization"] = "int4"
    with library.staging() as staged:
        (staged / "b").mkdir()
        for f in folder.iterdir():
            (staged / "b" / f.name).write_bytes(f.read_bytes())
        return library.add("base", staged / "b", manifest)


def hand_made_bundle(folder: Path, provider_options: list) -> None:
    """The files of a bundle: a genai_config.json, a stand-in graph, a real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    decoder = {"filename": "model.onnx", "hidden_size": 8, "num_attention_heads": 2,
               "num_hidden_layers": 1, "num_key_value_heads": 2, "head_size": 4,
               "session_options": {"provider_options": provider_options}}  # fmt: skip
    config = {"model": {"type": "qwen2", "context_length": 64, "vocab_size": 4,
                        "eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 1,
                        "decoder": decoder},
              "search": {"do_sample": True, "temperature": 0.6, "top_k": 20, "max_length": 64}}  # fmt: skip
    (folder / "genai_config.json").write_text(json.dumps(config))
    (folder / "model.onnx").write_bytes(bytes(range(256)) * 16 + folder.name.encode())
    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "<unk>": 3}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))


def cached_checkpoint(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(folder)` unless a whole build is already there: built in a
    scratch folder beside it and renamed into place, so an interrupted build is never used."""
    if not (target / "model.safetensors").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent))
        build(scratch)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    return target
