"""What every service-to-service call needs: the caller's request id and its deadline, less a margin
left for the calling service's own work."""
from __future__ import annotations

import uuid
from typing import Optional

from atelier.core.control import remaining_seconds
from atelier.core.errors import DeadlineExceeded

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


def dependency_timeout(context, what: str, cap: Optional[float] = None) -> Optional[float]:
    """Seconds a dependency call may take: the caller's remaining time minus the margin (at most
    ``cap``; None without either). DeadlineExceeded when nothing is left for ``what``."""
    remaining = remaining_seconds(context)
    timeout = None
    if remaining is not None:
        timeout = remaining - min(DEADLINE_MARGIN_MAX_SECONDS, DEADLINE_MARGIN_FRACTION * remaining)
        if timeout <= 0:
            raise DeadlineExceeded(f"the deadline leaves no time for {what}")
    if cap is not None:
        timeout = cap if timeout is None else min(cap, timeout)
    return timeout
