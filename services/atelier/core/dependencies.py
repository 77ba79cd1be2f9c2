"""What every service-to-service call needs: the caller's request id, its deadline less a margin left
for the calling service's own work, and one policy for turning a dependency's failure into ours."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

import grpc

from atelier.core.control import remaining_seconds
from atelier.core.errors import AtelierError, Cancelled, DeadlineExceeded, Unavailable

REQUEST_ID_KEY = "x-request-id"
# What a dependency call leaves of the caller's deadline for our own work.
DEADLINE_MARGIN_FRACTION = 0.25
DEADLINE_MARGIN_MAX_SECONDS = 5.0


def request_id_of(context) -> str:
    """The caller's x-request-id, or a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return value[:128]
    return uuid.uuid4().hex


@dataclass(frozen=True)
class DependencyTimeout:
    """How long one dependency call may take (``seconds``, None: unbounded) and what set it:
    ``by_caller`` when the caller's deadline less the margin was the bound, False when our own cap
    was (or there was none). A call that then expires means the caller's budget ran out in the
    first case, and a dependency that did not answer in the time we allow it in the second."""
    seconds: Optional[float]
    by_caller: bool


def dependency_timeout(context, what: str, cap: Optional[float] = None) -> DependencyTimeout:
    """The timeout of a dependency call: the caller's remaining time minus the margin, at most
    ``cap``. DeadlineExceeded when nothing is left for ``what``."""
    remaining = remaining_seconds(context)
    caller = None
    if remaining is not None:
        caller = remaining - min(DEADLINE_MARGIN_MAX_SECONDS, DEADLINE_MARGIN_FRACTION * remaining)
        if caller <= 0:
            raise DeadlineExceeded(f"the deadline leaves no time for {what}")
    if caller is not None and (cap is None or caller <= cap):
        return DependencyTimeout(caller, by_caller=True)
    return DependencyTimeout(cap, by_caller=False)


def dependency_failure(error: grpc.RpcError, where: str, timeout: DependencyTimeout) -> AtelierError:
    """A dependency's failed call as our error, naming the dependency (``where``, e.g. "the
    inversion service at host:port"). Callers map the codes that mean something about the request
    first (NOT_FOUND of a concept, INVALID_ARGUMENT of a field); the rest is this one policy:

    - DEADLINE_EXCEEDED: DeadlineExceeded when the caller's deadline (less the margin) bounded the
      call, as the caller's budget ran out; otherwise Unavailable: the dependency did not answer in
      the time we allow it (our cap), so it is down or hung.
    - CANCELLED: Cancelled (our caller went away and we cancelled the call).
    - UNAVAILABLE and anything else: Unavailable.
    """
    code, details = error.code(), error.details()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if timeout.seconds is None:  # no timeout of ours expired: the dependency's own verdict
            return Unavailable(f"{where} failed with DEADLINE_EXCEEDED: {details}")
        if timeout.by_caller:
            return DeadlineExceeded(f"{where} did not finish within the caller's deadline less a margin "
                                    f"({timeout.seconds:.1f} s)")
        return Unavailable(f"{where} did not answer within {timeout.seconds:.1f} s, the most a call to it may take")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"the call to {where} was cancelled")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{where} is unavailable ({details})")
    return Unavailable(f"{where} failed with {code.name}: {details}")
