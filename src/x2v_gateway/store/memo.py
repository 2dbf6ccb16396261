"""A bounded memo for values that never change once built (a finished job, its view)."""

from __future__ import annotations

import threading
from typing import Any


class Memo:
    """A bounded map for values that are costly to build and never change once built, such as a
    finished job's `Job` and view: list pages show the same finished jobs again and again.
    Thread-safe (reader threads and the event loop share it); the oldest entry goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        return self._items.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            if len(self._items) > self.size:
                del self._items[next(iter(self._items))]
