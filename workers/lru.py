"""A worker's local cache of immutable things it fetched: bounded in bytes, least recently used out first.

Decode workers keep the entries they decoded from (``DecodeWorker``: a context asked again skips
the store) and the pages of paged decoding (``workers.paged``) in one. Items are never changed
in place, so an item here is never stale in content; ``ttl_s`` bounds how long one outlives its
copy in the store (an entry a tenant deleted stops being served after that).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BytesLRU(Generic[V]):
    """``get``/``put`` by key; ``size_of(value)`` bytes each, at most ``capacity_bytes`` in all
    (one item larger than that is kept alone). Thread-safe."""

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int], ttl_s: float | None = None):
        self.capacity_bytes, self.size_of, self.ttl_s = capacity_bytes, size_of, ttl_s
        self.used = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, tuple[V, int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None and self.ttl_s is not None and time.monotonic() - item[2] > self.ttl_s:
                self._drop(key)
                item = None
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        if self.capacity_bytes <= 0:
            return
        size = self.size_of(value)
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (value, size, time.monotonic())
            self.used += size
            while self.used > self.capacity_bytes and len(self._items) > 1:
                self._drop(next(iter(self._items)))

    def discard(self, key: Hashable) -> None:
        with self._lock:
            if key in self._items:
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        _, size, _ = self._items.pop(key)
        self.used -= size
