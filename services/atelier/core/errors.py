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
    "shorten",
    "quoted",
    "Violations",
]

# gRPC refuses response metadata beyond 8 KiB (the client's default max_metadata_size) and
# reports RESOURCE_EXHAUSTED instead of our status. The status travels twice: grpc-message
# (percent-encoded, up to 12 bytes per character) and grpc-status-details-bin (base64, 4/3).
# These bounds keep both together under ~6 KiB whatever the caller sent.
MAX_MESSAGE_CHARS = 200
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 240
MAX_VIOLATIONS = 20
MAX_DETAILS_BYTES = 3000


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (with "..." and the original length when cut):
    for echoing caller strings (model names, prompts) in error messages."""
    text = str(text)
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text)} chars)"
    return text[: max(0, limit - len(suffix))] + suffix


def quoted(text: str, limit: int = 80) -> str:
    """``repr`` of a shortened caller string, e.g. ``'toy'`` in "model 'toy' not found"."""
    return repr(shorten(text, limit))


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


class Violations:
    """Collects the field violations of several independent checks, so that a request's every
    bad field is reported in one INVALID_ARGUMENT (as a form shows all its errors at once)."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def attempt(self, check, *args, **kwargs):
        """``check(*args, **kwargs)``; its InvalidArgument/CodecError is recorded (result None)."""
        try:
            return check(*args, **kwargs)
        except InvalidArgument as error:
            self.items.extend(error.violations)
        except CodecError as error:
            self.items.append((error.field, error.description))
        return None

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument.many(self.items)


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
    detail when there are field violations.

    Bounded in size (see MAX_*): at most MAX_VIOLATIONS violations and MAX_DETAILS_BYTES,
    the rest summarised as "N more violations omitted"; every string shortened."""
    status = status_pb2.Status(code=_rpc_code(error.code), message=shorten(error.message, MAX_MESSAGE_CHARS))
    if error.violations:
        bad_request = error_details_pb2.BadRequest()
        for index, (field, description) in enumerate(error.violations):
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=shorten(field, MAX_FIELD_CHARS), description=shorten(description, MAX_DESCRIPTION_CHARS))
            if index >= MAX_VIOLATIONS or bad_request.ByteSize() + violation.ByteSize() > MAX_DETAILS_BYTES:
                omitted = len(error.violations) - index
                bad_request.field_violations.add(
                    field="", description=f"{omitted} more violation{'s' if omitted > 1 else ''} omitted")
                break
            bad_request.field_violations.append(violation)
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
