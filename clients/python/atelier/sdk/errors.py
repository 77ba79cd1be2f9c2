"""Typed exceptions for failed calls, built from the server's google.rpc.Status.

Every failed RPC raises a subclass of ``AtelierError`` chosen by its status code.
``field_violations`` lists the ``(field, description)`` pairs of a
google.rpc.BadRequest detail, so bad input names the offending request field.
"""
from __future__ import annotations

from typing import Any, Optional, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AtelierError",
    "CancelledError",
    "UnknownError",
    "InvalidArgumentError",
    "DeadlineExceededError",
    "NotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "AbortedError",
    "OutOfRangeError",
    "UnimplementedError",
    "InternalError",
    "UnavailableError",
    "DataLossError",
    "UnauthenticatedError",
    "StreamProtocolError",
]

# google.rpc detail types the SDK unpacks; anything else stays a packed Any.
_DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


class AtelierError(Exception):
    """A failed Atelier call.

    ``code`` is the ``grpc.StatusCode``, ``message`` the server's status message,
    ``details`` the unpacked google.rpc detail messages (``BadRequest``,
    ``ErrorInfo``, ``RetryInfo``, ...; unknown types stay ``google.protobuf.Any``),
    ``field_violations`` the BadRequest ``(field, description)`` pairs.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        details: tuple[Any, ...] = (),
        field_violations: Optional[list[tuple[str, str]]] = None,
    ):
        self.code = code or self.default_code
        self.message = message
        self.details = tuple(details)
        self.field_violations = list(field_violations or [])
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            text += "".join(f"\n  {field}: {description}" for field, description in self.field_violations)
        return text

    @property
    def retry_delay(self) -> Optional[float]:
        """Seconds the server asked the client to wait (google.rpc.RetryInfo), if any."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.RetryInfo) and detail.HasField("retry_delay"):
                return float(detail.retry_delay.ToTimedelta().total_seconds())
        return None


class CancelledError(AtelierError):
    """The call was cancelled (by the caller's ``CancelToken`` or by the server)."""

    default_code = grpc.StatusCode.CANCELLED


class UnknownError(AtelierError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(AtelierError):
    """Bad input; ``field_violations`` names the request fields at fault."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(AtelierError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(AtelierError):
    """Unknown model, concept or job."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(AtelierError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(AtelierError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(AtelierError):
    """The server is saturated (full queue) or a message exceeded a size limit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(AtelierError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(AtelierError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(AtelierError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(AtelierError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(AtelierError):
    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(AtelierError):
    """The server cannot be reached or is not ready (e.g. still loading a model)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(AtelierError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(AtelierError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class StreamProtocolError(AtelierError):
    """A streaming call broke the contract: it ended without a result, or sent more than one."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[AtelierError]] = {
    cls.default_code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_class(code: grpc.StatusCode) -> type[AtelierError]:
    """The exception class for a status code (``AtelierError`` for codes without one)."""
    return _BY_CODE.get(code, AtelierError)


def _unpack(detail: any_pb2.Any) -> Any:
    for message_type in _DETAIL_TYPES:
        if detail.Is(message_type.DESCRIPTOR):
            message = message_type()
            detail.Unpack(message)
            return message
    return detail


def from_rpc_error(error: grpc.RpcError) -> AtelierError:
    """Translate a ``grpc.RpcError`` (a failed call) into its typed ``AtelierError``."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    details: list[Any] = []
    try:
        status = rpc_status.from_call(cast(grpc.Call, error)) if hasattr(error, "trailing_metadata") else None
    except ValueError:
        status = None  # rich status inconsistent with the call's own status: keep the basics
    if status is not None:
        details = [_unpack(detail) for detail in status.details]
    violations = [
        (violation.field, violation.description)
        for detail in details
        if isinstance(detail, error_details_pb2.BadRequest)
        for violation in detail.field_violations
    ]
    return error_class(code)(message, code=code, details=tuple(details), field_violations=violations)
