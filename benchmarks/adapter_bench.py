"""Adapter benchmark: what a LoRA adapter costs in serving, base vs adapted, over HTTP.

Subject: serve_bench's int4 Qwen2-0.5B-shaped random bundle (base), and the same with a
random rank-16 PEFT LoRA adapter on q/k/v/o attached (adapted; built once, kept under
--keep). A model with adapters is served by og.Generator lanes (one turn per lane,
unbatched) instead of og.Engine lanes, because og 0.18's Engine cannot activate adapters.
In one run, both through `ortserve serve`'s streaming /api/generate, phases interleaved:
  time to first token and decode tokens/s with 1 client (median of 3);
  aggregate tokens/s with 4 and 8 concurrent clients;
and the ratios adapted/base, plus the adapted bundle's extra disk (files whose inode is not
one of the base bundle's: the weights must be hard links). A benchmark, not a test.

    python benchmarks/adapter_bench.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import QWEN2_05B  # noqa: E402
from serve_bench import concurrent_streams, http_stream, start_server, subject_bundle  # noqa: E402

BASE, ADAPTED = "bench:int4", "bench:int4-lora16"
NEW_TOKENS = 64
RANK, ALPHA = 16, 32.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SINGLE_RUNS = 3
CONCURRENCY = (4, 8)


def write_peft_adapter(out: Path, seed: int = 0) -> Path:
    """A random rank-16 LoRA adapter for the subject, in PEFT's save_pretrained layout."""
    import numpy as np
    from safetensors.numpy import save_file

    hidden, heads = QWEN2_05B["hidden_size"], QWEN2_05B["num_attention_heads"]
    kv = QWEN2_05B["num_key_value_heads"] * hidden // heads
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (hidden, hidden)}  # fmt: skip
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(QWEN2_05B["num_hidden_layers"]):
        for projection in TARGETS:
            n_in, n_out = shapes[projection]
            key = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            a = rng.standard_normal((RANK, n_in), dtype=np.float32) * 0.02
            b = rng.standard_normal((n_out, RANK), dtype=np.float32) * 0.02
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
    }))  # fmt: skip
    return out


def adapted_model(work: Path, root: Path) -> None:
    """Save ADAPTED (the base + the random adapter) in the library, once."""
    from ortserve.library import Library
    from ortserve.models.adapters import attach_adapters

    library = Library(root)
    if library.exists(ADAPTED):
        return
    base = library.get(BASE)
    peft = write_peft_adapter(work / f"lora-r{RANK}")
    fields = attach_adapters(library, base, [(peft.name, peft)])
    library.save(ADAPTED, {**base.manifest, **fields})


def extra_disk(root: Path) -> dict:
    """Bytes of the adapted bundle's files that are not hard links to the base's, and of
    its adapter blobs."""
    from ortserve.library import Library

    library = Library(root)
    base, adapted = library.get(BASE), library.get(ADAPTED)
    base_inodes = {p.stat().st_ino for p in base.path.rglob("*") if p.is_file()}
    files = [p for p in adapted.path.rglob("*") if p.is_file()]
    new = {p.relative_to(adapted.path).as_posix(): p.stat().st_size
           for p in files if p.stat().st_ino not in base_inodes}  # fmt: skip
    blobs = [library.blob_path(r["digest"]) for r in adapted.manifest["adapters"]]
    return {
        "adapted_bundle_bytes": sum(p.stat().st_size for p in files),
        "new_files": new,
        "new_bundle_bytes": sum(new.values()),
        "adapter_blob_bytes": sum(p.stat().st_size for p in blobs),
    }


def load(url: str, model: str) -> float:
    """Seconds for the server to load `model` (an empty /api/generate loads it)."""
    started = time.perf_counter()
    body = json.dumps({"model": model}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "/api/generate", data=body,
                                                  method="POST")).read()  # fmt: skip
    return time.perf_counter() - started


def single_client(url: str, model: str) -> dict:
    """Median time to first token and decode tokens/s of SINGLE_RUNS streams, one at a time."""
    runs = [http_stream(url, model, NEW_TOKENS) for _ in range(SINGLE_RUNS)]
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "tps": statistics.median((r["tokens"] - 1) / r["decode_s"] for r in runs),
        "tokens": [r["tokens"] for r in runs],
    }


def measure(url: str) -> dict[str, dict]:
    """Both models, each phase run for the base and then the adapted model."""
    figures: dict[str, dict] = {BASE: {}, ADAPTED: {}}
    for model in figures:
        figures[model]["load_s"] = load(url, model)
        http_stream(url, model, NEW_TOKENS)  # warm-up
    for model in figures:
        figures[model].update(single_client(url, model))
    for clients in CONCURRENCY:
        for model in figures:
            figures[model][f"tps_{clients}"] = concurrent_streams(url, clients, model, NEW_TOKENS)
    return figures


def report(figures: dict[str, dict], disk: dict, wall: float) -> dict:
    base, adapted = figures[BASE], figures[ADAPTED]
    keys = ["tps", *(f"tps_{n}" for n in CONCURRENCY)]
    labels = ["decode_tps_1_client", *(f"aggregate_tps_{n}_clients" for n in CONCURRENCY)]

    def side(f: dict) -> dict:
        out = {"load_s": round(f["load_s"], 2), "ttft_s_1_client": round(f["ttft_s"], 3)}
        out.update({label: round(f[key], 1) for label, key in zip(labels, keys)})
        return out | {"tokens_per_single_run": f["tokens"]}

    return {
        "subject": "Qwen2-0.5B-shaped random checkpoint, int4 bundle",
        "adapter": f"random PEFT LoRA, rank {RANK}, alpha {ALPHA:g}, on {'/'.join(TARGETS)}",
        "new_tokens": NEW_TOKENS,
        "base": side(base),
        "adapted": side(adapted),
        "ratio_adapted_over_base": {
            "ttft_1_client": round(adapted["ttft_s"] / base["ttft_s"], 2),
            **{label: round(adapted[key] / base[key], 2) for label, key in zip(labels, keys)},
        },
        "disk": disk,
        "measure_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    root, _ = subject_bundle(args.keep)
    adapted_model(args.keep, root)
    disk = extra_disk(root)
    started = time.perf_counter()
    process, url = start_server(root)
    try:
        figures = measure(url)
    finally:
        process.terminate()
        process.wait()
    print(json.dumps(report(figures, disk, time.perf_counter() - started), indent=2))


if __name__ == "__main__":
    main()
