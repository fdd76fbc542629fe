"""Prompts -> tokens: the model's chat template, its Modelfile SYSTEM and MESSAGEs, tools,
and its thinking section."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ortserve.engine.prompts import build_chat_prompt, build_generate_prompt, template_of
from ortserve.engine.sandbox import TemplateLimits
from ortserve.engine.types import GenerationOptions
from ortserve.errors import InvalidRequest
from ortserve.serving import requests
from ortserve.serving.requests import ChatPrompt, GenerationRequest, Prompt, TextPrompt
from ortserve.serving.thinking import ThinkingSplitter, prompt_opens_thinking, thinking_tags


@dataclass(frozen=True)
class Thinking:
    """How a rendered prompt's answer separates thinking from content."""

    open_tag: str
    close_tag: str
    opened: bool  # the prompt itself opened the thinking section (DeepSeek-R1 style)
    hidden: bool = False  # think: false on a model that always thinks: leave it out

    def splitter(self) -> ThinkingSplitter:
        return ThinkingSplitter(self.open_tag, self.close_tag, opened=self.opened)


@dataclass(frozen=True)
class Rendered:
    """A prompt ready for the engine."""

    tokens: list[int]
    text: str
    thinking: Thinking | None  # None: the answer is all content
    images: tuple[bytes, ...] = ()  # in prompt order, one per image placeholder in `text`


def render(loaded, prompt: Prompt, request: GenerationRequest,
           options: GenerationOptions) -> Rendered:  # fmt: skip
    """The prompt's text in the model's template, and its tokens."""
    template = template_of(loaded)
    encoder = _Encoder(loaded)
    pictures = _Pictures(loaded, request)
    if isinstance(prompt, TextPrompt) and (prompt.raw or template is None):
        text = _plain_text(pictures.raw_prompt(prompt), loaded, encoder, options)
        if request.think:
            raise _cannot_think(loaded, request, "raw prompts have no template")
        return Rendered(encoder.encode(text), text, None, pictures.kept(text, prompt.param))
    think, split = _thinking_mode(template, loaded, request)
    hidden = request.think is False
    messages, truncate = _messages(loaded, prompt)
    messages = pictures.placed(messages)
    tools = request.tools.tools if request.tools else None
    try:
        text, _ = build_chat_prompt(template, messages, system=_system(loaded, prompt),
                                    tools=tools, count_tokens=encoder.count,
                                    num_ctx=options.num_ctx, truncate=truncate, think=think,
                                    limits=template_limits(loaded, messages, tools))  # fmt: skip
    except InvalidRequest as exc:
        if isinstance(prompt, TextPrompt) and exc.code == "context_length_exceeded":
            raise InvalidRequest(exc.message, param=prompt.param, code=exc.code) from None
        raise
    thinking = _thinking(template.source, text, hidden) if split else None
    where = prompt.param if isinstance(prompt, TextPrompt) else "messages"
    return Rendered(encoder.encode(text), text, thinking, pictures.kept(text, where))


class _Pictures:
    """A prompt's images as the model's image placeholder in the text, once per image before
    its message's text, and the images in the same order (Rendered.images)."""

    def __init__(self, loaded, request: GenerationRequest):
        self.placeholder: str | None = getattr(loaded, "image_placeholder", None)
        self.images: list[bytes] = []
        self._loaded, self._request = loaded, request

    def placed(self, messages: list[dict]) -> list[dict]:
        """Template messages: each one's images as placeholders before its content."""
        out = []
        for message in messages:
            pictures = message.get("images") or ()
            if pictures:
                text = self._marks(len(pictures)) + (message.get("content") or "")
                message = {k: v for k, v in message.items() if k != "images"}
                message["content"] = text
                self.images += pictures
            out.append(message)
        return out

    def raw_prompt(self, prompt: TextPrompt) -> TextPrompt:
        """A raw prompt with images: placeholders first, unless it already places each one."""
        if not prompt.images:
            return prompt
        marks = self._marks(len(prompt.images))
        self.images += prompt.images
        if prompt.text.count(self.placeholder or "") == len(prompt.images):
            return prompt
        return replace(prompt, text=marks + prompt.text)

    def kept(self, text: str, where: str) -> tuple[bytes, ...]:
        """The images whose placeholders the rendered text holds: a truncated history lost
        its oldest turns, and their images with them."""
        if self.placeholder is None:
            return ()
        shown = text.count(self.placeholder)
        if shown > len(self.images):
            raise InvalidRequest(f"{where}: the text holds the image placeholder "
                                 f"{self.placeholder!r}; send pictures as images",
                                 param=where)  # fmt: skip
        return tuple(self.images[len(self.images) - shown :]) if shown else ()

    def _marks(self, count: int) -> str:
        if self.placeholder is None:  # a vision model whose backend takes no images
            param = self._request.field("images")
            raise InvalidRequest(f'{param}: "{self._loaded.info.name}" cannot take images here',
                                 param=param)  # fmt: skip
        return self.placeholder * count


def template_limits(loaded, messages: list, tools: list | None) -> TemplateLimits:
    """What one render of this request's prompt may take (the limits in serving/requests)."""
    items = len(messages) + len(tools or ())
    most = getattr(loaded, "max_prompt_chars", 0)  # what the context can hold, in characters
    return TemplateLimits(
        chars=max(requests.TEMPLATE_MIN_CHARS, 2 * most),
        iterations=requests.TEMPLATE_ITERATIONS + requests.TEMPLATE_ITERATIONS_PER_ITEM * items,
        seconds=requests.TEMPLATE_SECONDS,
    )


def _plain_text(prompt: TextPrompt, loaded, encoder: _Encoder, options) -> str:
    """A raw prompt (or one for a model without a template), checked to fit the context."""
    system = None if prompt.raw else _system(loaded, prompt)
    text, _ = build_generate_prompt(None, prompt.text, system=system, raw=prompt.raw,
                                    count_tokens=encoder.count, num_ctx=options.num_ctx)  # fmt: skip
    return text


def _messages(loaded, prompt: Prompt) -> tuple[list[dict], bool]:
    """Modelfile MESSAGEs, then the conversation (or the one prompt as a user message)."""
    examples = list(loaded.info.manifest.get("messages") or [])
    if isinstance(prompt, ChatPrompt):
        return [*examples, *prompt.messages], prompt.truncate
    # One prompt is never cut: what was asked would change.
    asked = {"role": "user", "content": prompt.text}
    return [*examples, {**asked, "images": list(prompt.images)} if prompt.images else asked], False


def _system(loaded, prompt: Prompt) -> str | None:
    own = prompt.system if isinstance(prompt, TextPrompt) else None
    return own or loaded.info.manifest.get("system")


def _thinking_mode(template, loaded, request: GenerationRequest) -> tuple[bool | None, bool]:
    """(enable_thinking for the template, whether to split the answer)."""
    thinks = bool(getattr(template, "thinking", False))
    if not thinks:
        if request.think:
            raise _cannot_think(loaded, request, "its chat template has no thinking section")
        return None, False
    can_disable = bool(getattr(template, "can_disable_thinking", False))
    guided = request.schema is not None or (
        request.tools is not None and request.tools.choice != "none"
    )
    if guided:  # the grammar writes the answer: no thinking section to separate
        return (False if can_disable else None), False
    if request.think is False:
        return (False, False) if can_disable else (None, True)
    return request.think, True


def _thinking(source: str, text: str, hidden: bool) -> Thinking:
    open_tag, close_tag = thinking_tags(source)
    opened = prompt_opens_thinking(text, open_tag, close_tag)
    return Thinking(open_tag, close_tag, opened, hidden)


def _cannot_think(loaded, request: GenerationRequest, why: str) -> InvalidRequest:
    return InvalidRequest(f'"{loaded.info.name}" does not support thinking: {why}',
                          param=request.field("think"))  # fmt: skip


class _Encoder:
    """Counts tokens for the prompt builder and keeps the last result: one encode per prompt."""

    def __init__(self, loaded):
        self._loaded = loaded
        self._text: str | None = None
        self._ids: list[int] = []

    def count(self, text: str) -> int:
        if self._loaded.exceeds_context(text):  # too long to fit: say so without tokenizing
            return self._loaded.min_tokens(text)
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        if text != self._text:
            self._text, self._ids = text, self._loaded.encode(text)
        return self._ids
