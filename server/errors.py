"""Typed domain errors. Each knows the gRPC status it maps to, by name, so the engine, LoRA
and store layers never import grpc; the API layer maps `code` to a `grpc.StatusCode` in one
place. Messages are written for a person and never carry server paths."""

from __future__ import annotations


class LoraserveError(Exception):
    """Base of every error a client can cause or must be told about."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(LoraserveError):
    """The request itself is malformed (bad sampling values, empty input, bad name...)."""

    code = "INVALID_ARGUMENT"


class AdapterNotFound(LoraserveError):
    """The named adapter is not registered (never silently replaced by the base)."""

    code = "NOT_FOUND"


class AdapterAlreadyExists(LoraserveError):
    """An adapter with that name and different content is already registered."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(LoraserveError):
    """The request is well formed but the server's state cannot serve it (e.g. messages sent to
    a base without a chat template)."""

    code = "FAILED_PRECONDITION"


class AdapterIncompatible(FailedPrecondition):
    """The adapter cannot run on this base: unsupported kind, wrong shapes, rank over the limit,
    modules the base lacks, or built for another base."""


class AdapterDataLoss(LoraserveError):
    """A stored adapter's files no longer match the sha256 its manifest recorded (tampering, or a
    disk fault): it is never served until published again."""

    code = "DATA_LOSS"


class ResourceExhausted(LoraserveError):
    """A bounded resource is full (queue, pins, store quota); retrying later may succeed."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(LoraserveError):
    """The engine is not accepting work (warming up, draining, stopped)."""

    code = "UNAVAILABLE"


class ConfigError(LoraserveError, ValueError):
    """A setting given to the process is invalid; names the setting and the value. Also a
    ValueError, as a bad argument to the client library is."""

    code = "INVALID_ARGUMENT"


class DeadlineExceeded(LoraserveError):
    """The request's deadline passed before it finished; the engine dropped it."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(LoraserveError):
    """The client cancelled the request."""

    code = "CANCELLED"


class Unauthenticated(LoraserveError):
    """No API key, or one the server does not know (the message never says which)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(LoraserveError):
    """A known key whose role does not allow the call."""

    code = "PERMISSION_DENIED"
