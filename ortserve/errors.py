"""Errors with an HTTP status and a type, mapped to responses in one place (api/app.py)."""

from __future__ import annotations


class OrtServeError(Exception):
    """Base error: a message safe to show a client, an HTTP status and an error type."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(OrtServeError):
    status = 400
    type = "invalid_request_error"


class InvalidName(InvalidRequest):
    """A model name that is malformed or could leave the library root."""


class ModelNotFound(OrtServeError):
    status = 404
    type = "not_found_error"

    def __init__(self, name: str):
        super().__init__(f'model "{name}" not found, try pulling it first', code="model_not_found")
        self.name = name


class ModelExists(OrtServeError):
    status = 409
    type = "conflict_error"


class UnsupportedModel(InvalidRequest):
    """A checkpoint whose architecture or files the converter cannot handle."""


class SourceUnavailable(OrtServeError):
    """A model source that cannot be reached (no network, unknown repository)."""

    status = 502
    type = "source_error"


class RepoNotFound(SourceUnavailable):
    """A repository or revision the hub does not have (or will not show without a token)."""

    status = 404
    type = "not_found_error"


class ConverterMissing(OrtServeError):
    """A checkpoint to convert, and no `convert` extra installed."""

    status = 501
    type = "converter_missing"


class PullCancelled(OrtServeError):
    """The caller went away; nothing was added."""

    status = 499
    type = "cancelled"


class ConversionError(OrtServeError):
    status = 500
    type = "conversion_error"


class LibraryCorrupt(OrtServeError):
    """On-disk state that does not match its digest or manifest."""

    status = 500
    type = "library_error"


class NotSupportedYet(InvalidRequest):
    """A field a later version handles: refused rather than silently ignored."""


class ServerBusy(OrtServeError):
    """Too much in flight: the caller should come back later (sent as Retry-After)."""

    status = 503
    type = "server_busy"

    def __init__(
        self,
        message: str = "server busy, please try again.  maximum pending requests exceeded",
        *,
        retry_after: int = 1,
    ):
        super().__init__(message)
        self.retry_after = retry_after  # seconds


class ModelLoadError(OrtServeError):
    """A model that cannot be loaded; every other model keeps serving."""

    status = 500
    type = "model_load_error"


class ProviderUnavailable(OrtServeError):
    """An explicitly requested execution provider that this machine does not have, or that
    fails to load a model: the server is fine, this provider is not (the message names it and
    the fix)."""

    status = 503
    type = "provider_error"
