"""What the Runtime keeps for every loaded model, whatever its kind or backend.

Every backend's loaded model (engine/backend.LoadedModel) extends Resident; what a model
cannot do (generate on an embedder, embed on a decoder) is refused here with a 400.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ortserve.engine.sampling import model_sampling
from ortserve.errors import InvalidRequest
from ortserve.library import ModelInfo
from ortserve.options import Sampling


@dataclass(eq=False, kw_only=True)
class Resident:
    """A loaded model's bookkeeping: which model, where it runs, who uses it, until when."""

    info: ModelInfo
    provider: str
    load_duration_ns: int = 0
    active: int = 0
    expires_at: float | None = None  # time.time(); None while in use or kept forever
    # the expiry before the current requests began: a failed request restores it, so that
    # failing requests cannot keep a model loaded
    idle_expiry: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    # What stands for one picture in a prompt (library/bundle.image_placeholder): serving
    # writes it once per image; None for a model that reads no images.
    image_placeholder: str | None = None
    # The manifest's PARAMETERs, parsed when the model loads (and when a create replaces
    # them: renew), not on every request.
    parameters: Sampling = field(init=False)

    def __post_init__(self) -> None:
        self.parameters = model_sampling(self.info.manifest.get("parameters"))

    def renew(self, info: ModelInfo) -> None:
        """The library's entry as a request found it: the newest system, template and
        parameters apply to the weights already loaded (parameters re-parsed only if they
        changed)."""
        changed = info.manifest.get("parameters") != self.info.manifest.get("parameters")
        self.info = info
        if changed:
            self.parameters = model_sampling(info.manifest.get("parameters"))

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def capabilities(self) -> list[str]:
        return self.info.capabilities

    def memory(self) -> int:
        """Bytes the model holds: its bundle's size (weights are mapped or read whole)."""
        return self.info.size

    def running(self) -> int:
        """Turns generating now (a subset of pending())."""
        return 0

    def generate(
        self,
        tokens: list[int],
        options: Any,
        *,
        skip_special_tokens: bool = True,
        images: Sequence[bytes] = (),
    ):
        raise InvalidRequest(f'"{self.name}" does not support generate', param="model")

    def encode(self, text: str) -> list[int]:
        raise InvalidRequest(f'"{self.name}" does not support generate', param="model")

    def prompt_length(self, tokens: list[int], images: Sequence[bytes] = ()) -> int:
        """The tokens a rendered prompt takes in the model; a vision model counts its
        pictures' image tokens (overridden there)."""
        return len(tokens)

    def embed(self, texts: list[str], **kwargs: Any) -> Any:
        raise InvalidRequest(f'"{self.name}" does not support embeddings', param="model")
