"""The SAM image encoder on a Triton Inference Server, through tritonclient.grpc.

Only the heavy encoder runs remotely; preprocessing, the prompt encoder and the mask
decoder stay in the service. Every call has a bounded timeout; an unreachable, unready or
too slow server becomes ``Unavailable`` with a message naming the server and model, so a
caller never hangs and never sees INTERNAL for an infrastructure outage.
"""
from __future__ import annotations


import numpy as np

from atelier.core.errors import Unavailable

__all__ = ["TritonImageEncoder"]

# Status codes that mean "the server is not there / not able right now", not "our request is wrong".
_OUTAGE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "CANCELLED", "RESOURCE_EXHAUSTED", "NOT_FOUND")


class TritonImageEncoder:
    """``encode(pixel_values (B, 3, S, S) float32) -> (B, C, s, s) float32`` on Triton."""

    def __init__(self, url: str, model_name: str = "sam_image_encoder", model_version: str = "",
                 timeout_seconds: float = 30.0, health_timeout_seconds: float = 2.0):
        import tritonclient.grpc as triton_grpc

        self._triton_grpc = triton_grpc
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_seconds = timeout_seconds
        self.health_timeout_seconds = health_timeout_seconds
        # Keepalive makes a silently dead connection fail fast instead of waiting out the timeout.
        self._client = triton_grpc.InferenceServerClient(
            url, keepalive_options=triton_grpc.KeepAliveOptions(keepalive_time_ms=10_000, keepalive_timeout_ms=5_000))

    def _describe(self) -> str:
        return f"Triton server at {self.url} (model {self.model_name!r})"

    def _status_name(self, error) -> str:
        status = (error.status() or "") if hasattr(error, "status") else ""
        return status.rsplit(".", 1)[-1]

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        batch = np.ascontiguousarray(pixel_values, dtype=np.float32)
        request = self._triton_grpc.InferInput("pixel_values", list(batch.shape), "FP32")
        request.set_data_from_numpy(batch)
        try:
            response = self._client.infer(
                self.model_name, [request], model_version=self.model_version,
                outputs=[self._triton_grpc.InferRequestedOutput("image_embeddings")],
                client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            status = self._status_name(error)
            if status in _OUTAGE_CODES or not status:
                raise Unavailable(f"the image encoder is unavailable: {self._describe()} answered "
                                  f"{status or 'an error'}: {error.message()}") from error
            raise RuntimeError(f"{self._describe()} rejected the encoder request ({status}): {error.message()}") from error
        embeddings = response.as_numpy("image_embeddings")
        if embeddings is None or embeddings.shape[0] != batch.shape[0]:
            raise RuntimeError(f"{self._describe()} returned no or mis-sized image_embeddings")
        return embeddings

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): the server is live and the encoder model is loaded."""
        from tritonclient.utils import InferenceServerException

        try:
            if not self._client.is_server_ready(client_timeout=self.health_timeout_seconds):
                return False, f"{self._describe()}: server not ready"
            if not self._client.is_model_ready(self.model_name, self.model_version,
                                               client_timeout=self.health_timeout_seconds):
                return False, f"{self._describe()}: model not ready"
        except InferenceServerException as error:
            return False, f"{self._describe()}: {self._status_name(error) or 'error'}: {error.message()}"
        return True, f"{self._describe()}: ready"

    def close(self) -> None:
        self._client.close()
