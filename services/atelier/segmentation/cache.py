"""Image-embedding cache: LRU keyed by image content hash, bounded in bytes.

Interactive segmentation sends many prompts for one image; the image encoder is the
heavy part, so its output is kept. ``functools.lru_cache`` and ``cachetools`` bound by
entry count, not bytes, and cannot report evictions, hence this small class.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Optional, TypeVar

__all__ = ["EmbeddingCache", "CacheStats"]

V = TypeVar("V")


class CacheStats:
    """Hook points for metrics; every method is optional to override."""

    def hit(self) -> None: ...
    def miss(self) -> None: ...
    def evicted(self, count: int) -> None: ...
    def size(self, entries: int, nbytes: int) -> None: ...


class EmbeddingCache(Generic[V]):
    """Thread-safe LRU map ``key -> value`` holding at most ``max_bytes`` of values.

    ``nbytes(value)`` measures an entry; a value larger than the whole budget is not kept.
    ``max_bytes=0`` disables caching (every lookup misses).
    """

    def __init__(self, max_bytes: int, nbytes: Callable[[V], int], stats: Optional[CacheStats] = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._nbytes = nbytes
        self._stats = stats or CacheStats()
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> Optional[V]:
        """The cached value (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                self._stats.miss()
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            self._stats.hit()
            return entry[0]

    def peek(self, key: str) -> Optional[V]:
        """The cached value or None, without counting or reordering."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: str, value: V) -> bool:
        """Store ``value``, evicting least recently used entries to fit. False if too large."""
        size = int(self._nbytes(value))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_used -= old[1]
            if size > self.max_bytes:
                self._report_size()
                return False
            evicted = 0
            while self.bytes_used + size > self.max_bytes:
                _, (_, old_size) = self._entries.popitem(last=False)
                self.bytes_used -= old_size
                evicted += 1
            self._entries[key] = (value, size)
            self.bytes_used += size
            if evicted:
                self.evictions += evicted
                self._stats.evicted(evicted)
            self._report_size()
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0
            self._report_size()

    def _report_size(self) -> None:
        self._stats.size(len(self._entries), self.bytes_used)
