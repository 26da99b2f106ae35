"""Core errors -> gRPC statuses with a google.rpc.ErrorInfo (AIP-193). The one mapping table."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from saliency_service.core import errors

DOMAIN = "saliency.v1"

_CODES: dict[type[errors.SaliencyError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_code(error: errors.SaliencyError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if issubclass(cls, errors.SaliencyError) and cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.SaliencyError) -> grpc.Status:
    """A grpc.Status whose details carry one ErrorInfo with the error's reason and metadata."""
    code = status_code(error)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))
    status: grpc.Status = rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=[info]))
    return status
