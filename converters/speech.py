"""Whisper checkpoints -> ORT GenAI speech bundles, built and verified.

The ORT GenAI model builder builds WhisperForConditionalGeneration whole: encoder.onnx (audio
features -> hidden states and every decoder layer's cross-attention keys and values),
decoder.onnx, genai_config.json (model type "whisper", an encoder and a decoder section) and
audio_processor_config.json (og's log-mel feature extractor, onnxruntime-extensions style:
AudioDecoder -> STFTNorm -> LogMelSpectrum, 30-second windows of 3000 frames). The bundle's
details.format is "onnx-genai-speech" (library/bundle.py), served by engine/speech.py.

Verification runs the bundle on a generated clip (a chirp between two silences, so that both
feature extractors read the same frames at its edges) against transformers: og's log-mel
features vs WhisperFeatureExtractor's, greedy tokens, and teacher-forced logits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from converters.checkpoint import Checkpoint
from converters.progress import Progress
from ortserve.errors import InvalidRequest

SAMPLE_RATE = 16000
# Files of the builder's output that make the bundle (besides the graphs' external data).
_BUILT = ("genai_config.json", "audio_processor_config.json")
_GRAPHS = ("encoder.onnx", "decoder.onnx")
# The decoder prompt of a verification run; tokens the tokenizer lacks (an English-only
# model's language token) are left out.
VERIFY_PROMPT = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


def choose_graph(backend: str) -> str:
    """Whisper is built by the model builder only (no optimum route for speech bundles)."""
    if backend == "optimum":
        raise InvalidRequest(
            "backend 'optimum' does not convert Whisper checkpoints; use 'builder' or 'auto'",
            param="backend",
        )
    return "builder"


def builder_options(precision: str, provider: str, *, block_size: int = 32) -> dict[str, str]:
    """The builder options of a Whisper build (the decoders' fusions do not apply to it)."""
    options = {"hf_token": "false"}
    if precision in ("int4", "int8"):
        options["block_size"] = str(block_size)
        if provider == "cpu":
            options["accuracy_level"] = "4"  # int8 activations: the fast CPU kernel
    return options


def build_speech(checkpoint: Checkpoint, out: Path, precision: str, *, provider: str = "cpu",
                 block_size: int = 32) -> Path:  # fmt: skip
    """The builder's encoder.onnx, decoder.onnx and configs in `out` (a spawned process's
    work: see converters/isolated.py)."""
    from converters.builder import build_decoder

    options = builder_options(precision, provider, block_size=block_size)
    build_decoder(checkpoint, out, precision, provider=provider, block_size=block_size,
                  options=options)  # fmt: skip
    return out


def build_graphs(
    checkpoint: Checkpoint, staged: Path, bundle: Path, opts: Any, reporter: Progress
) -> None:
    """convert.py's graph step for a speech checkpoint: the builder's files into `bundle`."""
    from converters.isolated import run_isolated

    if opts.precision == "fp16" and opts.provider == "cpu":
        raise InvalidRequest(
            "precision fp16 is not built for Whisper on the CPU (its attention is fp32 there); "
            "use fp32, int8 or int4",
            param="precision",
        )
    built = staged / "built"
    with reporter.step("export"):
        run_isolated("export", build_speech, checkpoint, built, opts.precision,
                     provider=opts.provider, block_size=opts.block_size)  # fmt: skip
    with reporter.step("quantize"):  # done by the builder as it built
        names = [p.name for p in built.iterdir() if p.name.startswith(_GRAPHS)]
        for name in (*names, *_BUILT):
            os.replace(built / name, bundle / name)
        shutil.rmtree(built)


# ---- verification ----------------------------------------------------------------------------


def sample_clip(seconds: float = 2.0, silence: float = 0.25) -> np.ndarray:
    """A 300 -> 1100 Hz chirp between two silences, float32 mono at 16 kHz.

    The silences make both feature extractors agree at the clip's edges: transformers pads
    the signal (reflect at the start, zeros to 30 s) before its STFT, og pads the frames.
    """
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)
    pad = np.zeros(int(SAMPLE_RATE * silence))
    return np.concatenate([pad, tone, pad]).astype(np.float32)


def wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """`pcm` as a float32 WAV file in memory (what og's AudioDecoder reads)."""
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def verify_speech(checkpoint: Path, bundle: Path, *, new_tokens: int = 32) -> dict[str, Any]:
    """og vs transformers on sample_clip(): features, greedy tokens, teacher-forced logits."""
    from converters.verify import cosine_rows, leading_matches

    pcm = sample_clip()
    run = genai_greedy(bundle, pcm, _prompt(checkpoint), new_tokens)
    reference = reference_features(checkpoint, pcm)
    ref_tokens, ref_logits = transformers_greedy(checkpoint, reference, run["prompt"],
                                                 new_tokens, forced=run["tokens"])  # fmt: skip
    # og's rows follow each generated token (see genai_greedy): transformers' from its second
    rows = min(len(ref_logits) - 1, len(run["logits"]))
    ours, theirs = run["logits"][:rows], ref_logits[1 : rows + 1]
    return {
        "features_max_abs_diff": round(float(np.abs(run["features"] - reference).max()), 6),
        "greedy_tokens": len(ref_tokens),
        "greedy_match": leading_matches(ref_tokens, run["tokens"]),
        "top1_agreement": round(float((ours.argmax(-1) == theirs.argmax(-1)).mean()), 4),
        "logits_cosine": round(float(cosine_rows(ours, theirs).mean()), 5),
    }


def _prompt(checkpoint: Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = tokenizer.get_vocab()
    return [token for token in VERIFY_PROMPT if token in vocab]


def genai_greedy(bundle: Path, pcm: np.ndarray, prompt: list[str], new_tokens: int) -> dict:
    """og's features, prompt ids, greedy tokens (to EOS or `new_tokens`) and logits.

    Measured on og 0.18: after generate_next_token, get_logits() holds the logits computed
    for the NEXT token (the decoder already ran on the one just chosen), so row k is what
    chooses token k + 1.
    """
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    processor = model.create_multimodal_processor()
    inputs = processor("".join(prompt), audios=og.Audios.open_bytes(wav_bytes(pcm)))
    features = inputs["audio_features"].as_numpy().copy()
    ids = [int(i) for i in inputs["input_ids"].as_numpy()[0]]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    logits = []
    # og 0.18's Whisper is not done at max_length (the next step raises): count the tokens
    while not generator.is_done() and generator.token_count() < len(ids) + new_tokens:
        generator.generate_next_token()
        logits.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
    tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    return {"features": features, "prompt": ids, "tokens": tokens, "logits": np.stack(logits)}


def reference_features(checkpoint: Path, pcm: np.ndarray) -> np.ndarray:
    """transformers' log-mel features of `pcm` (the checkpoint's preprocessor_config.json)."""
    from transformers import WhisperFeatureExtractor

    if (checkpoint / "preprocessor_config.json").is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(checkpoint)
    else:
        import json

        mels = json.loads((checkpoint / "config.json").read_text())["num_mel_bins"]
        extractor = WhisperFeatureExtractor(feature_size=mels)
    return extractor(pcm, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features


def transformers_greedy(
    checkpoint: Path, features: np.ndarray, prompt: list[int], new_tokens: int,
    forced: list[int] | None = None,
) -> tuple[list[int], np.ndarray]:  # fmt: skip
    """Greedy tokens from transformers (to EOS or `new_tokens`), and the logits of each step
    with `forced` tokens fed instead (teacher forcing: row k chooses token k, one more row
    than `forced` has tokens)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        encoded = model.model.encoder(torch.tensor(features)).last_hidden_state
        tokens: list[int] = []
        for _ in range(new_tokens):
            ids = torch.tensor([prompt + tokens])
            step = model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits[0, -1]
            tokens.append(int(step.argmax()))
            if tokens[-1] == eos:
                break
        fed = torch.tensor([prompt + (tokens if forced is None else forced)])
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=fed).logits[0]
    return tokens, logits[len(prompt) - 1 :].float().numpy()
