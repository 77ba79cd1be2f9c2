"""Errors that method and servicer code raise, and their google.rpc.Status form.

Method code raises these (never grpc); the error interceptor in
``atelier.core.interceptors`` is the one place that turns them (and the SDK's
``CodecError``) into a gRPC status with google.rpc details.
"""
from __future__ import annotations

import datetime
from typing import Iterable, Optional, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from atelier.sdk.codec import CodecError

__all__ = [
    "AtelierError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "FailedPrecondition",
    "Internal",
    "from_codec_error",
    "to_grpc_status",
]


class AtelierError(Exception):
    """An error with a gRPC status code; ``violations`` are (field, description) pairs."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, violations: Sequence[tuple[str, str]] = (),
                 retry_delay: Optional[float] = None):
        super().__init__(message)
        self.message = message
        self.violations = list(violations)
        # Seconds after which a retry may succeed: sent as google.rpc.RetryInfo (the SDK honours it).
        self.retry_delay = retry_delay


class InvalidArgument(AtelierError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}" if field else description, [(field, description)])

    @classmethod
    def many(cls, violations: Iterable[tuple[str, str]]) -> "InvalidArgument":
        violations = list(violations)
        if not violations:
            raise ValueError("InvalidArgument.many needs at least one violation")
        error = cls(*violations[0])
        error.violations = violations
        error.message = "; ".join(f"{field}: {description}" for field, description in violations)
        error.args = (error.message,)
        return error


class NotFound(AtelierError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(AtelierError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AtelierError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AtelierError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(AtelierError):
    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(AtelierError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Internal(AtelierError):
    code = grpc.StatusCode.INTERNAL


def from_codec_error(error: CodecError) -> InvalidArgument:
    return InvalidArgument(error.field, error.description)


def to_grpc_status(error: AtelierError) -> grpc.Status:
    """The google.rpc.Status for an error: code, message, and a BadRequest
    detail when there are field violations."""
    status = status_pb2.Status(code=_rpc_code(error.code), message=error.message)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    if error.retry_delay is not None:
        retry_info = error_details_pb2.RetryInfo()
        retry_info.retry_delay.FromTimedelta(datetime.timedelta(seconds=max(0.0, error.retry_delay)))
        detail = any_pb2.Any()
        detail.Pack(retry_info)
        status.details.append(detail)
    return rpc_status.to_status(status)


def _rpc_code(code: grpc.StatusCode) -> int:
    # grpc.StatusCode values are (int, name) pairs; google.rpc.Code uses the same ints.
    return code.value[0]
