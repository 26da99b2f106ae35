"""The client's exception tree and the one place gRPC errors become it.

The server sends every error as a `google.rpc.Status` in the `grpc-status-details-bin` trailer,
with one `google.rpc.ErrorInfo` (domain "saliency.v1", an UPPER_SNAKE reason, string metadata).
Statuses made by the transport (no server, message too large, deadline) carry no details and
map with reason "".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class SaliencyError(Exception):
    """Base of every error a call reports: a gRPC status code, a stable reason and a message."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        #: UPPER_SNAKE id from the server's ErrorInfo, e.g. "MODEL_NOT_FOUND"; "" when absent.
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        head = f"{self.code.name} {self.reason}".rstrip()
        return f"{head}: {self.message}"


class InvalidArgumentError(SaliencyError):
    """The request is malformed or a value is out of its allowed range."""


class NotFoundError(SaliencyError):
    """A named model, method, metric, template, label or layer does not exist."""


class FailedPreconditionError(SaliencyError):
    """The request is valid but the server cannot serve it now (e.g. the model is not ready)."""


class ResourceExhaustedError(SaliencyError):
    """The request exceeds a cap (size, batch, compute) or the server is at capacity."""


class UnauthenticatedError(SaliencyError):
    """The call carried no valid credentials."""


class PermissionDeniedError(SaliencyError):
    """The caller may not make this call."""


class DeadlineExceededError(SaliencyError):
    """The call did not finish within its timeout."""


class UnavailableError(SaliencyError):
    """The server cannot be reached, or is shutting down; retrying later may work."""


class CancelledError(SaliencyError):
    """The call was cancelled."""


class InternalError(SaliencyError):
    """Any other status: a server bug or an unexpected transport failure."""


_ERROR_BY_CODE: dict[grpc.StatusCode, type[SaliencyError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def _error_info(trailing_metadata: Iterable[Any] | None) -> error_details_pb2.ErrorInfo | None:
    # Sync calls give (key, value) named tuples, grpc.aio a Metadata of pairs: both unpack alike.
    for key, value in trailing_metadata or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def from_rpc_error(error: grpc.RpcError) -> SaliencyError:
    """The exception for a failed call, sync (`grpc.RpcError`) or async (`grpc.aio.AioRpcError`).

    Both kinds expose `code()`, `details()` and `trailing_metadata()` as plain methods, so one
    reader serves both (`grpc_status.rpc_status.from_call` would only serve the sync one, and
    raises when the trailer and the status disagree, hiding the original error).
    """
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else None
    trailers = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    info = _error_info(trailers)
    error_class = _ERROR_BY_CODE.get(code, InternalError)
    return error_class(
        code,
        info.reason if info is not None else "",
        message or "",
        dict(info.metadata) if info is not None else None,
    )


@contextlib.contextmanager
def map_rpc_errors() -> Iterator[None]:
    """Re-raise any gRPC error inside the block as the matching `SaliencyError` subclass."""
    try:
        yield
    except grpc.RpcError as error:  # grpc.aio.AioRpcError is a subclass
        raise from_rpc_error(error) from error
