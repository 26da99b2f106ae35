"""One error model for the whole core.

Every failure a caller can cause or act on is a `SaliencyError` subclass carrying a stable
UPPER_SNAKE `reason` (AIP-193 ErrorInfo), a human message, and string metadata. The API layer maps
the subclass to a gRPC status; nothing below `api/` knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping


class SaliencyError(Exception):
    """Base of every error the service reports to a caller."""

    def __init__(self, reason: str, message: str, metadata: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}


class InvalidArgument(SaliencyError):
    """The request is malformed or a value is out of its allowed range."""


class NotFound(SaliencyError):
    """A named model, method, metric, template, label or layer does not exist."""


class FailedPrecondition(SaliencyError):
    """The request is valid but the system is not in a state to serve it (e.g. model not ready)."""


class ResourceExhausted(SaliencyError):
    """The request exceeds a configured cap (size, batch, compute) or the server is at capacity."""


class Cancelled(SaliencyError):
    """The caller cancelled the request; its work stopped at the next model pass."""


class DeadlineExceeded(SaliencyError):
    """The caller's deadline passed before the work finished; the work stopped at the next model pass."""


class Unauthenticated(SaliencyError):
    """The request carries no credentials the server accepts."""


class PermissionDenied(SaliencyError):
    """The request's credentials are not allowed to call this service."""


class Unavailable(SaliencyError):
    """The service is shutting down or temporarily unable to serve."""


class Internal(SaliencyError):
    """A bug: something the caller could not have caused. Reported without internals."""
