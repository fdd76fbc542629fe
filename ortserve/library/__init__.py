"""The local model library: the only code that knows the on-disk layout."""

from ortserve.library.names import ModelName
from ortserve.library.store import Library, ModelInfo

__all__ = ["Library", "ModelInfo", "ModelName"]
