"""What a Hugging Face checkpoint directory holds, checked before any heavy work."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ortserve.errors import UnsupportedModel

# Decoder model_type -> the model.type ORT GenAI knows. Each has a parity test.
DECODERS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
}
# Encoders are exported through sentence-transformers, which keeps pooling and normalisation.
ENCODERS = {"bert", "mpnet", "roberta", "xlm-roberta"}
# Vision-language model_type -> og's multimodal pipeline type (converters/vision.py).
VISION = {"qwen2_5_vl": "qwen2_5_vl", "gemma3": "gemma3"}
# Speech recognition model_type -> og's model type (converters/speech.py).
SPEECH = {"whisper": "whisper"}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint directory, inspected."""

    path: Path
    config: dict[str, Any]
    kind: str  # "decoder", "encoder", "vision" (a vision-language model) or "speech"

    @property
    def architecture(self) -> str:
        return self.config["model_type"]

    @property
    def parameter_count(self) -> int:
        return safetensors_parameter_count(self.path)


def inspect_checkpoint(path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Read config.json and check the architecture and weight files; raise UnsupportedModel."""
    config = _read_config(path)
    model_type = config.get("model_type")
    kind = _kind(path, model_type)
    _check_weights(path, allow_pickle)
    return Checkpoint(path=path, config=config, kind=kind)


def supported_architectures() -> list[str]:
    return (sorted(DECODERS) + sorted(f"{e} (sentence-transformers)" for e in ENCODERS)
            + sorted(f"{v} (vision)" for v in VISION)
            + sorted(f"{s} (speech)" for s in SPEECH))  # fmt: skip


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModel(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UnsupportedModel(f"{config_file} is not valid JSON: {exc}") from exc


def _kind(path: Path, model_type: str | None) -> str:
    if model_type in DECODERS:
        return "decoder"
    if model_type in VISION:
        return "vision"
    if model_type in SPEECH:
        return "speech"
    if model_type in ENCODERS:
        if not (path / "modules.json").is_file():
            raise UnsupportedModel(
                f"{model_type} checkpoints are converted as sentence-transformers embedding "
                f"models, but {path} has no modules.json"
            )
        return "encoder"
    raise UnsupportedModel(
        f"architecture {model_type!r} is not supported; supported: "
        + ", ".join(supported_architectures())
    )


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise UnsupportedModel(
            f"{path} has only pickle weights ({', '.join(sorted(pickles)[:3])}); loading them "
            "can run arbitrary code. Pass --allow-pickle if you trust this checkpoint"
        )
    if not pickles:
        raise UnsupportedModel(f"{path} has no weights (*.safetensors)")


def safetensors_parameter_count(path: Path) -> int:
    """Count parameters from safetensors headers without loading any tensor."""
    total = 0
    for file in path.glob("*.safetensors"):
        for name, entry in _safetensors_header(file).items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def _safetensors_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))
