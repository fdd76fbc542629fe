"""Vision-language checkpoints -> ORT GenAI's multimodal bundle (Qwen2.5-VL here; Gemma 3's
own parts in converters/gemma3_vision.py, picked by `_family`).

og 0.18 runs a vision-language model as three ONNX graphs and a processor configuration:

- `vision.onnx`: pixel patches and their grid -> image features. og's model builder does not
  build vision encoders, so this module exports one with `torch.onnx.export` from the
  checkpoint's own vision tower, rewritten so that everything that depends on the image size
  is computed by tensor operations from `image_grid_thw` (transformers loops over Python
  lists there, which a traced graph would freeze at the export image's size);
- `embedding.onnx`: token ids and image features -> input embeddings, the features written
  over the `<|image_pad|>` positions in order;
- `model.onnx`: the builder's decoder with `exclude_embeds` (inputs_embeds in, 3-D mRoPE
  position ids that og computes from the image grid), quantized like any other decoder;
- `processor_config.json`: the onnxruntime-extensions image pipeline that
  `og.MultiModalProcessor` runs (decode, smart resize, rescale, normalize, patch), with the
  checkpoint's own image processor settings.

genai_config.json names all of them (`model.vision`, `model.embedding`) with the token ids og
needs to place images in the prompt and to build the position ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from converters.checkpoint import VISION, Checkpoint
from converters.genai_config import (
    EMBEDDING_FILE,
    PROCESSOR_CONFIG,
    VISION_FILE,
    multimodal_sections,
)
from ortserve.errors import InvalidRequest

log = logging.getLogger("ortserve.convert")

# model_type -> og's model.type of the multimodal pipeline; each has a parity test
# (tests/integration/test_vision_convert.py).
VISION_TYPES = VISION
DECODER_FILE = "model.onnx"
# Files of the checkpoint that describe its image processing (kept in the bundle too).
PREPROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
# Qwen2-VL's image processor defaults (transformers' Qwen2VLImageProcessor, OpenAI CLIP's
# statistics), used where the checkpoint has no preprocessor_config.json.
_IMAGE_DEFAULTS: dict[str, Any] = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 1 / 255,
}
_OPSET = 17
IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def is_vision(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config.json is a vision-language model this module converts."""
    return config.get("model_type") in VISION_TYPES


def choose_graph(backend: str) -> str:
    """Vision-language bundles are made by the builder (decoder) and this module (the rest)."""
    if backend == "optimum":
        raise InvalidRequest(
            "backend 'optimum': vision-language checkpoints are converted with the model "
            "builder's decoder and ortserve's own vision export; use backend 'auto'",
            param="backend",
        )
    return "builder"


# ---- building the bundle --------------------------------------------------------------------


def build_graphs(
    checkpoint: Checkpoint, staged: Path, bundle: Path, opts: Any, reporter: Any
) -> None:
    """The decoder (builder, at the requested precision), vision and embedding graphs."""
    from converters.builder import build_decoder, extra_options
    from converters.isolated import run_isolated

    family = _family(checkpoint.config)
    if hasattr(family, "check"):
        family.check(checkpoint.config)  # before the builder's minutes
    built = staged / "built"
    options = {**extra_options(opts.precision, opts.provider, block_size=opts.block_size),
               "exclude_embeds": "true"}  # fmt: skip
    with reporter.step("export"):
        run_isolated(
            "export", build_decoder, checkpoint, built, opts.precision,
            provider=opts.provider, options=options,
            trust_remote_code=opts.trust_remote_code,
        )  # fmt: skip
        run_isolated("export", family.export_encoders, checkpoint.path, bundle,
                     vision_dtype(opts))  # fmt: skip
    with reporter.step("quantize"):
        # the builder quantized the decoder as it built it; the vision encoder stays in
        # floating point (fp16 for an fp16 bundle), as og's published bundles keep it
        for name in _graph_files(built / DECODER_FILE):
            os.replace(built / name, bundle / name)
        os.replace(built / "genai_config.json", bundle / "genai_config.json")
        shutil.rmtree(built)
        if hasattr(family, "finish_decoder"):  # a family whose attention the builder lacks
            family.finish_decoder(checkpoint.config, bundle)


def vision_dtype(opts: Any) -> str:
    """fp16 for an fp16 bundle, else fp32: quantized vision towers lose too much."""
    return "fp16" if opts.precision == "fp16" else "fp32"


def _graph_files(model: Path) -> list[str]:
    return sorted(p.name for p in model.parent.iterdir() if p.name.startswith(model.name))


def assemble(checkpoint: Checkpoint, bundle: Path, provider: str) -> dict[str, Any]:
    """Complete genai_config.json with the vision and embedding stages; write the processor."""
    from converters.genai_config import complete_builder_config

    for name in PREPROCESSOR_FILES:
        if (checkpoint.path / name).is_file():
            shutil.copyfile(checkpoint.path / name, bundle / name)
    family = _family(checkpoint.config)
    image = family.image_settings(checkpoint.path)
    write_json(bundle / PROCESSOR_CONFIG, family.processor_config(image))
    genai = complete_builder_config(bundle, checkpoint.path, provider)
    if family.__name__ == __name__:
        genai["model"].update(pipeline_sections(checkpoint.config, genai["model"], image))
    else:
        session = genai["model"]["decoder"].get("session_options") or {
            "log_id": "onnxruntime-genai", "provider_options": []}  # fmt: skip
        genai["model"].update(family.pipeline_sections(checkpoint.config, session))
    genai["search"].update(getattr(family, "SEARCH", {}))
    write_json(bundle / "genai_config.json", genai)
    return genai


def _family(config: dict[str, Any]):
    """The module with a family's own parts: this one (Qwen2.5-VL) or converters/gemma3_vision."""
    import sys

    if config.get("model_type") == "gemma3":
        import converters.gemma3_vision

        return converters.gemma3_vision
    return sys.modules[__name__]


def pipeline_sections(
    config: dict[str, Any], model: dict[str, Any], image: dict[str, Any]
) -> dict[str, Any]:
    """genai_config.json's model.type, token ids, `vision` and `embedding` for og's pipeline."""
    vision = config.get("vision_config") or {}
    session = model["decoder"].get("session_options") or {"log_id": "onnxruntime-genai",
                                                          "provider_options": []}  # fmt: skip
    return {
        "type": VISION_TYPES[config["model_type"]],
        "image_token_id": config["image_token_id"],
        "video_token_id": config["video_token_id"],
        "vision_start_token_id": config["vision_start_token_id"],
        **multimodal_sections({
            "spatial_merge_size": image["merge_size"],
            "patch_size": image["patch_size"],
            "tokens_per_second": float(vision.get("tokens_per_second", 2)),
            "window_size": vision.get("window_size", 112),
        }, ("pixel_values", "image_grid_thw"), session),
    }  # fmt: skip


def image_settings(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's image processor settings (preprocessor_config.json over defaults)."""
    path = checkpoint / "preprocessor_config.json"
    found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings = {**_IMAGE_DEFAULTS, **{k: v for k, v in found.items() if k in _IMAGE_DEFAULTS}}
    size = found.get("size") or {}
    # transformers >= 4.50 keeps the pixel bounds in size: {shortest_edge, longest_edge}
    settings["min_pixels"] = size.get("shortest_edge", settings["min_pixels"])
    settings["max_pixels"] = size.get("longest_edge", settings["max_pixels"])
    return settings


def processor_config(image: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-extensions' image pipeline for og.MultiModalProcessor (Qwen2-VL's steps)."""

    def op(name: str, kind: str, **attrs: Any) -> dict[str, Any]:
        operation: dict[str, Any] = {"name": name, "type": kind}
        if attrs:
            operation["attrs"] = attrs
        return {"operation": operation}

    patch, merge = image["patch_size"], image["merge_size"]
    return {
        "processor": {
            "name": "qwen2_5_image_processor",
            "transforms": [
                op("decode_image", "DecodeImage", color_space="RGB"),
                op("convert_to_rgb", "ConvertRGB"),
                op("resize", "Resize", smart_resize=1, min_pixels=image["min_pixels"],
                   max_pixels=image["max_pixels"], patch_size=patch, merge_size=merge),
                op("rescale", "Rescale", rescale_factor=image["rescale_factor"]),
                op("normalize", "Normalize", mean=image["image_mean"], std=image["image_std"],
                   qwen2_5_vl=1),
                op("patch_image", "PatchImage", patch_size=patch,
                   temporal_patch_size=image["temporal_patch_size"], merge_size=merge),
            ],
        }
    }  # fmt: skip


# ---- exporting the vision tower and the embedding stage -----------------------------------------


def export_encoders(checkpoint: Path, bundle: Path, dtype: str = "fp32") -> None:
    """Write bundle/vision.onnx and bundle/embedding.onnx from the checkpoint's weights."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from converters.export import _quiet

    config = AutoConfig.from_pretrained(checkpoint)
    with _quiet("transformers"):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32
        ).eval()
    vision_encoder, embedding_stage = _modules()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    vision = vision_encoder(model.model.visual).to(torch_dtype).eval()
    # og passes the vision graph's features and the embedding graph's output on as they are:
    # one dtype for all three graphs, the decoder's (an fp16 bundle failed otherwise)
    embedding = embedding_stage(model.get_input_embeddings(), config.image_token_id)
    embedding = embedding.to(torch_dtype).eval()
    _export_vision(vision, bundle / VISION_FILE, torch_dtype)
    _export_embedding(
        embedding, bundle / EMBEDDING_FILE, config.vision_config.out_hidden_size, torch_dtype
    )


def _export_vision(vision, path: Path, torch_dtype) -> None:
    import torch

    patch_dim = vision.patch_dim
    grid = torch.tensor([[1, 4, 6]], dtype=torch.int64)  # any grid: nothing is frozen at it
    pixels = torch.randn(int(grid.prod()), patch_dim, dtype=torch_dtype)
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            vision, (pixels, grid), str(path), dynamo=False, opset_version=_OPSET,
            input_names=["pixel_values", "image_grid_thw"], output_names=["image_features"],
            dynamic_axes={"pixel_values": {0: "num_patches"},
                          "image_features": {0: "num_image_tokens"}},
        )  # fmt: skip


def _export_embedding(embedding, path: Path, hidden: int, torch_dtype=None) -> None:
    import torch

    ids = torch.tensor([[1, 2, embedding.image_token_id, embedding.image_token_id, 3]])
    features = torch.randn(2, hidden, dtype=torch_dtype or torch.float32)
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            embedding, (ids, features), str(path), dynamo=False, opset_version=_OPSET,
            input_names=["input_ids", "image_features"], output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                          "image_features": {0: "num_image_tokens"},
                          "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
        )  # fmt: skip


def _quiet_export():
    """torch's tracer warns about every Python int it sees; none of them is image-dependent."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _modules():
    """The torch modules, defined on first use so that importing this file needs no torch."""
    import torch
    from torch import nn

    class VisionEncoder(nn.Module):
        """Qwen2.5-VL's vision tower for one image: (patches, grid [1, 3]) -> features.

        The same computation as transformers' Qwen2_5_VisionTransformerPretrainedModel, with
        the per-image Python loops replaced by index arithmetic on the grid, and the windowed
        and full attention written as masked attention over the whole sequence (same result,
        one graph for every image size).
        """

        def __init__(self, visual: nn.Module):
            super().__init__()
            self.visual = visual
            config = visual.config
            self.merge = config.spatial_merge_size
            self.unit = self.merge * self.merge
            self.window = config.window_size // config.spatial_merge_size // config.patch_size
            self.full_blocks = set(config.fullatt_block_indexes)
            self.patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2

        def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            visual = self.visual
            hidden = visual.patch_embed(pixel_values)
            height, width = grid[0, 1], grid[0, 2]
            frame, rows, cols = self._patch_positions(hidden.shape[0], height, width)
            window, order = self._windows(hidden.shape[0] // self.unit, height, width)
            dim = hidden.shape[-1]
            hidden = hidden.reshape(-1, self.unit, dim)[order].reshape(-1, dim)
            inv_freq = visual.rotary_pos_emb.inv_freq
            angles = torch.cat(
                (rows[:, None].to(inv_freq.dtype) * inv_freq,
                 cols[:, None].to(inv_freq.dtype) * inv_freq), dim=-1,
            )  # fmt: skip
            angles = angles.reshape(-1, self.unit, angles.shape[-1])[order].flatten(0, 1)
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            frame = frame.reshape(-1, self.unit)[order].flatten()
            window = window[order].repeat_interleave(self.unit)
            same_frame = frame[:, None] == frame[None, :]
            same_window = window[:, None] == window[None, :]
            for index, block in enumerate(visual.blocks):
                mask = same_frame if index in self.full_blocks else same_window
                hidden = self._block(block, hidden, cos, sin, mask)
            merged = visual.merger(hidden)
            return merged[torch.argsort(order)]

        def _patch_positions(self, count, height, width):
            """Frame, row and column of each patch in the processor's order (merge blocks)."""
            index = torch.arange(count, device=height.device)
            per_frame = height * width
            frame, inner = index // per_frame, index % per_frame
            block, intra = inner // self.unit, inner % self.unit
            merged_width = width // self.merge
            rows = (block // merged_width) * self.merge + intra // self.merge
            cols = (block % merged_width) * self.merge + intra % self.merge
            return frame, rows, cols

        def _windows(self, merged_count, height, width):
            """Each merged token's attention window, and the order that groups windows."""
            size = self.window
            merged_h, merged_w = height // self.merge, width // self.merge
            across = (merged_w + size - 1) // size
            down = (merged_h + size - 1) // size
            index = torch.arange(merged_count, device=height.device)
            frame = index // (merged_h * merged_w)
            row = (index % (merged_h * merged_w)) // merged_w
            col = index % merged_w
            window = (frame * down + row // size) * across + col // size
            key = window * size * size + (row % size) * size + col % size
            return window, torch.argsort(key)

        @staticmethod
        def _block(block, hidden, cos, sin, mask):
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
                apply_rotary_pos_emb_vision,
            )

            attn = block.attn
            normed = block.norm1(hidden)
            length = normed.shape[0]
            qkv = attn.qkv(normed).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
            q, k, v = qkv.unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # heads, length, head_dim
            scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = torch.matmul(probs, v).transpose(0, 1).reshape(length, -1)
            hidden = hidden + attn.proj(out)
            return hidden + block.mlp(block.norm2(hidden))

    class EmbeddingStage(nn.Module):
        """(input_ids, image_features) -> inputs_embeds: image features over <|image_pad|>.

        The k-th image token takes the k-th feature row, as transformers' masked_scatter
        does. A zero row is appended so that text-only steps (no features) index something.
        """

        def __init__(self, embed_tokens: nn.Module, image_token_id: int):
            super().__init__()
            self.embed_tokens = embed_tokens
            self.image_token_id = image_token_id

        def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
            embeds = self.embed_tokens(input_ids)
            is_image = input_ids == self.image_token_id
            rows = torch.cumsum(is_image.flatten().to(torch.int64), 0) - 1
            padded = torch.cat(
                (image_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1]))
            )
            rows = torch.where(is_image.flatten(), rows, image_features.shape[0])
            taken = padded[rows].reshape(embeds.shape)
            return torch.where(is_image[..., None], taken, embeds)

    return VisionEncoder, EmbeddingStage


def __getattr__(name: str):
    """VisionEncoder and EmbeddingStage, built on first use (they subclass torch's Module)."""
    if name in ("VisionEncoder", "EmbeddingStage"):
        encoder, embedding = _modules()
        globals().update(VisionEncoder=encoder, EmbeddingStage=embedding)
        return globals()[name]
    raise AttributeError(name)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


# ---- verification against transformers --------------------------------------------------------

SAMPLE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the picture in one line."
# A multiple of patch_size * merge_size (28) on both sides, inside Qwen2-VL's pixel bounds: both
# processors then leave its size alone, so the comparison is of the graphs, not of two resizers.
SAMPLE_SIZE = (112, 84)


def make_image(path: Path, size: tuple[int, int] = SAMPLE_SIZE) -> Path:
    """A synthetic test picture (gradients and shapes), drawn with pillow: nothing downloaded."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size)
    pixels = image.load()
    for x in range(width):
        for y in range(height):
            pixels[x, y] = (255 * x // width, 255 * y // height, 255 * (x + y) // (width + height))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(240, 30, 30))
    draw.rectangle((width // 2, height // 2, width - 8, height - 8), fill=(20, 200, 60))
    draw.line((0, height - 1, width - 1, 0), fill=(255, 255, 255), width=3)
    image.save(path)
    return path


def verify_vision(
    checkpoint: Path, bundle: Path, *, new_tokens: int = 24, image: Path | None = None
) -> dict[str, Any]:
    """og's whole pipeline (its processor too) vs transformers on one picture: greedy tokens
    and the prompt's logits."""
    import tempfile

    family = _family(json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory() as scratch:
        picture = image or make_image(Path(scratch) / "sample.png", family.SAMPLE_SIZE)
        reference = family.reference_run(checkpoint, picture, new_tokens)
        produced = genai_run(bundle, picture, new_tokens, family.SAMPLE_PROMPT)
    from converters.verify import cosine_rows, leading_matches

    ref_logits, out_logits = reference["logits"], produced["logits"]
    return {
        "image_tokens": reference["image_tokens"],
        "prompt_ids_equal": reference["input_ids"] == produced["input_ids"],
        "pixel_values_max_diff": float(
            abs(reference["pixel_values"] - produced["pixel_values"]).max()
        ),
        "greedy_tokens": new_tokens,
        "greedy_match": leading_matches(reference["tokens"], produced["tokens"]),
        "top1_agreement": round(float((ref_logits.argmax(-1) == out_logits.argmax(-1)).mean()), 4),
        "logits_cosine": round(float(cosine_rows(ref_logits, out_logits).mean()), 5),
    }


def reference_run(
    checkpoint: Path, pictures: Path | list[Path], new_tokens: int, prompt: str = SAMPLE_PROMPT
) -> dict[str, Any]:
    """transformers: Qwen2VLImageProcessor + the tokenizer (Qwen2_5_VLProcessor itself insists
    on a video processor, which needs torchvision), the prompt's logits and greedy tokens."""
    import torch
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    settings = image_settings(checkpoint)
    processor = Qwen2VLImageProcessor(
        min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"],
        patch_size=settings["patch_size"], temporal_patch_size=settings["temporal_patch_size"],
        merge_size=settings["merge_size"], image_mean=settings["image_mean"],
        image_std=settings["image_std"], rescale_factor=settings["rescale_factor"],
    )  # fmt: skip
    pictures = pictures if isinstance(pictures, list) else [pictures]
    opened = [Image.open(picture).convert("RGB") for picture in pictures]
    pixels = processor(images=opened, return_tensors="pt")
    grid = pixels["image_grid_thw"]
    counts = [int(thw.prod()) // settings["merge_size"] ** 2 for thw in grid]
    parts = prompt.split("<|image_pad|>")  # one placeholder per picture, in order
    text = parts[0] + "".join("<|image_pad|>" * n + part for n, part in zip(counts, parts[1:]))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": pixels["pixel_values"], "image_grid_thw": grid}  # fmt: skip
    with torch.no_grad():
        logits = model.eval()(**inputs).logits[0].float().numpy()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    return {
        "input_ids": ids[0].tolist(),
        "image_tokens": sum(counts),
        "pixel_values": pixels["pixel_values"].numpy(),
        "logits": logits,
        "tokens": out[0, ids.shape[1] :].tolist(),
    }


def genai_run(
    bundle: Path, pictures: Path | list[Path], new_tokens: int, prompt: str = SAMPLE_PROMPT
) -> dict[str, Any]:
    """og 0.18: Model, MultiModalProcessor, Images, Generator.set_inputs; the same figures."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    processor = model.create_multimodal_processor()
    pictures = pictures if isinstance(pictures, list) else [pictures]
    inputs = processor(prompt, images=og.Images.open(*(str(p) for p in pictures)))
    ids = inputs["input_ids"].as_numpy().reshape(-1).tolist()
    pixels = inputs["pixel_values"].as_numpy()
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    logits, tokens = None, []
    while not generator.is_done():
        generator.generate_next_token()
        if logits is None:  # the prompt's step: one row per prompt position
            logits = np.asarray(generator.get_output("logits"))[0].astype(np.float32)
        tokens.append(int(generator.get_next_tokens()[0]))
    return {"input_ids": ids, "pixel_values": pixels, "logits": logits, "tokens": tokens}


# ---- a tiny random-weight checkpoint for tests ----------------------------------------------------

TINY_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rope_theta": 10000.0, "tie_word_embeddings": False,
    # head_dim 16: the mRoPE sections (temporal, height, width) cover its 8 frequencies
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}  # fmt: skip
TINY_VISION = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
    "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    # windows of 2x2 merged tokens (56 pixels): the sample picture has several, one of them
    # ragged, and block 1 attends the whole picture, as every 8th block of the real models
    "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2,
}  # fmt: skip


def build_tiny_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL with the tiny tokenizer, its image tokens and a
    preprocessor_config.json, saved as a Hugging Face checkpoint in `out`."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    from converters.tiny import SPECIAL_TOKENS, tokenizer_with

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_with(out, IMAGE_TOKENS)
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    config = Qwen2_5_VLConfig(
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)}, vision_config=TINY_VISION,
        vision_start_token_id=start, vision_end_token_id=end, image_token_id=image,
        video_token_id=video, eos_token_id=eos, pad_token_id=0, bos_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=0, bos_token_id=0)
    model.save_pretrained(str(out), safe_serialization=True)
    _complete_config(out / "config.json")
    write_json(out / "preprocessor_config.json", _tiny_preprocessor())
    (out / "LICENSE").write_text("MIT License (random weights, for tests)\n")
    return out


def _complete_config(path: Path) -> None:
    """Write config.json as the published checkpoints do: architectures at the top (the
    builder picks its class from it; transformers 4.57 saves it inside text_config only)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    write_json(path, config)


def _tiny_preprocessor() -> dict[str, Any]:
    settings = dict(_IMAGE_DEFAULTS)
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "resample": 3,
        "size": {"shortest_edge": settings.pop("min_pixels"),
                 "longest_edge": settings.pop("max_pixels")},
        **settings,
    }  # fmt: skip
