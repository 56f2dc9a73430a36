"""One error hierarchy for the whole server.

Each layer raises these; `sdserver.api.errors` maps them to HTTP status codes in one place,
and each protocol renders them in its own response shape.
"""

from __future__ import annotations

from collections.abc import Mapping


class SDServerError(Exception):
    """Base class: `message` is safe to show to a client."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(SDServerError):
    """The client sent something we cannot serve (names the field and the bad value)."""


class PayloadTooLarge(InvalidRequest):
    """The request body is over the server's size limit."""


class IdempotencyKeyReused(InvalidRequest):
    """An Idempotency-Key sent again with a different request (the IETF draft's 422)."""


class FieldError(ValueError):
    """Raised inside validators: `validate_request` turns it into an InvalidRequest naming `name`
    (in the client's own words) and showing `value`."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(reason)
        self.name, self.value, self.reason = name, value, reason

    def invalid(self, names: Mapping[str, str] | None = None) -> InvalidRequest:
        """The 400 for this, naming the field as the client calls it (`names`: ours -> theirs)."""
        shown = (names or {}).get(self.name, self.name)
        if self.value is None:
            return InvalidRequest(f"{shown}: {self.reason}", field=shown)
        value = repr(self.value)
        value = value if len(value) <= 60 else value[:57] + "..."
        return InvalidRequest(f"{shown}: {self.reason}, got {value}", field=shown)


class Unauthorized(SDServerError):
    """A missing or wrong API key."""


class Forbidden(SDServerError):
    """A valid key that may not do this (only the admin key manages models and A1111's options)."""


class NotFound(SDServerError):
    """The client named something that does not exist (a model, a job, a route)."""


class Overloaded(SDServerError):
    """The queue is full; the client should retry later."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Timeout(SDServerError):
    """A request waited past its deadline."""


class Cancelled(SDServerError):
    """The request was cancelled before it finished."""


class Unavailable(SDServerError):
    """The server cannot take work right now (starting, draining, worker gone)."""


class ConfigError(SDServerError):
    """The configuration is unusable; start-up stops with this one-line message."""


class ModelLoadError(SDServerError):
    """A model could not be loaded."""


class UnsupportedModel(ModelLoadError):
    """The model is of a kind this server cannot serve (the message names what it is)."""


class UnsafeCheckpoint(ModelLoadError):
    """A pickled checkpoint asks to run code, or to build objects that plain weights never need."""


class StorageError(SDServerError):
    """The server could not read or change its saved files (the outputs folder, the history index)."""


class GenerationError(SDServerError):
    """The pipeline failed while generating."""


class OutOfMemory(GenerationError):
    """The device ran out of memory; the cache was freed and the next request may succeed."""
