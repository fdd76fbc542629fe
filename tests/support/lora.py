"""LoRA helpers: PEFT adapters written in PEFT's own layout, the merged transformers
reference, og runs with adapters active, and bundles with external weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ortserve.library import Library
from ortserve.library.store import INDEX_FILE

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
PROMPT = [5, 17, 42, 99, 7, 3, 250, 31]


def write_peft_adapter(checkpoint: Path, out: Path, *, seed: int = 1, rank: int = 4,
                       alpha: float = 8.0, targets=TARGETS, bf16: bool = False) -> Path:  # fmt: skip
    """A PEFT LoRA adapter for `checkpoint` in PEFT's own file layout, non-zero B."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    shapes = _projection_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for projection in targets:
            block, (n_in, n_out) = shapes[projection]
            key = f"base_model.model.model.layers.{layer}.{block}.{projection}"
            a = torch.randn(rank, n_in, generator=generator) * 0.3
            b = torch.randn(n_out, rank, generator=generator) * 0.3
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16) if bf16 else a
            tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16) if bf16 else b
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(checkpoint),
    }))  # fmt: skip
    (out / "README.md").write_text("a PEFT output directory has other files too\n")
    return out


def _projection_shapes(config: dict) -> dict:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    return {
        "q_proj": ("self_attn", (hidden, q)), "k_proj": ("self_attn", (hidden, kv)),
        "v_proj": ("self_attn", (hidden, kv)), "o_proj": ("self_attn", (q, hidden)),
        "gate_proj": ("mlp", (hidden, inter)), "up_proj": ("mlp", (hidden, inter)),
        "down_proj": ("mlp", (inter, hidden)),
    }  # fmt: skip


def merged_reference(checkpoint: Path, peft_dir: Path | None):
    """transformers with the LoRA merged into its weights (None: the base model), in eval."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if peft_dir is None:
        return model
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = modules[key.removeprefix("base_model.model.").split(".lora_A.")[0]]
            module.weight += scale * (b.float() @ a.float())
    return model


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    from converters.verify import greedy_transformers

    return greedy_transformers(model, ids, new_tokens)


def genai_run(bundle: Path, ids: list[int], new_tokens: int, *adapter_files: Path):
    """(prefill logits of `ids`, greedy tokens) from og.Generator, with the adapters active."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    adapters = og.Adapters(model)
    for n, path in enumerate(adapter_files):
        adapters.load(str(path), f"a{n}")
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    for n in range(len(adapter_files)):
        generator.set_active_adapter(adapters, f"a{n}")
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"))[0].astype(np.float32)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return logits, tokens


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    from converters.verify import cosine_rows

    return float(cosine_rows(a, b).min())


def with_external_data(library: Library, name: str, source) -> object:
    """`source` re-saved with its weights in model.onnx.data, as every real-size model has
    (optimum keeps a tiny model's weights inside model.onnx)."""
    import onnx

    with library.staging("external") as staged:
        bundle = staged / "bundle"
        shutil.copytree(source.path, bundle)
        (bundle / INDEX_FILE).unlink()
        model = onnx.load(str(bundle / "model.onnx"))
        onnx.save_model(model, str(bundle / "model.onnx"), save_as_external_data=True,
                        location="model.onnx.data", size_threshold=0)  # fmt: skip
        return library.add(name, bundle, source.manifest)
