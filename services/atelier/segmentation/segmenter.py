"""The segmentation pipeline: validate -> prepare -> embedding (cache, micro-batched encoder,
local or Triton) -> decode every prompt set on the compute executor.

Pure method code: PIL images and numpy prompts in, numpy masks out; errors are
atelier.core.errors. The image encoder is the only heavy step, so it is the one that is
cached, shared between concurrent callers of the same image, and batched across callers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from PIL import Image as PILImage

from atelier.core.control import CallControl
from atelier.core.executor import ComputeExecutor
from atelier.segmentation.batching import BatchStats, MicroBatcher, wait_for
from atelier.segmentation.cache import CacheStats, EmbeddingCache
from atelier.segmentation.sam import MaskCandidates, PreparedImage, Prompt, SamPredictor, validate_prompts

__all__ = ["BatchingOptions", "SegmentOutput", "Segmenter", "local_encoder", "triton_encoder"]

EncodeBatch = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) -> (B, C, s, s)


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 8  # 1 turns micro-batching off
    max_wait_seconds: float = 0.005
    # Wait for company only while other calls are on their way to the encoder (validating,
    # preprocessing): a lone caller then skips the wait. False: always wait, like Triton.
    adaptive_wait: bool = True
    max_queue: int = 64
    cache_bytes: int = 256 * 1024 * 1024  # 0 turns the embedding cache off


@dataclass
class SegmentOutput:
    results: list[MaskCandidates]  # one per prompt set, in order
    width: int
    height: int
    embedding_cached: bool  # no encoder run was needed for this call
    encoder_batch_size: int  # images in the encoder execution this image rode in (0 if cached)
    queue_seconds: float  # waiting for the decode executor
    wall_seconds: float


def local_encoder(predictor: SamPredictor) -> EncodeBatch:
    return predictor.encode


def triton_encoder(client) -> EncodeBatch:
    """``client.encode(np (B,3,S,S)) -> np (B,C,s,s)`` (a TritonImageEncoder) as an EncodeBatch."""
    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.tensor(client.encode(pixel_values.numpy()))  # copies: tritonclient arrays are read-only
    return encode


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Segmenter:
    """One SAM model behind one encoder backend, with its cache and batcher."""

    def __init__(self, predictor: SamPredictor, encode_batch: Optional[EncodeBatch] = None,
                 options: BatchingOptions = BatchingOptions(), decode_executor: Optional[ComputeExecutor] = None,
                 cache_stats: Optional[CacheStats] = None, batch_stats: Optional[BatchStats] = None,
                 name: str = "sam image encoder"):
        self.predictor = predictor
        self.options = options
        self._encode_batch = encode_batch or local_encoder(predictor)
        self._decode_executor = decode_executor
        self.cache: EmbeddingCache[torch.Tensor] = EmbeddingCache(options.cache_bytes, _tensor_bytes, cache_stats)
        self.batcher: MicroBatcher[tuple[str, torch.Tensor], torch.Tensor] = MicroBatcher(
            self._run_encoder, max_batch_size=options.max_batch_size, max_wait_seconds=options.max_wait_seconds,
            max_queue=options.max_queue, name=name, stats=batch_stats,
            more_coming=(lambda: self._arriving > 0) if options.adaptive_wait else None)
        self._arriving = 0  # calls between entry and their encoder submit / cache hit
        self._in_flight: dict[str, object] = {}  # content key -> Future: one encoder run per image at a time
        self._lock = threading.RLock()

    def close(self) -> None:
        self.batcher.close()

    def torch_modules(self) -> list[torch.nn.Module]:
        """For the registry's memory accounting (parameters and buffers of the SAM model)."""
        return [self.predictor.model]

    @property
    def low_res_size(self) -> int:
        return self.predictor.low_res_size

    # ------------------------------------------------------------------ encoder
    def _run_encoder(self, items: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        embeddings = self._encode_batch(torch.stack([pixels for _, pixels in items])).to(self.predictor.device)
        # Clones, so a cached embedding does not pin the whole batch's storage. Cached before
        # the callers are woken, so a caller's next request for the same image always hits.
        results = [embedding.clone() for embedding in embeddings]
        for (key, _), embedding in zip(items, results):
            self.cache.put(key, embedding)
        return results

    def _forget(self, key: str, future) -> None:
        with self._lock:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]

    def _arrived(self, arrival: list) -> None:
        """Count a call out of the arriving set, once (``arrival`` is its one-element flag)."""
        if arrival:
            arrival.pop()
            with self._lock:
                self._arriving -= 1

    def embedding(self, prepared: PreparedImage, control: Optional[CallControl] = None,
                  arrival: Optional[list] = None) -> tuple[torch.Tensor, int]:
        """The image embedding and the encoder batch size it came from (0: from the cache)."""
        key = prepared.content_key
        arrival = arrival if arrival is not None else []
        pixels = None
        while True:
            with self._lock:
                cached = self.cache.get(key) if pixels is None else self.cache.peek(key)
                if cached is not None:
                    self._arrived(arrival)
                    return cached, 0
                future = self._in_flight.get(key)
                owner = future is None and pixels is not None
                if owner:
                    future = self.batcher.submit((key, pixels), control)
                    self._in_flight[key] = future
                    future.add_done_callback(lambda done, key=key: self._forget(key, done))
                if future is not None:
                    self._arrived(arrival)
            if owner:
                return wait_for(future, control)
            if future is None:
                # Preprocess outside the lock, then look again: another caller may have started.
                pixels = self.predictor.pixel_values(prepared)
                continue
            # Joined another caller's run: never cancel it on our behalf; retry if its owner did.
            try:
                return wait_for(_Shared(future), control)
            except _OwnerCancelled:
                continue

    def warm_up(self) -> None:
        """One encoder + decoder run on a blank image (first-call costs), outside cache and stats."""
        prepared = self.predictor.prepare(PILImage.new("RGB", (self.predictor.input_size,) * 2))
        embedding = self._encode_batch(self.predictor.pixel_values(prepared)[None])[0]
        self.predictor.decode(embedding, prepared, Prompt.of([(0, 0)], [1]))

    # ------------------------------------------------------------------ whole call
    def segment(self, image: PILImage.Image, prompts: Sequence[Prompt], multimask: bool = False,
                mask_threshold: float = 0.0, control: Optional[CallControl] = None,
                prompt_fields: Optional[Sequence[str]] = None) -> SegmentOutput:
        """Masks for each prompt set on one image, with one encoder pass (or none, if cached).

        ``prompt_fields[i]`` is the request field that holds prompt ``i`` (for error messages)."""
        control = control or CallControl()
        started = time.monotonic()
        width, height = image.size
        arrival = [True]
        with self._lock:
            self._arriving += 1
        try:
            validate_prompts(prompts, width, height, self.low_res_size, prompt_fields)
            control.check()
            prepared = self.predictor.prepare(image)
            embedding, batch_size = self.embedding(prepared, control, arrival)
        finally:
            self._arrived(arrival)
        queue_seconds = 0.0

        decode_started: list[float] = []

        def decode_all() -> list[MaskCandidates]:
            decode_started.append(time.monotonic())
            results = []
            for prompt in prompts:
                control.check()
                results.append(self.predictor.decode(embedding, prepared, prompt, multimask, mask_threshold))
            return results

        if self._decode_executor is None:
            results = decode_all()
        else:
            submitted = time.monotonic()
            results = wait_for(self._decode_executor.submit(decode_all, control), control)
            queue_seconds += decode_started[0] - submitted
        return SegmentOutput(results=results, width=width, height=height, embedding_cached=batch_size == 0,
                             encoder_batch_size=batch_size, queue_seconds=queue_seconds,
                             wall_seconds=time.monotonic() - started)


class _OwnerCancelled(Exception):
    pass


class _Shared:
    """A view of another caller's Future: waiting on it never cancels it."""

    def __init__(self, future):
        self._future = future

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def result(self, timeout=None):
        if self._future.cancelled():
            raise _OwnerCancelled()
        try:
            return self._future.result(timeout)
        except Exception:
            if self._future.cancelled():
                raise _OwnerCancelled() from None
            raise
