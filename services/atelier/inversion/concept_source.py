"""Concepts for Edit, fetched from the personalization service over gRPC and cached.

GetConcept first (small: id, metadata, content hash), so a wrong kind or base model fails before
any tensor moves and a cached concept costs one small call; ExportConcept (the safetensors file)
only on a cache miss. The cache is keyed by content hash (an id re-imported, or two ids of the same
file, share one entry; a concept deleted and re-trained under a new id cannot be served stale) and
bounded in bytes, least recently used out first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import grpc

from atelier.core import auth
from atelier.core.dependencies import REQUEST_ID_KEY, DependencyTimeout, dependency_failure, dependency_timeout
from atelier.core.errors import FailedPrecondition, InvalidArgument, NotFound
from atelier.inversion.concept_edit import check_concept_kind
from atelier.personalization.concepts import deserialize
from atelier.personalization.training import Concept
from atelier.v1 import personalization_pb2, personalization_pb2_grpc

__all__ = ["ConceptSource", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
FETCH_TIMEOUT_SECONDS = 60.0  # without a caller deadline


class ConceptSource:
    """A client of the personalization service (one channel, dialled on first use)."""

    def __init__(self, address: Optional[str], peer: auth.PeerCredentials = auth.PeerCredentials(),
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.address = address
        self.peer = peer
        self.cache_bytes = cache_bytes
        self._channel: Optional[grpc.Channel] = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[Concept, int]] = OrderedDict()  # content hash -> (concept, bytes)
        self._cached_bytes = 0

    def _stub(self) -> personalization_pb2_grpc.PersonalizationStub:
        with self._lock:
            if self._channel is None:
                self._channel = auth.dial(self.address, self.peer)
            return personalization_pb2_grpc.PersonalizationStub(self._channel)

    def fetch(self, concept_id: str, model_name: str, context, request_id: str) -> Concept:
        """The concept ``concept_id`` for an edit on ``model_name``: NotFound, FailedPrecondition
        (kind, base model), Unavailable naming personalization, within the caller's deadline."""
        if not self.address:
            raise FailedPrecondition("this inversion server has no personalization service "
                                     "(--personalization-address): edits with a concept are not available")
        stub = self._stub()
        info = self._call(stub.GetConcept, personalization_pb2.GetConceptRequest(concept_id=concept_id),
                          concept_id, context, request_id)
        check_concept_kind(dict(info.metadata), model_name)
        cached = self._get(info.content_hash)
        if cached is not None:
            return cached
        exported = self._call(stub.ExportConcept, personalization_pb2.ExportConceptRequest(concept_id=concept_id),
                              concept_id, context, request_id)
        concept = deserialize(exported.safetensors, field="concept")
        check_concept_kind(concept.metadata, model_name)
        self._put(exported.concept.content_hash or info.content_hash, concept, len(exported.safetensors))
        return concept

    def _call(self, method, request, concept_id: str, context, request_id: str):
        timeout = dependency_timeout(context, "fetching the concept", cap=FETCH_TIMEOUT_SECONDS)
        try:
            return method(request, timeout=timeout.seconds, metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.RpcError as error:
            raise _dependency_error(error, self.address, concept_id, timeout) from None

    # ---- the cache ---------------------------------------------------------
    def _get(self, content_hash: str) -> Optional[Concept]:
        with self._lock:
            entry = self._cache.get(content_hash)
            if entry is None:
                return None
            self._cache.move_to_end(content_hash)
            return entry[0]

    def _put(self, content_hash: str, concept: Concept, size: int) -> None:
        if not content_hash or size > self.cache_bytes:
            return
        with self._lock:
            if content_hash in self._cache:
                return
            self._cache[content_hash] = (concept, size)
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cached_bytes -= evicted

    def cached_hashes(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def _dependency_error(error: grpc.RpcError, address: str, concept_id: str, timeout: DependencyTimeout):
    """The personalization service's failure as ours, naming it: what it says of the concept
    first, the rest by the shared policy (``core.dependencies.dependency_failure``)."""
    code, details = error.code(), error.details()
    where = f"the personalization service at {address}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"concept {concept_id!r} not found ({details})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("concept", f"{where} refused it: {details}")
    return dependency_failure(error, where, timeout)
