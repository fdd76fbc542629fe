"""What the Runtime keeps for every loaded model, whatever its kind."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ortserve.library import ModelInfo


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

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def capabilities(self) -> list[str]:
        return self.info.capabilities
