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


def tokenizer_with(out: Path, special_tokens: tuple[str, ...]):
    """build_tokenizer's tokenizer in `out` with `special_tokens` added (a vision model's
    image tokens), saved there; returned as transformers' PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    build_tokenizer(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.save_pretrained(out)
    return tokenizer


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


# ---- a tiny Whisper (speech recognition: converters/speech.py) ---------------------------------

# Whisper's special tokens after <|endoftext|>, in its own order: start, one per language, the
# tasks, then <|notimestamps|>; 1501 timestamp tokens <|0.00|> ... <|30.00|> follow them.
WHISPER_TASK_TOKENS = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                       "<|nospeech|>", "<|notimestamps|>")  # fmt: skip
# Random weights drawn at Whisper's own init_std (0.02) make every output one token repeated,
# so a parity test could not tell two decoders apart: wider weights give varied tokens.
WHISPER_INIT_STD = 0.3


def build_whisper_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """A random-weight WhisperForConditionalGeneration with Whisper's real token layout (all
    its languages, tasks and timestamps) over the tiny BPE vocabulary, and its feature
    extractor (80 mel bins, 30-second windows)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _whisper_tokenizer(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(str(out))
    ids = tokenizer.convert_tokens_to_ids
    start, end = ids("<|startoftranscript|>"), ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
        max_target_positions=448, init_std=WHISPER_INIT_STD, decoder_start_token_id=start,
        bos_token_id=end, eos_token_id=end, pad_token_id=end,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    languages = [t for t in tokenizer.additional_special_tokens if _is_language(t)]
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, bos_token_id=end, eos_token_id=end, pad_token_id=end,
        max_length=448, is_multilingual=True, lang_to_id={t: ids(t) for t in languages},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "LICENSE").write_text("MIT License (random weights, for tests and demos)\n")
    return out


def _whisper_tokenizer(out: Path):
    """Whisper's tokenizer class over a byte-level BPE trained on the bundled corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizerFast
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    bpe.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    bpe.model.save(str(out))  # vocab.json, merges.txt
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizerFast(vocab_file=str(out / "vocab.json"),
                                     merges_file=str(out / "merges.txt"), unk_token=end,
                                     bos_token=end, eos_token=end, pad_token=end)  # fmt: skip
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES),
                *WHISPER_TASK_TOKENS]  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    # timestamps are ordinary added tokens in Whisper's tokenizer (decoded unless filtered)
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer.add_tokens([AddedToken(s, special=False, normalized=False) for s in stamps])
    return tokenizer


def _is_language(token: str) -> bool:
    return token not in WHISPER_TASK_TOKENS and token != "<|startoftranscript|>"
