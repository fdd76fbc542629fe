"""Tiny random-weight checkpoints of real architectures, built offline.

Test fixtures and the demo chat model: a byte-level BPE tokenizer trained on a small local
corpus, a ChatML chat template that renders tools (Qwen 2.5's layout), and a model of the
requested architecture with random weights saved as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
VOCAB_SIZE = 512
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2")

CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Per-architecture extras on top of the shared small shape.
_EXTRA: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 256},
}


def build_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a byte-level BPE tokenizer on the bundled corpus and save it HF-style.

    A larger `vocab_size` than the corpus supports is filled with plain word tokens, so
    that every id a random model of that vocabulary generates decodes to some text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(out))
    if vocab_size > len(wrapped):
        _fill_vocabulary(out / "tokenizer.json", vocab_size)


def _fill_vocabulary(path: Path, vocab_size: int) -> None:
    """Add tokens 'Ġwa', 'Ġwb', ... (a space and letters) up to `vocab_size` ids."""
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    n = 0
    while next_id < vocab_size:
        word, k = "", n
        while True:
            word = chr(ord("a") + k % 26) + word
            k = k // 26 - 1
            if k < 0:
                break
        n += 1
        if f"\u0120w{word}" not in vocab:
            vocab[f"\u0120w{word}"] = next_id
            next_id += 1
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_checkpoint(architecture: str, out: Path, *, seed: int = 0, **shape: Any) -> Path:
    """A random-weight checkpoint of `architecture` with the tiny tokenizer, in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(architecture, **{**tiny_shape(architecture), **shape})
    build_tokenizer(out, vocab_size=config.vocab_size)
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, 0, 0
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=0, bos_token_id=0)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "LICENSE").write_text("MIT License (random weights, for tests and demos)\n")
    return out


def tiny_shape(architecture: str) -> dict[str, Any]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"no tiny shape for {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    shape = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
    return {**shape, **_EXTRA.get(architecture, {})}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
