"""Does a bundle compute what the checkpoint computes? Figures, measured against transformers.

- Decoders: greedy tokens from ORT GenAI vs transformers `generate(do_sample=False)`, and
  teacher-forced logits: top-1 agreement and mean cosine similarity.
- Encoders: sentence embeddings from onnxruntime vs transformers with the checkpoint's own
  pooling and L2 normalisation: cosine similarity per sentence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_TEXT = (
    "The library keeps every model in a directory named by its digest. A request names a "
    "model, the server loads it, renders the chat template and streams tokens back. "
    "def add(a, b):\n    return a + b\n"
)
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The cat sits outside.",
    "A new movie is so great.",
    "The new movie is awesome.",
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "How do I bake sourdough bread at home?",
    "Quantum computers use qubits instead of bits.",
    "The stock market fell sharply on Monday.",
    "Python is a popular programming language.",
    "Photosynthesis converts light into chemical energy.",
]


def verify_decoder(checkpoint: Path, bundle: Path, *, new_tokens: int = 32) -> dict[str, Any]:
    """Greedy parity and teacher-forced logit agreement of a decoder bundle."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = sample_ids(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = reference(torch.tensor([ids])).logits[0].float().numpy()
        ref_tokens = greedy_transformers(reference, ids[:8], new_tokens)
    del reference
    out_logits = prefill_logits(bundle, ids)
    out_tokens = greedy_genai(bundle, ids[:8], new_tokens)
    return {
        "greedy_tokens": new_tokens,
        "greedy_match": leading_matches(ref_tokens, out_tokens),
        "top1_agreement": round(float((ref_logits.argmax(-1) == out_logits.argmax(-1)).mean()), 4),
        "logits_cosine": round(float(cosine_rows(ref_logits, out_logits).mean()), 5),
    }


def verify_encoder(checkpoint: Path, bundle: Path, sentences=SENTENCES) -> dict[str, Any]:
    """Cosine similarity of the bundle's sentence embeddings to transformers' reference."""
    reference = reference_embeddings(checkpoint, list(sentences))
    produced = bundle_embeddings(bundle, list(sentences))
    cosines = cosine_rows(reference, produced)
    return {
        "sentences": len(cosines),
        "embedding_cosine_min": round(float(cosines.min()), 6),
        "embedding_cosine_mean": round(float(cosines.mean()), 6),
    }


def sample_ids(checkpoint: Path, limit: int = 48) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:limit]


def greedy_transformers(model, prompt: list[int], new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early EOS, so both sides produce the same count
            pad_token_id=model.config.pad_token_id or 0,
        )
    return out[0, len(prompt) :].tolist()


def greedy_genai(bundle: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def prefill_logits(bundle: Path, ids: list[int]) -> np.ndarray:
    """ORT GenAI's logits for every position of `ids` (teacher forcing)."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    return np.asarray(generator.get_output("logits"))[0].astype(np.float32)


def reference_embeddings(checkpoint: Path, sentences: list[str]) -> np.ndarray:
    """transformers forward pass + the checkpoint's pooling + L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    pooled = pool(hidden.numpy(), batch["attention_mask"].numpy(), pooling_mode(checkpoint))
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def bundle_embeddings(bundle: Path, sentences: list[str]) -> np.ndarray:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=tokenizer.padding["pad_id"] if tokenizer.padding else 0)
    tokenizer.enable_truncation(max_length=_max_seq_length(bundle))
    encodings = tokenizer.encode_batch(sentences)
    feeds = {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
    }
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    (out,) = session.run(["sentence_embedding"], {k: v for k, v in feeds.items() if k in names})
    return out.astype(np.float32)


def pooling_mode(directory: Path) -> str:
    path = directory / "1_Pooling" / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    for mode in ("cls_token", "max_tokens", "mean_tokens"):
        if config.get(f"pooling_mode_{mode}"):
            return mode
    return "mean_tokens"


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls_token":
        return hidden[:, 0]
    weights = mask[..., None].astype(hidden.dtype)
    if mode == "max_tokens":
        return np.where(weights > 0, hidden, -np.inf).max(axis=1)
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def leading_matches(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _max_seq_length(bundle: Path) -> int:
    path = bundle / "sentence_bert_config.json"
    return json.loads(path.read_text()).get("max_seq_length", 512) if path.is_file() else 512


# ---- verdict: is the loss what the precision normally costs? ----------------------------------

# The least each precision normally keeps, per figure. Set from the suite's fixtures with a
# margin (tests/integration/test_convert.py): the tiny llama and qwen2 decoders (random
# weights, so nearly flat logits: harder than a trained model) measured int8 top-1
# 0.958-1.0 / cosine 0.99994, int4 0.60-0.75 / 0.9885-0.991 (optimum's graph the lower),
# fp16 1.0 / 1.0; all-MiniLM-L6-v2 measured embedding cosine int8 0.9994, int4 0.958, fp16
# 0.999999. greedy_match is not judged: one differing token sends the rest another way.
EXPECTED: dict[str, dict[str, float]] = {
    "fp32": {"top1_agreement": 0.99, "logits_cosine": 0.999, "embedding_cosine_min": 0.999},
    "fp16": {"top1_agreement": 0.95, "logits_cosine": 0.999, "embedding_cosine_min": 0.999},
    "int8": {"top1_agreement": 0.9, "logits_cosine": 0.999, "embedding_cosine_min": 0.995},
    "int4": {"top1_agreement": 0.45, "logits_cosine": 0.97, "embedding_cosine_min": 0.9},
}


def shortfalls(figures: dict[str, Any], precision: str) -> list[str]:
    """The figures below what `precision` normally keeps ("top1_agreement 0.3 < 0.45")."""
    floors = EXPECTED.get(precision, {})
    return [f"{name} {figures[name]} < {floor}" for name, floor in floors.items()
            if isinstance(figures.get(name), (int, float)) and figures[name] < floor]  # fmt: skip


def verdict(figures: dict[str, Any], precision: str) -> tuple[bool, str]:
    """(within the norm, one line saying so) for `ortserve convert` to print."""
    short = shortfalls(figures, precision)
    if not short:
        return True, f"within what {precision} normally loses"
    return False, (f"WARNING: {', '.join(short)}: more than {precision} normally loses; "
                   "check its answers before relying on it (or convert at a higher precision)")  # fmt: skip
