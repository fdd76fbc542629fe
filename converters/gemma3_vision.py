"""Gemma 3 (Gemma3ForConditionalGeneration) -> og 0.18's multimodal bundle (model type gemma3).

The second family of converters/vision.py, which builds the decoder (og's model builder with
`exclude_embeds`) and calls this module for what differs:

- `vision.onnx`: `pixel_values [images, 3, size, size]` -> `image_features [images, tokens,
  hidden]`: the SigLIP tower and the multi-modal projector (average pooling to
  `mm_tokens_per_image`, RMSNorm, projection), exported as it is: the image size is fixed;
- `embedding.onnx`: `input_ids`, `image_features` -> `inputs_embeds`: Gemma's scaled token
  embedding (x sqrt(hidden)), the features written over `<image_soft_token>` in order;
- `processor_config.json`: decode, resize to the fixed size, rescale, normalize, channels first;
- genai_config.json: `model.type` gemma3 and `image_token_id` (the soft token).

og's gemma3 processor (src/models/gemma_image_processor.cpp) replaces each `<start_of_image>` of
the prompt with `\\n\\n<start_of_image>` + 256 x `<image_soft_token>` + `<end_of_image>\\n\\n`,
as transformers' Gemma3Processor does; 256 is fixed in og, so only checkpoints with
`mm_tokens_per_image` 256 (every published Gemma 3) convert.

Gemma 3 lets the soft tokens of one picture attend to each other both ways in the prompt
(transformers' `token_type_ids`), while the builder's decoder (GroupQueryAttention) is causal
everywhere: `finish_decoder` rewrites its attention with converters/image_attention.py, so that
og's logits are transformers' own (verification compares with transformers as Gemma3Processor
drives it, `token_type_ids` included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converters.genai_config import (
    EMBEDDING_FILE,
    VISION_FILE,
    multimodal_sections,
)
from ortserve.errors import UnsupportedModel

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
IMAGE_TOKENS = (BOI, EOI, SOFT)
# og 0.18 expands each <start_of_image> to this many soft tokens, whatever the checkpoint says
OG_IMAGE_TOKENS = 256
SAMPLE_PROMPT = f"{BOI}Describe the picture in one line."
# SigLIP's image processor defaults (transformers' Gemma3ImageProcessor)
_IMAGE_DEFAULTS: dict[str, Any] = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "rescale_factor": 1 / 255,
    "resample": 2,
}
# PIL's resampling filters -> onnxruntime-extensions' Resize interpolation
_INTERPOLATION = {0: "NEAREST", 2: "LINEAR", 3: "CUBIC"}
_OPSET = 17


def check(config: dict[str, Any]) -> None:
    """Refuse a checkpoint og's gemma3 pipeline could not run."""
    tokens = config.get("mm_tokens_per_image", OG_IMAGE_TOKENS)
    if tokens != OG_IMAGE_TOKENS:
        raise UnsupportedModel(
            f"this Gemma 3 checkpoint has {tokens} tokens per image; onnxruntime-genai's gemma3 "
            f"pipeline places exactly {OG_IMAGE_TOKENS}"
        )


def image_settings(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's image processor settings (preprocessor_config.json over defaults)."""
    found = _read_json(checkpoint / "preprocessor_config.json")
    settings = {**_IMAGE_DEFAULTS, **{k: v for k, v in found.items() if k in _IMAGE_DEFAULTS}}
    side = (_read_json(checkpoint / "config.json").get("vision_config") or {}).get("image_size")
    size = found.get("size") or {}
    settings["height"] = size.get("height", side or 896)
    settings["width"] = size.get("width", side or 896)
    return settings


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def processor_config(image: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-extensions' image pipeline for og's gemma3 processor."""

    def op(name: str, kind: str, **attrs: Any) -> dict[str, Any]:
        operation: dict[str, Any] = {"name": name, "type": kind}
        if attrs:
            operation["attrs"] = attrs
        return {"operation": operation}

    interpolation = _INTERPOLATION.get(image["resample"], "LINEAR")
    return {
        "processor": {
            "name": "gemma_3_image_processing",
            "transforms": [
                # already RGB: ortx's ConvertRGB would swap the channels (BGR <-> RGB)
                op("decode_image", "DecodeImage", color_space="RGB"),
                op("resize", "Resize", interpolation=interpolation, width=image["width"],
                   height=image["height"], keep_aspect_ratio=0),
                op("rescale", "Rescale", rescale_factor=image["rescale_factor"]),
                op("normalize", "Normalize", mean=image["image_mean"], std=image["image_std"]),
                op("to_channel_first", "Permute3D", dims=[2, 0, 1]),
            ],
        }
    }  # fmt: skip


# Attention (opset 23) returns past + step: og grows the KV cache instead of sharing one buffer
SEARCH = {"past_present_share_buffer": False}


def finish_decoder(config: dict[str, Any], bundle: Path) -> None:
    """Let each picture's soft tokens attend to each other both ways (see the module's text)."""
    from converters.image_attention import rewrite

    text = config.get("text_config") or {}
    rewrite(bundle / "model.onnx", config["image_token_index"], text.get("sliding_window"))


def pipeline_sections(config: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """genai_config.json's model.type, image token id, `vision` and `embedding` sections."""
    return {
        "type": "gemma3",
        "image_token_id": config["image_token_index"],
        **multimodal_sections({}, ("pixel_values",), session),
    }


# ---- exporting the vision tower and the embedding stage -----------------------------------------


def export_encoders(checkpoint: Path, bundle: Path, dtype: str = "fp32") -> None:
    """Write bundle/vision.onnx and bundle/embedding.onnx from the checkpoint's weights."""
    import warnings

    import torch
    from transformers import Gemma3ForConditionalGeneration

    from converters.export import _quiet

    with _quiet("transformers"):  # eager attention: what the tracer writes as plain MatMuls
        model = Gemma3ForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    check(model.config.to_dict())
    vision_encoder, embedding_stage = _modules()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    vision = vision_encoder(model.model).to(torch_dtype).eval()
    # og hands the vision graph's features to the embedding graph, and the embedding graph's
    # output to the decoder, as they are: one dtype for all three (the decoder's)
    embedding = embedding_stage(model.get_input_embeddings(), model.config.image_token_index)
    embedding = embedding.to(torch_dtype)
    side = model.config.vision_config.image_size
    hidden = model.config.text_config.hidden_size
    # the tracer warns about every Python int it sees; none depends on the picture
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            vision, (torch.randn(2, 3, side, side, dtype=torch_dtype),), str(bundle / VISION_FILE),
            dynamo=False, opset_version=_OPSET, input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_axes={"pixel_values": {0: "num_images"}, "image_features": {0: "num_images"}},
        )  # fmt: skip
        token = embedding.image_token_id
        ids = torch.tensor([[1, 2, token, token, 3]])
        torch.onnx.export(
            embedding.eval(), (ids, torch.randn(1, 2, hidden, dtype=torch_dtype)),
            str(bundle / EMBEDDING_FILE),
            dynamo=False, opset_version=_OPSET, input_names=["input_ids", "image_features"],
            output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                          "image_features": {0: "num_images", 1: "num_image_tokens"},
                          "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
        )  # fmt: skip
    _any_rank(bundle / EMBEDDING_FILE, "image_features")


def _any_rank(path: Path, name: str) -> None:
    """Drop the declared shape of an input: og hands the embedding stage the vision graph's
    [images, tokens, hidden] features, but [0, hidden] on a turn without pictures."""
    import onnx

    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name == name:
            value.type.tensor_type.ClearField("shape")
    onnx.save(model, str(path))


def _modules():
    """The torch modules, defined on first use so that importing this file needs no torch."""
    import torch
    from torch import nn

    class VisionEncoder(nn.Module):
        """pixel_values [images, 3, size, size] -> features [images, tokens, text hidden]."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.tower = model.vision_tower
            self.projector = model.multi_modal_projector

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.tower(pixel_values=pixel_values).last_hidden_state
            return self.projector(hidden)

    class EmbeddingStage(nn.Module):
        """(input_ids, image_features) -> inputs_embeds: the k-th soft token takes the k-th
        feature row, as transformers' masked_scatter does. Features of any rank: og passes
        [images, tokens, hidden], or [0, hidden] without pictures; a zero row is appended so
        that text-only steps index something."""

        def __init__(self, embed_tokens: nn.Module, image_token_id: int):
            super().__init__()
            self.embed_tokens = embed_tokens  # Gemma's: scaled by sqrt(hidden)
            self.image_token_id = image_token_id

        def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
            embeds = self.embed_tokens(input_ids)
            hidden = embeds.shape[-1]
            rows = image_features.reshape(-1, hidden).to(embeds.dtype)
            padded = torch.cat((rows, embeds.new_zeros(1, hidden)))
            is_image = (input_ids == self.image_token_id).flatten()
            index = torch.cumsum(is_image.to(torch.int64), 0) - 1
            index = torch.where(is_image, index, rows.shape[0])
            taken = padded[index].reshape(embeds.shape)
            return torch.where(is_image.reshape(input_ids.shape)[..., None], taken, embeds)

    return VisionEncoder, EmbeddingStage


# ---- verification against transformers --------------------------------------------------------


def expand_prompt(prompt: str, images: int = 1) -> str:
    """What og's and transformers' Gemma 3 processors make of a prompt's <start_of_image>s."""
    if prompt.count(BOI) != images:
        raise ValueError(f"the prompt has {prompt.count(BOI)} {BOI} for {images} images")
    return prompt.replace(BOI, f"\n\n{BOI}{SOFT * OG_IMAGE_TOKENS}{EOI}\n\n")


def reference_run(
    checkpoint: Path, pictures: Path | list[Path], new_tokens: int, prompt: str = SAMPLE_PROMPT,
    *, bidirectional: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """transformers: Gemma3ImageProcessor + the tokenizer (the prompt expanded as
    Gemma3Processor does), the prompt's logits and greedy tokens. With `token_type_ids`, as
    Gemma3Processor returns them (soft tokens attend each other both ways); `bidirectional`
    False runs the model causally, as the builder's decoder alone would."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3ImageProcessor

    settings = image_settings(checkpoint)
    processor = Gemma3ImageProcessor(
        size={"height": settings["height"], "width": settings["width"]},
        resample=settings["resample"], rescale_factor=settings["rescale_factor"],
        image_mean=settings["image_mean"], image_std=settings["image_std"],
    )  # fmt: skip
    pictures = pictures if isinstance(pictures, list) else [pictures]
    opened = [Image.open(picture).convert("RGB") for picture in pictures]
    pixels = processor(images=opened, return_tensors="pt")["pixel_values"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = expand_prompt(prompt, len(pictures))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    if bidirectional:
        soft = tokenizer.convert_tokens_to_ids(SOFT)
        inputs["token_type_ids"] = (ids == soft).to(torch.int64)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits[0].float().numpy()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    return {
        "input_ids": ids[0].tolist(),
        "image_tokens": OG_IMAGE_TOKENS * len(pictures),
        "pixel_values": pixels.numpy(),
        "logits": logits,
        "tokens": out[0, ids.shape[1] :].tolist(),
    }


# ---- a tiny random-weight checkpoint for tests ----------------------------------------------------

TINY_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "query_pre_attn_scalar": 16, "rope_theta": 10000.0,
    "rope_local_base_freq": 10000.0, "sliding_window": 512,
    "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": False,
}  # fmt: skip
# 128 x 128 pictures in 4 x 4 patches: 32 x 32 patches, pooled 2 x 2 to og's 256 tokens
TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "image_size": 128, "patch_size": 4, "vision_use_head": False,
}  # fmt: skip
SAMPLE_SIZE = (128, 128)  # the tiny model's own size: neither processor resizes it


def build_tiny_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """A random-weight Gemma 3 with the tiny tokenizer, its image tokens and a
    preprocessor_config.json, saved as a Hugging Face checkpoint in `out`."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        GenerationConfig,
    )

    from converters.tiny import SPECIAL_TOKENS, tokenizer_with, write_json

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_with(out, IMAGE_TOKENS)
    boi, eoi, soft = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    config = Gemma3Config(
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)}, vision_config=TINY_VISION,
        mm_tokens_per_image=OG_IMAGE_TOKENS, boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=soft, eos_token_id=eos, pad_token_id=0, bos_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # transformers initializes the projection to zeros: every picture would then read the same
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.05)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=0, bos_token_id=0)
    model.save_pretrained(str(out), safe_serialization=True)
    write_json(out / "preprocessor_config.json", _tiny_preprocessor())
    (out / "LICENSE").write_text("MIT License (random weights, for tests)\n")
    return out


def _tiny_preprocessor() -> dict[str, Any]:
    height, width = SAMPLE_SIZE
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "do_pan_and_scan": False, "size": {"height": height, "width": width},
        **_IMAGE_DEFAULTS,
    }  # fmt: skip
