"""The engine's one interface: a backend loads a bundle into a loaded model.

A backend is chosen by the bundle's format (its manifest's details.format, else read from the
bundle) through one registry. onnxruntime-genai is the first backend (engine/og_backend.py,
format "onnx-genai"); onnxruntime runs embedding bundles (engine/embeddings.py,
"onnx-embedding"). The Runtime (engine/runtime.py) only goes through this interface, so a new
backend is a module and one register_backend() call, and tests register a fake one
(tests/support/fakes.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ortserve.errors import ModelLoadError
from ortserve.library.bundle import bundle_format

if TYPE_CHECKING:
    from ortserve.config import Settings
    from ortserve.engine.types import Finished, GenerationOptions, TextChunk
    from ortserve.library import Library, ModelInfo


class TurnStream(Protocol):
    """One turn's events: TextChunks, then one Finished; cancel() ends it early."""

    def __iter__(self) -> Iterator[TextChunk | Finished]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class LoadedModel(Protocol):
    """A model in memory, as the Runtime and the serving core use it.

    The bookkeeping fields (info, provider, active, expires_at, ...) come from
    engine/resident.Resident, which every backend's loaded model extends. A generation model
    answers generate/encode, an embedding model embed; `capabilities` says which.
    """

    info: ModelInfo
    provider: str  # the execution provider it runs on: cpu, cuda, dml, ...
    load_duration_ns: int
    active: int
    expires_at: float | None
    # a vision model's text for one picture in a prompt (Qwen2.5-VL's
    # "<|vision_start|><|image_pad|><|vision_end|>"); None when it reads no images
    image_placeholder: str | None

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> list[str]: ...

    @property
    def context_length(self) -> int: ...

    def generate(
        self,
        tokens: list[int],
        options: GenerationOptions,
        *,
        skip_special_tokens: bool = True,
        images: Sequence[bytes] = (),
    ) -> TurnStream:
        """A turn from the rendered prompt's ids. `images`: encoded pictures (PNG, JPEG, ...),
        one per image_placeholder in the prompt, in order; a model without vision refuses
        them (400 naming images). Finished.usage.prompt_tokens counts their image tokens."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def prompt_length(self, tokens: list[int], images: Sequence[bytes] = ()) -> int:
        """The tokens a rendered prompt takes, its pictures' image tokens included."""
        ...

    # generation models also carry `template` (prompts.ChatTemplate or None) and the cheap
    # bounds serving checks before tokenizing: exceeds_context(text), min_tokens(text)
    def exceeds_context(self, text: str) -> bool: ...

    def min_tokens(self, text: str) -> int: ...

    def embed(self, texts: list[str], **kwargs: Any) -> Any: ...

    def memory(self) -> int: ...

    def pending(self) -> int: ...

    def running(self) -> int: ...

    def stop(self) -> None: ...


class Backend(Protocol):
    """Loads bundles of one format."""

    def load(self, info: ModelInfo, settings: Settings, library: Library) -> LoadedModel:
        """The model in memory on the best usable provider; ModelLoadError otherwise.

        `library` resolves the files a manifest names besides the bundle (LoRA adapters).
        """
        ...

    def planned_provider(self, info: ModelInfo, requested: str) -> str | None:
        """The provider `info` would load on first (None: `requested` cannot run here)."""
        ...


BackendFactory = Callable[[], Backend]

_FACTORIES: dict[str, BackendFactory] = {}
_BACKENDS: dict[str, Backend] = {}
_LOCK = threading.Lock()


def register_backend(format: str, factory: BackendFactory) -> None:
    """Make `factory` build the backend of bundles of `format` (replacing any before)."""
    with _LOCK:
        _FACTORIES[format] = factory
        _BACKENDS.pop(format, None)


def unregister_backend(format: str) -> None:
    """Forget the backend of `format` (tests that registered one)."""
    with _LOCK:
        _FACTORIES.pop(format, None)
        _BACKENDS.pop(format, None)


def model_format(info: ModelInfo) -> str:
    """The format that picks the backend: the manifest's, else read from the bundle."""
    details = info.manifest.get("details") or {}
    return details.get("format") or bundle_format(info.path)


def backend_for(info: ModelInfo) -> Backend:
    """The backend of `info`'s format, built on first use (one per format per process)."""
    format = model_format(info)
    with _LOCK:
        backend = _BACKENDS.get(format)
        if backend is None:
            factory = _FACTORIES.get(format)
            if factory is None:
                known = ", ".join(sorted(_FACTORIES))
                raise ModelLoadError(
                    f'model "{info.name}" has format {format!r}, which no engine backend '
                    f"loads (known: {known})"
                )
            backend = _BACKENDS[format] = factory()
    return backend


def _og_backend() -> Backend:
    from ortserve.engine.og_backend import OgBackend  # imports onnxruntime_genai when loading

    return OgBackend()


def _embedding_backend() -> Backend:
    from ortserve.engine.embeddings import EmbeddingBackend

    return EmbeddingBackend()


register_backend("onnx-genai", _og_backend)
register_backend("onnx-embedding", _embedding_backend)


def _speech_backend() -> Backend:
    from ortserve.engine.speech import SpeechBackend  # imports onnxruntime_genai when loading

    return SpeechBackend()


register_backend("onnx-genai-speech", _speech_backend)
