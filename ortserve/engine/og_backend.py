"""The onnxruntime-genai backend: ORT GenAI bundles ("onnx-genai") behind engine/backend.py.

Its modules are the only ones that import onnxruntime_genai: this one, scheduler.py (one
thread per model over og.Engine lanes), continuous.py, adapters.py and providers.py
(tests/unit/test_layers.py holds the list). Prompts are tokenized with the `tokenizers`
library (thread-safe, unlike og.Tokenizer) and rendered with the bundle's chat template.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ortserve import metrics
from ortserve.config import Settings
from ortserve.engine.providers import bundle_target, load_candidates, load_on_best
from ortserve.engine.resident import Resident
from ortserve.engine.scheduler import ImageInput, Scheduler
from ortserve.engine.turns import Turn
from ortserve.engine.types import GenerationOptions
from ortserve.errors import InvalidRequest, ModelLoadError, OrtServeError
from ortserve.library import Library, ModelInfo
from ortserve.library.bundle import image_placeholder
from ortserve.library.store import derived_folder

log = logging.getLogger("ortserve.engine")


@dataclass(eq=False, kw_only=True)
class OgModel(Resident):
    """A generation model in memory: its scheduler, tokenizer and chat template."""

    scheduler: Scheduler
    tokenizer: Any  # tokenizers.Tokenizer: thread-safe, unlike og.Tokenizer
    template: Any | None  # prompts.ChatTemplate
    adapters: list = ()  # the LoRA adapter files the scheduler loaded

    @property
    def context_length(self) -> int:
        return int(self.info.details.get("context_length") or 2048)

    def pending(self) -> int:
        """Turns queued or generating."""
        return self.scheduler.pending()

    def running(self) -> int:
        return self.scheduler.running()

    def stop(self) -> None:
        """Unload: cancel running turns and stop the scheduler thread."""
        self.scheduler.stop()

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a text cannot fit the context, whatever its tokens.

        No token is longer than the vocabulary's longest entry, so a text longer than the
        context times that length needs more tokens than the context holds: it is refused
        without tokenizing it (a 30 MB prompt would take minutes and gigabytes).
        """
        longest = max((len(token) for token in self.tokenizer.get_vocab()), default=16)
        return self.context_length * max(1, longest)

    def exceeds_context(self, text: str) -> bool:
        """Cheap and certain: True only when `text` cannot fit the context."""
        return len(text) > self.max_prompt_chars

    def min_tokens(self, text: str) -> int:
        """A lower bound of `text`'s token count, without tokenizing it."""
        return len(text) * self.context_length // self.max_prompt_chars + 1

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids; the chat template already wrote any special tokens."""
        if self.exceeds_context(text):
            raise InvalidRequest(
                f"prompt is too long: {len(text)} characters cannot fit the context length of "
                f"{self.context_length} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def generate(
        self,
        tokens: list[int],
        options: GenerationOptions,
        *,
        skip_special_tokens: bool = True,
        images: Sequence[bytes] = (),
    ) -> Turn:
        """A turn from the rendered prompt's ids. `images`: encoded pictures, one per
        image_placeholder in `tokens`, in order (a vision model only)."""
        from ortserve.engine.text import TextDecoder

        if len(tokens) >= options.num_ctx:
            raise InvalidRequest(
                f"prompt is too long: {len(tokens)} tokens exceed the context length of "
                f"{options.num_ctx}",
                param="prompt",
                code="context_length_exceeded",
            )
        job = self.scheduler.submit(tokens, options, self._image_input(tokens, images))
        return Turn(
            self.scheduler, job, TextDecoder(self.tokenizer, options.stop, skip_special_tokens)
        )

    def prompt_length(self, tokens: list[int], images: Sequence[bytes] = ()) -> int:
        """The prompt's tokens with its pictures' image tokens, as Finished.usage will count
        them (og's processor runs over the pictures; nothing is generated)."""
        pictures = self._image_input(tokens, images)
        return len(tokens) if pictures is None else self.scheduler.prompt_length(tokens, pictures)

    @functools.cached_property
    def _image_start(self) -> int | None:
        """The id that opens an image placeholder: og counts these against the pictures."""
        if self.image_placeholder is None:
            return None
        return self.tokenizer.encode(self.image_placeholder, add_special_tokens=False).ids[0]

    def _image_input(self, tokens: list[int], images: Sequence[bytes]) -> ImageInput | None:
        """What og's processor needs for a turn with pictures, checked here on the request
        thread: one placeholder per picture (400 naming images otherwise), pictures Pillow
        can read. None: a turn without pictures (its ids go to og as they are)."""
        from ortserve.engine.images import as_png

        if images and self.image_placeholder is None:
            raise InvalidRequest(f'"{self.name}" cannot read images (it has no vision '
                                 f"capability)", param="images")  # fmt: skip
        placeholders = tokens.count(self._image_start) if self._image_start is not None else 0
        if placeholders != len(images):
            raise InvalidRequest(
                f"the prompt has {placeholders} image placeholders "
                f"({self.image_placeholder}) but {len(images)} images were given",
                param="images",
            )
        if not images:
            return None
        prompt = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return ImageInput(prompt, as_png(images))


class OgBackend:
    """Loads ORT GenAI bundles: a Scheduler on the best usable execution provider."""

    def load(self, info: ModelInfo, settings: Settings, library: Library) -> OgModel:
        from tokenizers import Tokenizer

        from ortserve.engine.prompts import ChatTemplate

        started = time.perf_counter()
        bundle = Path(info.path)
        try:
            candidates = load_candidates(settings.provider, bundle_target(bundle))
            tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
            template = ChatTemplate.from_bundle(bundle)
            adapters = library.adapter_files(info)
            placeholder = image_placeholder(bundle)
            draft = _draft_bundle(info, settings, library)
        except OrtServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f'failed to load model "{info.name}": {exc}') from exc
        scheduler, provider = load_on_best(
            info.name, candidates,
            lambda provider: _start(info, provider, adapters, settings, draft),
        )  # fmt: skip
        duration = int((time.perf_counter() - started) * 1e9)
        log.info("loaded %s on %s in %.2fs", info.name, provider, duration / 1e9)
        metrics.LOAD_SECONDS.labels(info.name).observe(duration / 1e9)
        return OgModel(
            info=info,
            provider=provider,
            scheduler=scheduler,
            tokenizer=tokenizer,
            template=template,
            adapters=adapters,
            load_duration_ns=duration,
            image_placeholder=placeholder,
        )

    def planned_provider(self, info: ModelInfo, requested: str) -> str | None:
        try:
            return load_candidates(requested, bundle_target(Path(info.path)))[0]
        except (OrtServeError, OSError, KeyError, ValueError):
            return None


def _int8_folder(info: ModelInfo, provider: str, settings: Settings) -> Path | None:
    """Where a CPU model's int8 weights are kept when ORTSERVE_CPU_INT8 asks for them."""
    from ortserve.engine import int8_compute

    if provider != "cpu" or not int8_compute.wanted(settings.cpu_int8):
        return None
    return derived_folder(settings.models, "int8", info.path)


def _kv_cache_folder(info: ModelInfo, provider: str, settings: Settings) -> Path | None:
    """Where a CPU model's int8 cache scales are kept when ORTSERVE_KV_CACHE_TYPE=q8."""
    if provider != "cpu" or settings.kv_cache_type != "q8":
        return None
    return derived_folder(settings.models, "kv_int8", info.path)


_WARNED: set[tuple[str, str]] = set()  # (model, draft) pairs already warned about


def _draft_bundle(info: ModelInfo, settings: Settings, library: Library) -> Path | None:
    """The bundle of the model's draft model: its manifest's `draft`, else
    ORTSERVE_DRAFT_MODEL. None (prompt lookup) with speculation off, for the draft model
    itself, and, with a warning once, for one missing or of another tokenizer."""
    from ortserve.engine.draft_model import same_tokenizer

    name = info.manifest.get("draft") or settings.draft_model
    if not name or settings.speculation == "off":
        return None
    try:
        draft = library.get(name)
    except OrtServeError as exc:
        _warn_once(info.name, name, f"not in the library ({exc.message})")
        return None
    if Path(draft.path) == Path(info.path):
        return None  # drafting with itself costs what it saves
    if not same_tokenizer(Path(info.path), Path(draft.path)):
        _warn_once(info.name, name, "its tokenizer differs")
        return None
    return Path(draft.path)


def _warn_once(model: str, draft: str, why: str) -> None:
    if (model, draft) not in _WARNED:
        _WARNED.add((model, draft))
        log.warning("%s: draft model %s not used: %s; prompt lookup instead", model, draft, why)


def _start(
    info: ModelInfo, provider: str, adapters, settings: Settings, draft: Path | None = None
) -> Scheduler:
    """The model's scheduler thread with the model loaded on `provider`."""
    scheduler = Scheduler(
        Path(info.path),
        provider,
        batch_size=settings.num_parallel,
        lanes=settings.engine_lanes,
        parallel=settings.num_parallel,
        max_queue=settings.max_queue,
        name=info.name,
        adapters=adapters,
        batching=settings.batching,
        speculation=settings.speculation,
        int8=_int8_folder(info, provider, settings),
        draft=draft,
        kv_cache_entries=settings.kv_cache_entries,
        kv_cache_bytes=settings.kv_cache_size,
        kv_keep_type=settings.kv_keep_type,
        kv_cache=_kv_cache_folder(info, provider, settings),
        threads=settings.model_threads,
    )
    scheduler.start()
    return scheduler
