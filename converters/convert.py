"""Checkpoint -> ONNX bundle -> library, one step at a time, atomically."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from converters.checkpoint import Checkpoint, inspect_checkpoint
from converters.progress import Progress
from converters.quantize import PRECISIONS
from converters.source import ResolvedSource, fingerprint, resolve_source
from ortserve.errors import ConversionError, InvalidRequest
from ortserve.library import Library, ModelInfo, ModelName
from ortserve.library import bundle as bundles

log = logging.getLogger("ortserve.convert")
PROVIDERS = ("cpu", "cuda", "dml")
# Who makes the graph: the ORT GenAI model builder (decoders it supports), optimum (encoders,
# other families, or by choice); "auto" is the builder wherever it applies.
BACKENDS = ("auto", "builder", "optimum")
STEPS = ["download", "export", "quantize", "assemble", "verify", "add to library"]
# An fp32 bundle that agrees less than this with transformers is a broken export.
_FP32_MIN_COSINE = 0.999


@dataclass(frozen=True)
class ConvertOptions:
    precision: str = "int4"
    block_size: int = 32
    provider: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    verify: bool = True
    backend: str = "auto"

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidRequest(
                f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                param="precision",
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidRequest(
                f"block size {self.block_size} must be a power of two, at least 16",
                param="block_size",
            )
        if self.provider not in PROVIDERS:
            raise InvalidRequest(
                f"provider {self.provider!r} is not one of {', '.join(PROVIDERS)}",
                param="provider",
            )
        if self.backend not in BACKENDS:
            raise InvalidRequest(
                f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}", param="backend"
            )

    def recorded(self) -> dict[str, Any]:
        """The options that shape the bundle, as recorded in its manifest."""
        return {k: asdict(self)[k] for k in ("precision", "block_size", "provider", "backend")}


def convert(
    source: str | Path,
    name: str,
    precision: str = "int4",
    *,
    library: Library | None = None,
    progress: bool | Progress = True,
    **options: Any,
) -> ModelInfo:
    """Convert a checkpoint directory or Hugging Face repo id into a library model."""
    opts = ConvertOptions(precision=precision, **options)
    opts.validate()
    model_name = ModelName.parse(name)  # a bad name fails before any heavy work
    library = library or Library()
    reporter = (
        progress
        if isinstance(progress, Progress)  # a caller's own reporter (batch.py)
        else Progress(STEPS, f"convert {model_name.display}", enabled=progress)
    )
    try:
        with reporter.step("download"):
            resolved = resolve_source(
                str(source), revision=opts.revision, allow_pickle=opts.allow_pickle
            )
            checkpoint = inspect_checkpoint(resolved.path, allow_pickle=opts.allow_pickle)
            graph = choose_graph(checkpoint, opts.backend)
        return _build(checkpoint, resolved, model_name, opts, library, reporter, graph)
    finally:
        reporter.close()


def choose_graph(checkpoint: Checkpoint, backend: str) -> str:
    """'builder' or 'optimum': who makes this checkpoint's graph for the requested backend.

    `auto` is the builder wherever its graph can run, else optimum with one warning saying
    why; `builder` where it cannot is an InvalidRequest naming the reason.
    """
    if checkpoint.kind == "vision":  # builder decoder + own vision export (converters/vision.py)
        from converters.vision import choose_graph as vision_graph

        return vision_graph(backend)
    if checkpoint.kind == "speech":  # the builder's encoder and decoder (converters/speech.py)
        from converters.speech import choose_graph as speech_graph

        return speech_graph(backend)
    if backend == "optimum":
        return "optimum"
    why = _builder_refusal(checkpoint)
    if why is None:
        return "builder"
    if backend == "builder":
        raise InvalidRequest(f"backend 'builder': {why}; use backend 'optimum'", param="backend")
    if checkpoint.kind == "decoder":  # encoders always go to optimum: nothing to say
        log.warning("backend auto: exporting with optimum, not the model builder: %s", why)
    return "optimum"


def _builder_refusal(checkpoint: Checkpoint) -> str | None:
    """Why the model builder cannot make this checkpoint's graph (None: it can)."""
    from converters.builder import FAMILIES, installed, supports, unrunnable_shape

    if not supports(checkpoint):
        return f"the model builder builds {', '.join(FAMILIES)}, not {checkpoint.architecture!r}"
    if not installed():
        return "the model builder is not installed (onnxruntime-genai's models.builder, onnx-ir)"
    shape = unrunnable_shape(checkpoint)
    return f"the model builder's graph cannot run this checkpoint: {shape}" if shape else None


def _build(
    checkpoint: Checkpoint,
    resolved: ResolvedSource,
    name: ModelName,
    opts: ConvertOptions,
    library: Library,
    reporter: Progress,
    graph: str,
) -> ModelInfo:
    with library.staging("convert") as staged:
        bundle = staged / "bundle"
        bundle.mkdir()
        make_graph = _builder_graph if graph == "builder" else _optimum_graph
        if checkpoint.kind == "vision":
            from converters.vision import build_graphs as make_graph
        elif checkpoint.kind == "speech":
            from converters.speech import build_graphs as make_graph
        make_graph(checkpoint, staged, bundle, opts, reporter)
        with reporter.step("assemble"):
            assemble_bundle(checkpoint, bundle, opts.provider, graph=graph)
        with reporter.step("verify"):
            verification = _verify(checkpoint, bundle, opts) if opts.verify else {}
        with reporter.step("add to library"):
            manifest = build_manifest(checkpoint, resolved, bundle, opts, verification, graph)
            return library.add(name, bundle, manifest)


def _optimum_graph(
    checkpoint: Checkpoint, staged: Path, bundle: Path, opts: ConvertOptions, reporter: Progress
) -> None:
    """optimum's fp32 export, then onnxruntime's quantizers: bundle/model.onnx."""
    from converters.export import export_onnx
    from converters.isolated import run_isolated
    from converters.quantize import apply_precision

    exported = staged / "export"
    with reporter.step("export"):
        model = run_isolated(
            "export", export_onnx, checkpoint, exported,
            trust_remote_code=opts.trust_remote_code,
        )  # fmt: skip
    with reporter.step("quantize"):
        run_isolated(
            "quantize", apply_precision, model, bundle / "model.onnx", opts.precision,
            block_size=opts.block_size, kind=checkpoint.kind,
        )  # fmt: skip
        shutil.rmtree(exported)


def _builder_graph(
    checkpoint: Checkpoint, staged: Path, bundle: Path, opts: ConvertOptions, reporter: Progress
) -> None:
    """The model builder's graph at the target precision (it quantizes as it builds)."""
    from converters.builder import build_decoder
    from converters.isolated import run_isolated

    built = staged / "built"
    with reporter.step("export"):
        run_isolated(
            "export", build_decoder, checkpoint, built, opts.precision,
            provider=opts.provider, block_size=opts.block_size,
            trust_remote_code=opts.trust_remote_code,
        )  # fmt: skip
    with reporter.step("quantize"):
        # done by the builder: keep its graph, weights and genai_config.json; the tokenizer
        # files it re-saved are replaced by the checkpoint's own in the assemble step
        for name in (*_graph_files(built / "model.onnx"), "genai_config.json"):
            os.replace(built / name, bundle / name)
        shutil.rmtree(built)


def _graph_files(model: Path) -> list[str]:
    """model.onnx and the external-data files beside it (model.onnx.data)."""
    return sorted(p.name for p in model.parent.iterdir() if p.name.startswith(model.name))


def assemble_bundle(
    checkpoint: Checkpoint, bundle: Path, provider: str, *, graph: str = "optimum"
) -> None:
    """Copy tokenizer, templates and configs beside the model; write genai_config.json."""
    from converters.genai_config import complete_builder_config, write_genai_config

    for name in (*bundles.SUPPORT_FILES, *bundles.LICENSE_FILES):
        src = checkpoint.path / name
        if src.is_file():
            (bundle / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, bundle / name)
    if checkpoint.kind == "vision":
        from converters.vision import assemble

        assemble(checkpoint, bundle, provider)
        return
    if checkpoint.kind != "decoder":
        return
    if graph == "builder":
        complete_builder_config(bundle, checkpoint.path, provider)
    else:
        write_genai_config(bundle, checkpoint.path, provider)


def build_manifest(
    checkpoint: Checkpoint,
    resolved: ResolvedSource,
    bundle: Path,
    opts: ConvertOptions,
    verification: dict[str, Any],
    graph: str = "optimum",
) -> dict[str, Any]:
    from converters.genai_config import read_generation_config

    count = checkpoint.parameter_count
    return {
        "details": {
            **bundles.describe(bundle),
            "parameter_count": count,
            "parameter_size": parameter_size(count),
            "quantization": opts.precision,
            "graph": graph,  # who made the graph: "builder" or "optimum"
        },
        "capabilities": bundles.capabilities(bundle),
        "template": bundles.chat_template(bundle),
        "parameters": default_parameters(read_generation_config(checkpoint.path)),
        "system": None,
        "license": bundles.license_text(checkpoint.path),
        "messages": [],
        "adapters": [],
        "source": {
            "source": resolved.source,
            "revision": resolved.revision,
            # a local directory has no commit: re-runs compare this instead (batch skips)
            "fingerprint": fingerprint(resolved.path) if resolved.revision is None else None,
            "options": opts.recorded(),
        },
        "verification": verification,
    }


def default_parameters(generation: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's sampling defaults, under Ollama's parameter names."""
    if not generation.get("do_sample"):
        return {}
    names = {
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "repetition_penalty": "repeat_penalty",
    }
    return {ours: generation[theirs] for theirs, ours in names.items() if theirs in generation}


def parameter_size(count: int) -> str:
    """494032768 -> '494.03M', as Ollama prints parameter sizes."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _verify(checkpoint: Checkpoint, bundle: Path, opts: ConvertOptions) -> dict[str, Any]:
    from converters.verify import verify_decoder, verify_encoder

    if checkpoint.kind == "encoder":
        figures = verify_encoder(checkpoint.path, bundle)
        cosine = figures["embedding_cosine_min"]
    elif checkpoint.kind == "vision":
        from converters.vision import verify_vision

        figures = verify_vision(checkpoint.path, bundle)
        cosine = figures["logits_cosine"]
    elif checkpoint.kind == "speech":
        from converters.speech import verify_speech

        figures = verify_speech(checkpoint.path, bundle)
        cosine = figures["logits_cosine"]
    else:
        figures = verify_decoder(checkpoint.path, bundle)
        cosine = figures["logits_cosine"]
    if opts.precision == "fp32" and cosine < _FP32_MIN_COSINE:
        raise ConversionError(
            f"verification failed: the fp32 bundle's outputs differ from transformers "
            f"(cosine {cosine:.4f} < {_FP32_MIN_COSINE}); the export is wrong: {figures}"
        )
    log.info("verification: %s", figures)
    return figures
