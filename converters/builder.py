"""The ORT GenAI model builder as the converter's decoder backend, inside this environment.

The builder (`onnxruntime_genai.models.builder`, shipped in the onnxruntime-genai wheel)
writes the decoder graphs og runs fastest: GroupQueryAttention with rotary inside and a
KV buffer shared between past and present, packed QKV, fused SkipSimplifiedLayerNormalization,
MatMulNBits at accuracy level 4 on CPU, and no `position_ids` input, so prompts of mixed
lengths batch exactly. It is written against transformers 5, while this project pins
transformers < 4.58 (optimum-onnx, the encoder exporter, requires it).

This module is the compatibility layer between the two, not a copy of the builder: it
imports the installed builder and calls its own entry points (`parse_extra_options`, then
`create_model`, what its CLI's `__main__` does; `builder --help` itself crashes in 0.18.0).
What transformers 4.57 lacks is supplied only where it is missing, so under transformers 5
each adjustment is a no-op:

- the builder imports `Qwen3_5ForConditionalGeneration` and `Qwen3_5MoeForConditionalGeneration`
  at module level: stand-ins that refuse to be used (no family we build needs them);
- its config object gets transformers 5's `rope_parameters` layout (rope_type, rope_theta and
  any scaling keys in one dict, no `rope_scaling`): the builder iterates `rope_scaling`, which
  transformers 4.57 sets to None for unscaled models, or lacks altogether (mistral, gemma).

Two more adjustments make the config say what transformers computes (checked by the fp32
parity tests): phi3 without LongRoPE scaling gets `original_max_position_embeddings ==
max_position_embeddings` (the builder otherwise picks its LongRoPE path, which needs the
scaling factors), and a mistral with a sliding window shorter than its context gets
`layer_types` marking every layer sliding (without them the builder ignores the window).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converters.checkpoint import Checkpoint
from ortserve.errors import ConversionError

log = logging.getLogger("ortserve.convert")

# model_type -> the builder's architecture; each has an fp32 parity test (test_builder*.py).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2")
# Classes the 0.18 builder imports from transformers at module level (transformers 5 names).
_MISSING_CLASSES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
_MODULE = "onnxruntime_genai.models.builder"


# onnxruntime's CPU GroupQueryAttention (the builder's attention, and the CPU fallback of a
# bundle built for a GPU) runs head sizes that are multiples of 16 only; measured on
# onnxruntime 1.32: 100 (open_llama_3b) and 20 fail "head_size must be a multiple of 8", 8 and
# 24 "head_size shall be a multiple of 16"; 16 to 512 in steps of 16 run.
_HEAD_SIZE_MULTIPLE = 16


def supports(checkpoint: Checkpoint) -> bool:
    """Whether the builder builds this checkpoint's architecture."""
    return checkpoint.kind == "decoder" and checkpoint.architecture in FAMILIES


def unrunnable_shape(checkpoint: Checkpoint) -> str | None:
    """Why the builder's graph of this checkpoint could not run (None: nothing known against it).

    Checked before building: the builder writes such a graph without complaint, and it fails
    only when onnxruntime first runs it (in the verify step, or later in the server).
    """
    config = checkpoint.config
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        return None  # a shape the builder itself will judge
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_dim") or config.get("hidden_size", 0) // heads
    if head_size % _HEAD_SIZE_MULTIPLE:
        return (
            f"its head size {head_size} is not a multiple of {_HEAD_SIZE_MULTIPLE}, which "
            "onnxruntime's CPU GroupQueryAttention needs"
        )
    if heads % kv_heads:
        return (
            f"its {heads} attention heads are not a multiple of its {kv_heads} key/value heads "
            "(GroupQueryAttention shares each key/value head among whole groups)"
        )
    return None


def installed() -> bool:
    """Whether the builder and its onnx-ir dependency are installed (without importing them)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in (_MODULE, "onnx_ir"))
    except ImportError:  # onnxruntime_genai itself missing
        return False


def import_builder():
    """The builder module, importable under this environment's transformers."""
    import transformers

    for name in _MISSING_CLASSES:
        if not hasattr(transformers, name):
            setattr(transformers, name, _unavailable(name))
    try:
        import onnxruntime_genai.models.builder as builder
    except ImportError as exc:
        raise ConversionError(
            f"the ORT GenAI model builder cannot be imported here ({exc}); "
            "convert with --backend optimum instead"
        ) from exc
    return builder


def _unavailable(name: str) -> type:
    """A stand-in for a transformers class this environment lacks: fails if ever used."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConversionError(f"transformers {_transformers_version()} has no {name}")

    return type(name, (), {"__init__": refuse, "from_pretrained": classmethod(refuse)})


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def adapt_config(config: Any) -> None:
    """Give a transformers 4.x config the layout the builder reads (see the module doc)."""
    text = getattr(config, "text_config", None)
    if text is not None and "rope_scaling" in vars(text) and text.rope_scaling is None:
        # gemma3's text_config: the builder copies its keys up, a None rope_scaling included
        adapt_config(text)
    if not isinstance(getattr(config, "rope_parameters", None), dict):
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        theta = getattr(config, "rope_theta", None)
        config.rope_parameters = {"rope_type": rope_type, "rope_theta": theta, **scaling}
        if "rope_scaling" in vars(config):
            delattr(config, "rope_scaling")  # transformers 5 has rope_parameters only
    longrope = config.rope_parameters.get("rope_type") == "longrope"
    if config.model_type == "phi3" and not longrope:
        config.original_max_position_embeddings = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if (config.model_type == "mistral" and window and window < config.max_position_embeddings
            and getattr(config, "layer_types", None) is None):  # fmt: skip
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers


def build_target(precision: str, provider: str) -> str:
    """The execution provider the builder builds for.

    fp16 on CPU: the builder's CPU attention path is fp32 only (its fp16 CPU graph fails to
    run), so the fp16 graph is built as for CUDA (GroupQueryAttention in fp16, which the CPU
    kernel runs) and the bundle still records the CPU as its provider.
    """
    return "cuda" if provider == "cpu" and precision == "fp16" else provider


def extra_options(precision: str, provider: str, *, block_size: int = 32) -> dict[str, str]:
    """The builder options the converter passes; see docs/converter.md for why each."""
    options = {
        "hf_token": "false",  # a local directory: never ask the Hub for credentials
        # every layer gets a full-length KV buffer, as on every other family: og then sizes
        # the cache from max_length alone (a windowed one needs max_length >= the window)
        "windowed_kv_cache": "false",
        "fuse_mlp_gate_up": "true",  # one MatMulNBits for gate and up: ~4% more decode
    }
    if precision in ("int4", "int8"):
        options["block_size"] = str(block_size)
        if provider == "cpu":
            options["accuracy_level"] = "4"  # int8 activations: the fast CPU kernel
    if precision == "int4":
        # as the optimum route does: the embedding table too (GatherBlockQuantized), which is
        # a quarter of a small model's weights
        options["op_types_to_quantize"] = "MatMul/Gather"
    if build_target(precision, provider) != provider:
        options["fuse_qk_norm_gqa"] = "false"  # CPU GroupQueryAttention has no Q/K norm inputs
    return options


def build_decoder(
    checkpoint: Checkpoint,
    out: Path,
    precision: str,
    *,
    provider: str = "cpu",
    block_size: int = 32,
    trust_remote_code: bool = False,
    options: dict[str, str] | None = None,
) -> Path:
    """Build out/model.onnx (+ .data and genai_config.json) with the builder; return its path.

    `options` replaces the converter's builder options (benchmarks build the builder's own
    defaults with `{}`).
    """
    chosen = extra_options(precision, provider, block_size=block_size) if options is None else {}
    chosen = {**chosen, **(options or {})}
    if trust_remote_code:
        chosen["hf_remote"] = "true"
    target = build_target(precision, provider)
    out.mkdir(parents=True, exist_ok=True)
    cache = out.parent / f"{out.name}-cache"  # the builder's scratch, outside the bundle
    source = str(checkpoint.path)
    with _offline(), _captured() as output:
        try:
            builder = import_builder()
            prepared = builder.parse_extra_options(
                None, source, str(out), precision, target, str(cache),
                [f"{key}={value}" for key, value in chosen.items()],
            )  # fmt: skip
            adapt_config(prepared["hf_details"]["hf_config"])
            builder.create_model(None, source, str(out), precision, target, str(cache), **prepared)
        except ConversionError:
            raise
        except Exception as exc:  # the builder raises plain exceptions of every kind
            log.debug("model builder output:\n%s", output.getvalue())
            said = _last_line(output.getvalue())
            raise ConversionError(
                f"the model builder failed: {type(exc).__name__}: {exc}"
                + (f" (its last output: {said})" if said else "")
            ) from exc
    log.debug("model builder output:\n%s", output.getvalue())
    return out / "model.onnx"


def _last_line(output: str) -> str:
    """The builder's last printed line that is not a progress bar."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines()]
    return next((line for line in reversed(lines) if line and "|" not in line), "")[:300]


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the builder's call: it reads a local directory, never the Hub."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    """The builder prints every step and a tqdm bar per tensor: keep it for errors and debug."""
    from converters.export import _quiet

    buffer = io.StringIO()
    # transformers' tokenizer and loading notices, and an INFO line per quantized MatMul
    noisy = ("transformers", "onnxruntime.quantization.matmul_nbits_quantizer")
    try:
        with _quiet(*noisy), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        sys.stdout.flush()
