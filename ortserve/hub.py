"""The Hugging Face Hub: which files make a checkpoint, and hub errors as one-line messages.

Shared by pulling (ortserve.models.pull) and the converter's downloads (converters.source),
so neither has to import the other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ortserve.errors import RepoNotFound, SourceUnavailable

# What a conversion needs from a checkpoint repository: configs, tokenizer, template,
# weights, licence.
CHECKPOINT_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.safetensors",
    "1_Pooling/*",
    "LICENSE*",
    "README.md",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


@contextlib.contextmanager
def hub_errors(action: str, *, revision: str | None = None) -> Iterator[None]:
    """huggingface-hub's and requests' exceptions as one-line OrtServeErrors.

    `action` starts the message ("cannot download 'org/repo'"); the rest says why and what
    to do.
    """
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.OfflineModeIsEnabled as exc:
        raise SourceUnavailable(
            f"{action}: no network: HF_HUB_OFFLINE is set, and a pull needs the hub to list "
            "the repository's files (unset it, or pull a local directory)"
        ) from exc
    except hf.LocalEntryNotFoundError as exc:
        raise SourceUnavailable(
            f"{action}: no network connection to {endpoint()} and no cached copy. Check the "
            "connection or HF_ENDPOINT, or use a local directory"
        ) from exc
    except (hf.RepositoryNotFoundError, hf.GatedRepoError) as exc:
        raise RepoNotFound(
            f"{action}: repository not found on {endpoint()} or not accessible (set HF_TOKEN "
            "for gated or private repositories)"
        ) from exc
    except hf.RevisionNotFoundError as exc:
        raise RepoNotFound(f"{action}: revision {revision!r} not found") from exc
    except hf.EntryNotFoundError as exc:
        raise SourceUnavailable(f"{action}: a file is missing on the hub: {exc}") from exc
    except OSError as exc:  # requests' ConnectionError, Timeout and HTTPError are OSErrors
        raise SourceUnavailable(f"{action}: {_network_reason(exc)}") from exc


def _network_reason(exc: OSError) -> str:
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return f"no network connection to {endpoint()} ({type(exc).__name__})"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the connection to {endpoint()} broke off mid-file; pull again to resume"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface-hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT
