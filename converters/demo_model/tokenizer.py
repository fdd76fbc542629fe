"""The demo model's tokenizer and chat template, and the renderer training shares with serving.

The tokenizer is a byte-level BPE trained on the generated conversations, split as Qwen2's is
(numbers digit by digit, so that arithmetic on new numbers is column arithmetic over digits
the model has seen). The template is ChatML with Qwen's tool section (Hermes <tool_call>
blocks) and Qwen3's thinking switch: `enable_thinking` false puts an empty <think></think>
in the prompt, anything else lets the model open its own.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Control tokens (never in the text a client sees) and markup tokens (kept in decoded text,
# as Qwen keeps them, so that the server's tool-call and thinking parsers see them).
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
          "</tool_response>"]  # fmt: skip
VOCAB_SIZE = 3072
# Llama 3's pre-tokenizer split, with numbers digit by digit (as Qwen2 and Llama 2 split
# them): contractions, words, single digits, punctuation runs, spaces. Column arithmetic on
# new numbers is then arithmetic over the ten digits the model has seen, and copying a
# number it never saw (into a tool call, into an answer) is copying digits it knows.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOOLS_INTRO = "# Tools\\n\\nYou may call these functions:\\n<tools>"
TOOLS_OUTRO = (
    "\\n</tools>\\n\\nTo call a function, write <tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
)
# One line of JSON per tool, Hermes-style, with what choosing a tool and filling its arguments
# needs: name, description and each parameter's type. The whole OpenAI schema would triple a
# tool's tokens, and the server's grammar enforces the rest (enums, required, nesting).
TOOL_LINE = (
    "{%- set f = tool.function if tool.function is defined else tool %}"
    "{{- '\\n{\"name\": ' + f.name | tojson + ', \"description\": ' + (f.description or '') | tojson"
    " + ', \"parameters\": {' }}"
    "{%- for key, value in ((f.parameters or {}).properties or {}).items() %}"
    "{{- (', ' if not loop.first else '') + key | tojson + ': ' + (value.type or 'any') | tojson }}"
    "{%- endfor %}"
    "{{- '}}' }}"
)
# Earlier assistant turns are written exactly as the model wrote them with thinking off: an
# empty thinking section (their thinking is dropped, as Qwen3 drops it), then the text or the
# calls in compact JSON, as the server's grammar has the model write them. So a conversation's
# history tokenizes as its turns were generated, and every turn can be trained at once.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    '{{- "' + TOOLS_INTRO + '" }}'
    "{%- for tool in tools %}" + TOOL_LINE + "{%- endfor %}"
    '{{- "' + TOOLS_OUTRO + '<|im_end|>\\n" }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if call.function %}{%- set call = call.function %}{%- endif %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name":"\' + call.name + \'","arguments":\' }}'
    "{%- if call.arguments is string %}{{- call.arguments }}"
    "{%- else %}{{- call.arguments | tojson(separators=(',', ':')) }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
END = "<|im_end|>"


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:  # fmt: skip
    # transformers' tojson: json.dumps, no HTML escaping (jinja2's own would change prompts)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


@functools.cache
def _template():
    """The template compiled once, in transformers' jinja environment (as the server does)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])  # fmt: skip
    env.filters["tojson"] = _tojson
    return env.from_string(CHAT_TEMPLATE)


def render_prompt(messages: list[dict], tools: list[dict] | None, think: bool,
                  add_generation_prompt: bool = True) -> str:  # fmt: skip
    """The prompt the server renders for this request."""
    return _template().render(messages=messages, tools=tools, enable_thinking=think,
                              add_generation_prompt=add_generation_prompt)  # fmt: skip


def glossary(names: Iterable[str], repeats: int = 400) -> list[str]:
    """Texts that make the BPE merge each word of `names` into one token, in the forms the
    pre-tokenizer cuts it: after a space, after a quote (JSON), alone, and lowercased."""
    words = sorted({w for name in names for w in name.split() if w.isalpha()})
    forms = [f" {w}" for w in words] + [f'"{w}' for w in words] + [f" {w.lower()}" for w in words]
    return ["".join(forms)] * repeats + ["\n".join(words)] * repeats


def train_tokenizer(texts: Iterable[str]):
    """A byte-level BPE (tokenizers.Tokenizer) trained on `texts`, with the chat tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(MARKUP), special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
    return tokenizer


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special tokens."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END,
                                      pad_token="<|endoftext|>")  # fmt: skip
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(out))
