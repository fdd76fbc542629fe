"""Thinking separated from the answer: a model's <think>...</think> section, streamed or whole.

Protocol-neutral and pure: text in, ("thinking" | "content", text) pieces out. The
protocols name the pieces (Ollama's `thinking`, OpenAI's `reasoning_content`, Responses'
reasoning items, Anthropic's thinking blocks).
"""

from __future__ import annotations

from ortserve.library.bundle import THINKING_TAGS

THINKING = "thinking"
CONTENT = "content"
Piece = tuple[str, str]

# Where the splitter is in the model's output.
_START = "start"  # nothing decided yet: an opening tag may still come
_THINK_START = "think-start"  # just inside <think>: its leading whitespace is dropped
_THINKING = "thinking"
_CONTENT_START = "content-start"  # just after </think>: its leading whitespace is dropped
_CONTENT = "content"


def thinking_tags(template_source: str) -> tuple[str, str]:
    """The (open, close) thinking tags a chat template uses; <think>, </think> by default."""
    for open_tag, close_tag in THINKING_TAGS:
        if open_tag in template_source or close_tag in template_source:
            return open_tag, close_tag
    return THINKING_TAGS[0]


def prompt_opens_thinking(
    prompt: str, open_tag: str = "<think>", close_tag: str = "</think>"
) -> bool:
    """Whether a rendered prompt ends inside an unclosed thinking section.

    DeepSeek-R1's and Qwen3-*-Thinking-2507's templates end the generation prompt with
    '<think>\\n', so the model's output starts mid-thought and has only the closing tag.
    Only the prompt's end counts: a user who writes '<think>' in a message opens nothing.
    """
    tail = prompt.rstrip()
    return tail.endswith(open_tag) and not tail.endswith(close_tag)


def split_whole(
    text: str, open_tag: str = "<think>", close_tag: str = "</think>", opened: bool = False
) -> tuple[str, str]:
    """(thinking, content) of a whole answer; thinking is '' when the model did not think."""
    splitter = ThinkingSplitter(open_tag, close_tag, opened=opened)
    parts = {THINKING: "", CONTENT: ""}
    for kind, piece in [*splitter.feed(text), *splitter.finish()]:
        parts[kind] += piece
    return parts[THINKING], parts[CONTENT]


class ThinkingSplitter:
    """Splits streamed text into thinking and content, whatever the chunk boundaries.

    The thinking section counts only at the start of the answer (after whitespace), as the
    templates place it; a tag later in the answer is the answer's own text. Inside the
    section the first closing tag ends it, and an unclosed one runs to the end. Text is
    held back only while it may still become a tag, or is whitespace a tag would drop.
    """

    def __init__(
        self, open_tag: str = "<think>", close_tag: str = "</think>", opened: bool = False
    ) -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        # Opened by the prompt: the answer starts mid-thought, though some models still
        # write the opening tag; it is dropped then.
        self._opened = opened
        self._state = _START
        self._pending = ""  # text not given out yet

    def feed(self, text: str) -> list[Piece]:
        """The pieces that `text` completes, in order; adjacent pieces of one kind merged."""
        self._pending += text
        pieces: list[Piece] = []
        while True:
            step = _STEPS[self._state](self)
            if step is None:
                return _merged(pieces)
            pieces.extend(step)

    def finish(self) -> list[Piece]:
        """What is still held back, at the end of the answer (an unclosed section's end)."""
        pending, self._pending = self._pending, ""
        state, self._state = self._state, _CONTENT
        if state == _START and self._opened:
            state = _THINKING  # only whitespace or a part of the opening tag came
        if state in (_THINK_START, _THINKING):
            return [(THINKING, pending.strip())] if pending.strip() else []
        # Left in _CONTENT_START is only whitespace that the closing tag drops.
        return [(CONTENT, pending)] if pending and state != _CONTENT_START else []

    # Each step consumes what it can of the pending text and returns its pieces, or None
    # when it needs more text to decide.

    def _start(self) -> list[Piece] | None:
        stripped = self._pending.lstrip()
        if stripped.startswith(self.open_tag):
            self._pending = stripped[len(self.open_tag) :]
            self._state = _THINK_START
            return []
        if self.open_tag.startswith(stripped):  # empty, whitespace, or a part of the tag
            return None
        self._state = _THINK_START if self._opened else _CONTENT
        return []

    def _skip_whitespace(self) -> list[Piece] | None:
        self._pending = self._pending.lstrip()
        if not self._pending:
            return None
        self._state = _THINKING if self._state == _THINK_START else _CONTENT
        return []

    def _thinking(self) -> list[Piece] | None:
        before, found, after = self._pending.partition(self.close_tag)
        if found:
            self._pending = after
            self._state = _CONTENT_START
            # Whitespace before the closing tag is layout, as after the opening one.
            return [(THINKING, before.rstrip())]
        # Keep a possible start of the closing tag, and trailing whitespace that would be
        # dropped if the closing tag came next.
        keep = _partial_tag_len(self._pending, self.close_tag)
        sure = self._pending[: len(self._pending) - keep]
        given = sure.rstrip()
        if not given:
            return None
        self._pending = self._pending[len(given) :]
        return [(THINKING, given)]

    def _content(self) -> list[Piece] | None:
        if not self._pending:
            return None
        given, self._pending = self._pending, ""
        return [(CONTENT, given)]


_STEPS = {
    _START: ThinkingSplitter._start,
    _THINK_START: ThinkingSplitter._skip_whitespace,
    _THINKING: ThinkingSplitter._thinking,
    _CONTENT_START: ThinkingSplitter._skip_whitespace,
    _CONTENT: ThinkingSplitter._content,
}


def _partial_tag_len(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _merged(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for kind, text in pieces:
        if not text:
            continue
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


class AnswerStops:
    """Stop strings applied to the answer only, after the thinking is split off.

    A stop string the model writes while thinking ("Paris" in a thought about France) must
    not end the turn before the answer starts: the engine's own stop cut sees the raw text,
    thinking included, so for a prompt with a thinking section the stops run here, on the
    content. Text that may still begin a stop string is held back until it cannot.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)  # "" would stop before any text
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The answer text safe to show now; once a stop string is found, nothing more."""
        if self.stopped:
            return ""
        self._pending += text
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if found:
            shown, self._pending, self.stopped = self._pending[: min(found)], "", True
            return shown
        keep = max((_partial_tag_len(self._pending, s) for s in self._stops), default=0)
        split = len(self._pending) - keep
        shown, self._pending = self._pending[:split], self._pending[split:]
        return shown

    def flush(self) -> str:
        """What was held back, at the end of the answer (no stop string came)."""
        held, self._pending = ("" if self.stopped else self._pending), ""
        return held
