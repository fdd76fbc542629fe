"""Messages and tools -> prompt text, with the model's Hugging Face chat template.

Templates are rendered with jinja2 the way transformers' `apply_chat_template` renders them
(og.Tokenizer.apply_chat_template renders tools differently), so a bundle's prompt is the
one its model was trained on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from ortserve.engine import sandbox
from ortserve.engine.sandbox import OUTPUT_SIZE, TemplateLimitExceeded, TemplateLimits
from ortserve.errors import InvalidRequest
from ortserve.library.bundle import chat_template, template_thinks

ROLES = ("system", "user", "assistant", "tool")
# The special-token names transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may refer to (bos_token, eos_token, ...)."""

    source: str
    special_tokens: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle_dir: Path) -> ChatTemplate | None:
        """The bundle's chat template, or None when it has none."""
        source = chat_template(bundle_dir)
        if not source:
            return None
        return cls(source, special_tokens(bundle_dir))

    @property
    def thinking(self) -> bool:
        """Whether the template has a thinking section (the 'thinking' capability)."""
        return template_thinks(self.source)

    @property
    def can_disable_thinking(self) -> bool:
        """Whether think=False reaches the template: it reads Qwen3's enable_thinking switch.

        Templates that always open <think> (DeepSeek-R1, Qwen3-*-Thinking-2507) cannot.
        """
        return "enable_thinking" in self.source

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        limits: TemplateLimits | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text; a template that fails raises InvalidRequest, never a 500.

        The render is bounded by `limits` (TemplateLimitExceeded names the one it broke).
        """
        compiled = _compile(self.source)
        # Special tokens first so that caller's keywords override them, as in transformers.
        variables = {**self.special_tokens, **extra}
        try:
            return sandbox.render(
                compiled,
                limits or TemplateLimits(),
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except TemplateLimitExceeded as e:
            e.param = "messages"
            raise
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or undefined
            raise InvalidRequest(e.message or "chat template error", param="messages") from e
        except Exception as e:  # e.g. None + str on a message the template did not expect
            raise InvalidRequest(f"chat template failed: {e}", param="messages") from e


def template_of(loaded: Any) -> ChatTemplate | None:
    """The template a loaded model's prompts use: its manifest's (a TEMPLATE) over its bundle's.

    The bundle's special tokens (bos_token, eos_token, ...) stay available to either.
    """
    bundled = loaded.template
    source = (loaded.info.manifest or {}).get("template")
    if not source or (bundled is not None and bundled.source == source):
        return bundled
    return ChatTemplate(source, bundled.special_tokens if bundled is not None else {})


def special_tokens(bundle_dir: Path) -> dict[str, Any]:
    """bos/eos/unk/... token strings from tokenizer_config.json and special_tokens_map.json."""
    config = _read_json(bundle_dir / "tokenizer_config.json")
    tokens = _token_strings(config)
    # transformers reads special_tokens_map.json only for configs without added_tokens_decoder
    # (older checkpoints), and then it wins.
    if "added_tokens_decoder" not in config:
        tokens.update(_token_strings(_read_json(bundle_dir / "special_tokens_map.json")))
    return tokens


def validate_messages(messages: Any) -> list[dict]:
    """Messages as a list of dicts with a known role and string content, or InvalidRequest."""
    if not isinstance(messages, list):
        raise InvalidRequest("invalid type for messages: expected array", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"invalid type for {where}: expected object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"invalid {where}.role: expected one of {', '.join(ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        content = message.get("content")
        # An assistant message that only calls tools has no content.
        if not isinstance(content, str) and not (role == "assistant" and content is None):
            raise InvalidRequest(
                f"invalid type for {where}.content: expected string", param=f"{where}.content"
            )
        if not isinstance(message.get("thinking"), (str, type(None))):
            raise InvalidRequest(
                f"invalid type for {where}.thinking: expected string", param=f"{where}.thinking"
            )
        if "tool_calls" in message and not isinstance(message["tool_calls"], (list, type(None))):
            raise InvalidRequest(
                f"invalid type for {where}.tool_calls: expected array",
                param=f"{where}.tool_calls",
            )
    return messages


def validate_tools(tools: Any) -> list[dict] | None:
    """Tool definitions as a list of objects (passed to the template as given)."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("invalid type for tools: expected array of objects", param="tools")
    return tools


def build_chat_prompt(
    template: ChatTemplate | None,
    messages: list[dict],
    *,
    system: str | None,
    tools: list[dict] | None,
    count_tokens: CountTokens,
    num_ctx: int,
    truncate: bool = True,
    think: bool | None = None,
    limits: TemplateLimits | None = None,
) -> tuple[str, int]:
    """The chat prompt and its token count, dropping the oldest messages to fit num_ctx.

    think: None leaves thinking to the template's default; True or False is passed to it as
    enable_thinking (True on a template without a thinking section is InvalidRequest).
    limits bound each render; a render past their output size counts as too long to fit.
    """
    if template is None:
        raise InvalidRequest("this model has no chat template; use raw generation", param="model")
    messages = [_with_reasoning(m) for m in validate_messages(messages)]
    tools = validate_tools(tools)
    switch = thinking_variables(template, think)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})

    overflow: list[TemplateLimitExceeded] = []  # the last render's, if it passed its size

    def render(kept: list[dict]) -> tuple[str, int]:
        overflow.clear()
        try:
            prompt = template.render(
                kept, tools=tools, add_generation_prompt=True, limits=limits, **switch
            )
        except TemplateLimitExceeded as exc:
            if exc.limit != OUTPUT_SIZE:
                raise
            # Too long for any context this limit was sized for: drop turns, as for tokens.
            overflow.append(exc)
            return "", num_ctx + 1
        return prompt, count_tokens(prompt)

    prompt, tokens = render(messages)
    if tokens <= num_ctx:
        return prompt, tokens
    if truncate:
        for start in _turn_starts(messages):
            kept = [m for m in messages[:start] if m["role"] == "system"] + messages[start:]
            prompt, tokens = render(kept)
            if tokens <= num_ctx:
                return prompt, tokens
    if overflow:
        raise _too_long_text(overflow[0], num_ctx)
    raise _too_long(tokens, num_ctx)


def build_generate_prompt(
    template: ChatTemplate | None,
    prompt: str,
    *,
    system: str | None,
    raw: bool,
    count_tokens: CountTokens,
    num_ctx: int,
    think: bool | None = None,
    limits: TemplateLimits | None = None,
) -> tuple[str, int]:
    """The /api/generate prompt and its token count: raw, templated, or plain text.

    think is passed to the template as in build_chat_prompt; a raw prompt is the caller's own.
    """
    if not isinstance(prompt, str):
        raise InvalidRequest("invalid type for prompt: expected string", param="prompt")
    if raw:
        text = prompt
    elif template is None:
        text = f"{system}\n\n{prompt}" if system else prompt
    else:
        switch = thinking_variables(template, think)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        try:
            text = template.render(messages, add_generation_prompt=True, limits=limits, **switch)
        except TemplateLimitExceeded as exc:
            if exc.limit != OUTPUT_SIZE:
                raise
            raise _too_long_text(exc, num_ctx, param="prompt") from None
    tokens = count_tokens(text)
    if tokens > num_ctx:
        # A single prompt has nothing to drop: cutting it would change what was asked.
        raise _too_long(tokens, num_ctx, param="prompt")
    return text, tokens


def thinking_variables(template: ChatTemplate, think: bool | None) -> dict[str, bool]:
    """The template variables for a request's think: {"enable_thinking": think}, or none.

    Asking a template without a thinking section to think is refused rather than ignored, as
    Ollama refuses it: the caller would wait for thinking that never comes.
    """
    if think is None:
        return {}
    if think and not template.thinking:
        raise InvalidRequest("this model does not support thinking", param="think")
    return {"enable_thinking": think}


def _with_reasoning(message: dict) -> dict:
    """A message whose `thinking` (Ollama's name) is also `reasoning_content` (the templates').

    Qwen3's template renders an earlier answer's reasoning_content inside <think> where the
    model was trained to see it (and drops it where it was not); an explicit
    reasoning_content stays as given.
    """
    thinking = message.get("thinking")
    if not thinking or "reasoning_content" in message:
        return message
    return {**message, "reasoning_content": thinking}


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment, bounded (sandbox.py); cached:
    compiling is slow."""
    try:
        return sandbox.compile_template(source, _configure)
    except TemplateLimitExceeded as e:
        e.param = "messages"
        raise
    except jinja2.TemplateError as e:
        raise InvalidRequest(f"invalid chat template: {e.message}", param="messages") from e
    except (RecursionError, MemoryError) as e:  # nesting too deep for the compiler
        raise InvalidRequest(f"invalid chat template: {e!r}", param="messages") from e


def _configure(env: jinja2.Environment) -> None:
    """What transformers' apply_chat_template adds to its environment."""
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _turn_starts(messages: Sequence[dict]) -> list[int]:
    """Where a truncated history may start: at a later user message, or the last message.

    Starting on an assistant or tool message would orphan tool results and break templates
    that insist on user/assistant alternation (they raise_exception on it).
    """
    history = [i for i, m in enumerate(messages) if m["role"] != "system"]
    if len(history) < 2:
        return []  # nothing but the last message to drop
    first, last = history[0], history[-1]
    return [i for i in history if first < i < last and messages[i]["role"] == "user"] + [last]


def _too_long(tokens: int, num_ctx: int, param: str = "messages") -> InvalidRequest:
    return InvalidRequest(
        f"prompt is too long: {tokens} tokens exceed the context length of {num_ctx}",
        param=param,
        code="context_length_exceeded",
    )


def _too_long_text(
    exc: TemplateLimitExceeded, num_ctx: int, param: str = "messages"
) -> InvalidRequest:
    return InvalidRequest(
        f"prompt is too long for the context length of {num_ctx} tokens: the {exc.message}",
        param=param,
        code="context_length_exceeded",
    )


def _token_strings(config: dict[str, Any]) -> dict[str, Any]:
    """Token fields as strings: a token may be saved as {"content": ...} (an AddedToken)."""
    tokens: dict[str, Any] = {}
    for name in _TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, list):
            tokens[name] = [_content(v) for v in value if _content(v) is not None]
        elif _content(value) is not None:
            tokens[name] = _content(value)
    return tokens


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
