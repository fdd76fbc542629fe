"""A fake engine with the runtime's interface, for unit tests of the HTTP plumbing.

The engine is faked (allowed for plumbing); prompts and options go through the real prompt
builder and option resolver. tests/integration/ runs real models behind real servers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ortserve.engine.backend import register_backend, unregister_backend
from ortserve.engine.prompts import ChatTemplate
from ortserve.engine.resident import Resident
from ortserve.engine.sampling import model_sampling
from ortserve.engine.types import Finished, TextChunk, Usage
from ortserve.errors import ServerBusy
from ortserve.library import ModelInfo

# What a fake vision model puts in its prompt per image (a real one: Qwen2.5-VL's
# "<|vision_start|><|image_pad|><|vision_end|>"), and the tokens it reports per image, as a
# real engine reports the prompt with each image's tokens expanded.
IMAGE_PLACEHOLDER = "<img>"
IMAGE_TOKENS = 100

TEMPLATE = ChatTemplate(
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class FakeTurn:
    """TextChunks of `pieces`, then Finished; or `error` raised after `error_after` chunks."""

    def __init__(self, pieces, reason="stop", error=None, error_after=0):
        self.pieces = pieces
        self.reason = reason
        self.error = error
        self.error_after = error_after
        self.prompt_tokens = 0
        self.cancelled = 0

    def __iter__(self):
        for i, piece in enumerate(self.pieces):
            if self.error is not None and i == self.error_after:
                raise self.error
            yield TextChunk(piece)
        if self.error is not None:
            raise self.error
        usage = Usage(prompt_tokens=self.prompt_tokens, generated_tokens=len(self.pieces))
        yield Finished(self.reason, usage, prompt_eval_duration_ns=1500, eval_duration_ns=2500)

    def cancel(self):
        self.cancelled += 1


class FakeLoaded:
    def __init__(self, runtime, info):
        self.runtime = runtime
        self.info = info
        self.name = info.name
        self.capabilities = info.capabilities
        self.context_length = 64
        self.template = TEMPLATE
        self.load_duration_ns = 777
        self.provider = "webgpu"
        self.parameters = model_sampling(info.manifest.get("parameters"))  # as Resident does
        if "vision" in info.capabilities:
            self.image_placeholder = IMAGE_PLACEHOLDER

    def exceeds_context(self, text):
        return len(text) > self.context_length * 8

    def min_tokens(self, text):
        return len(text) // 8 + 1

    def encode(self, text):
        return [ord(c) for c in text]  # one token per character

    def prompt_length(self, tokens, images=()):
        return len(tokens) + IMAGE_TOKENS * len(images or ())  # as generate's usage counts

    def generate(self, tokens, options, *, images=None):
        self.runtime.generated.append((tokens, options))
        self.runtime.images.append(images)  # None: the argument was not given
        if self.runtime.script:
            self.runtime.next_turn = FakeTurn(*self.runtime.script.pop(0))
        if self.runtime.busy:
            raise ServerBusy()
        turn = self.runtime.next_turn
        turn.prompt_tokens = len(tokens) + IMAGE_TOKENS * len(images or ())
        self.runtime.turns.append(turn)
        return turn


class FakeRuntime:
    def __init__(self, library):
        self.library = library
        self.next_turn = FakeTurn(["Hel", "lo", " world"])
        self.script: list[tuple] = []  # FakeTurn arguments, one per generate call
        self.busy = False
        self.acquired, self.released, self.unloaded, self.generated, self.turns = [], [], [], [], []
        self.images: list = []  # the images argument of each generate call (None: not given)
        self.shutdowns = []
        self.resident: set[str] = set()  # names loaded() reports as loaded

    def acquire(self, name, keep_alive=None):
        info = name if isinstance(name, ModelInfo) else self.library.get(name)
        self.acquired.append((info.name, keep_alive))
        return FakeLoaded(self, info)

    def release(self, loaded, keep_alive=None, failed=False):
        self.released.append((loaded.name, keep_alive))

    def unload(self, name):
        info = name if isinstance(name, ModelInfo) else self.library.get(name)
        self.unloaded.append(info.name)
        return True

    def loaded_models(self):
        loaded = FakeLoaded(self, self.library.get("tiny"))
        loaded.active, loaded.expires_at, loaded.provider = 0, 1.5e9, "cpu"
        loaded.pending = lambda: 2
        return [loaded]

    def loaded(self, name):
        info = self.library.get(name)
        return FakeLoaded(self, info) if info.name in self.resident else None

    def shutdown(self, grace=0.0):
        self.shutdowns.append(grace)


def add_model(library, name, **manifest):
    """A library entry with a one-file bundle and a realistic manifest."""
    staged = library.tmp_dir / f"stage-{len(library.list())}"
    staged.mkdir(parents=True)
    (staged / "model.onnx").write_bytes(b"graph" * 10)
    base = {
        "details": {
            "format": "onnx-genai",
            "family": "qwen2",
            "context_length": 64,
            "embedding_length": 32,
            "parameter_count": 1234,
            "parameter_size": "1.23K",
            "quantization": "int4",
        },
        "capabilities": ["completion"],
        "template": TEMPLATE.source,
        "parameters": {"temperature": 0.5, "stop": ["<end>", "<eot>"]},
        "system": None,
        "license": "MIT License\nCopyright",
        "messages": [],
    }
    return library.add(name, staged, {**base, **manifest})


class ToolLoaded(FakeLoaded):
    """FakeLoaded that takes the tool path's skip_special_tokens argument."""

    def generate(self, tokens, options, skip_special_tokens=True, **images):
        return super().generate(tokens, options, **images)


class ToolRuntime(FakeRuntime):
    """FakeRuntime whose models are ToolLoaded."""

    def acquire(self, name, keep_alive=None):
        info = name if isinstance(name, ModelInfo) else self.library.get(name)
        self.acquired.append((info.name, keep_alive))
        return ToolLoaded(self, info)


class ManyTurnsRuntime(ToolRuntime):
    """A fresh turn per generate call: the next scripted one, else "Hello world"; a context of
    `context_length` tokens (room for whole conversations)."""

    context_length = 4096

    def acquire(self, name, keep_alive=None):
        loaded = super().acquire(name, keep_alive)
        loaded.context_length = self.context_length
        generate = loaded.generate

        def fresh(tokens, options, skip_special_tokens=True, **images):
            if not self.script:  # FakeLoaded.generate takes the next scripted turn
                self.next_turn = FakeTurn(["Hel", "lo", " world"])
            return generate(tokens, options, skip_special_tokens, **images)

        loaded.generate = fresh
        return loaded


def prompt_text(runtime, n: int = -1) -> str:
    """The n-th prompt a fake runtime was asked to continue, as text (a token a character)."""
    return "".join(chr(t) for t in runtime.generated[n][0])


# Renders everything the conversion produces, so a prompt shows what reached the template.
RENDER_ALL_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.thinking %}(think:{{ m.thinking }}){% endif %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.id }}:{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}]{% endfor %}"
    "{% if m.name %}({{ m.name }}#{{ m.tool_call_id }}){% endif %}{% endfor %}"
    "{% if tools %}{tools:{% for t in tools %}{{ t.function.name }};{% endfor %}}{% endif %}"
    "{% if add_generation_prompt %}<assistant>"
    "{% if enable_thinking is false %}<think></think>{% endif %}{% endif %}"
)


class RoomyToolRuntime(ToolRuntime):
    """ToolRuntime with a 1024-token context: room for longer templates (Qwen3's) and tools."""

    def acquire(self, name, keep_alive=None):
        loaded = super().acquire(name, keep_alive)
        loaded.context_length = 1024
        return loaded


# ---- a fake engine backend, registered for bundles of format FAKE_FORMAT -------------------

FAKE_FORMAT = "fake"


@dataclass(eq=False, kw_only=True)
class FakeModel(Resident):
    """A loaded model of the fake backend: one token per character, canned pieces out."""

    pieces: list[str] = field(default_factory=lambda: ["Hel", "lo", " world"])
    template: ChatTemplate = TEMPLATE
    context_length: int = 64
    stopped: bool = False
    turns: list[tuple[list[int], object]] = field(default_factory=list)
    images: list = field(default_factory=list)  # each generate call's images (None: not given)

    def __post_init__(self):
        super().__post_init__()
        if "vision" in self.capabilities:
            self.image_placeholder = IMAGE_PLACEHOLDER

    def exceeds_context(self, text):
        return len(text) > self.context_length

    def min_tokens(self, text):
        return len(text)

    def encode(self, text):
        return [ord(c) for c in text]

    def generate(self, tokens, options, *, skip_special_tokens=True, images=None):
        self.turns.append((tokens, options))
        self.images.append(images)
        turn = FakeTurn(list(self.pieces))
        turn.prompt_tokens = len(tokens) + IMAGE_TOKENS * len(images or ())
        return turn

    def embed(self, texts, truncate=True, dimensions=None):
        """One row per text: [its length, 1.0, ...] cut to `dimensions`; a token a character."""
        if "embedding" not in self.capabilities:
            return super().embed(texts)
        rows = np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], dtype=np.float32)
        vectors = rows if dimensions is None else rows[:, :dimensions]
        return SimpleNamespace(vectors=vectors, prompt_tokens=sum(len(t) for t in texts))

    def pending(self):
        return 0

    def stop(self):
        self.stopped = True


class FakeBackend:
    """engine/backend.Backend for FAKE_FORMAT bundles: FakeModels, no onnxruntime at all."""

    def __init__(self):
        self.loaded: list[FakeModel] = []

    def load(self, info, settings, library):
        model = FakeModel(info=info, provider="fake", load_duration_ns=1)
        self.loaded.append(model)
        return model

    def planned_provider(self, info, requested):
        return "fake"


@contextlib.contextmanager
def fake_backend() -> Iterator[FakeBackend]:
    """A FakeBackend registered for FAKE_FORMAT while the block runs."""
    backend = FakeBackend()
    register_backend(FAKE_FORMAT, lambda: backend)
    try:
        yield backend
    finally:
        unregister_backend(FAKE_FORMAT)


def add_fake_model(library, name, **manifest):
    """A library entry whose bundle the fake backend loads."""
    details = {"format": FAKE_FORMAT, "family": "fake", "context_length": 64}
    return add_model(library, name, **{"details": details, **manifest})
