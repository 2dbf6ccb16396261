"""Token buckets in this process's memory: the rate limits of a store only one process uses."""

from __future__ import annotations

import threading
import time


class TokenBuckets:
    """A token bucket per key: `per_minute` requests a minute, in bursts of up to a minute's worth.

    In memory: right for a store only this process uses (SQLite), where a restart forgetting the
    buckets only gives every key one fresh minute. A store that replicas share keeps its buckets
    in the store (`JobStore.take_request`).
    """

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, monotonic time)
        self._lock = threading.Lock()

    def take(self, key_id: str, per_minute: float) -> float:
        """0 when one more request may go now; else the seconds until one may."""
        with self._lock:
            now = time.monotonic()
            capacity = max(1.0, per_minute)
            tokens, at = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - at) * per_minute / 60)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) * 60 / per_minute
