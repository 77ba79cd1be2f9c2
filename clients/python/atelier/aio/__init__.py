"""``atelier.aio``: the asyncio SDK. ``atelier.aio.Client`` has ``atelier.Client``'s surface
with every call awaited (cancel a call with ``cancel=`` or by cancelling its task)."""
from atelier.aio.client import Client
from atelier.aio.inversion import AsyncInversionClient
from atelier.aio.segmentation import AsyncSegmentationClient

__all__ = ["Client", "AsyncInversionClient", "AsyncSegmentationClient"]
