"""The Atelier SDK: ``atelier.Client`` and the types its calls take and return.

Only grpcio, grpcio-status, grpcio-health-checking, protobuf, numpy and pillow are
needed (tqdm for ``progress=True``); the SDK never imports torch. ``atelier.aio.Client``
is the asyncio twin of ``atelier.Client``.
"""
from atelier.sdk.client import DEFAULT_TIMEOUT, Client, TLSConfig
from atelier.sdk.codec import CodecError
from atelier.sdk.errors import (
    AbortedError,
    AlreadyExistsError,
    AtelierError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StreamProtocolError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from atelier.sdk.common import Usage
from atelier.sdk.inversion import EditResult, Inversion, InversionClient, StepDiagnostics
from atelier.sdk.personalization import JobCancelledError, JobFailedError, PersonalizationClient
from atelier.sdk.progress import CancelToken, Progress
from atelier.sdk.segmentation import PromptSet, Segmentation, SegmentationClient
from atelier.sdk.transport import RetryPolicy

__all__ = [
    "Client",
    "DEFAULT_TIMEOUT",
    "TLSConfig",
    "RetryPolicy",
    "Progress",
    "CancelToken",
    "Inversion",
    "InversionClient",
    "StepDiagnostics",
    "EditResult",
    "PersonalizationClient",
    "JobFailedError",
    "JobCancelledError",
    "Segmentation",
    "SegmentationClient",
    "PromptSet",
    "Usage",
    "CodecError",
    "AtelierError",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "StreamProtocolError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]
