"""``atelier.aio``: the asyncio SDK. ``atelier.aio.Client`` has ``atelier.Client``'s surface
with every call awaited (cancel a call with ``cancel=`` or by cancelling its task)."""
from atelier.aio.client import Client
from atelier.aio.inversion import AsyncInversionClient
from atelier.aio.personalization import AsyncJob, AsyncPersonalizationClient
from atelier.aio.segmentation import AsyncSegmentationClient
from atelier.aio.synthesis import AsyncSynthesisClient

__all__ = ["Client", "AsyncInversionClient", "AsyncSegmentationClient", "AsyncSynthesisClient",
           "AsyncPersonalizationClient", "AsyncJob"]
