"""Queues between stages: a bounded drop-oldest FIFO, so a live stream's answers stay about the
present when the model falls behind (the oldest waiting frames go first, and are counted)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class DropOldestQueue:
    """A bounded FIFO. When full, `put` drops the oldest item (counted in `dropped`) or, with
    `drop=False`, waits for room. `close()` wakes everyone; `get_batch` then drains what is left."""

    def __init__(self, maxsize: int, drop: bool = True) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize, self.drop = maxsize, drop
        self._items: deque = deque()
        self._cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Queue `item`; False if the queue was closed."""
        with self._cond:
            while not self.drop and len(self._items) >= self.maxsize and not self.closed:
                self._cond.wait()
            if self.closed:
                return False
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get_batch(self, max_items: int, timeout: float) -> list:
        """Up to `max_items` oldest items; waits up to `timeout` s for the first one."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            if batch:
                self._cond.notify_all()
            return batch

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take_dropped(self) -> int:
        """Drops since the last call (the caller moves them into its own counter)."""
        with self._cond:
            dropped, self.dropped = self.dropped, 0
            return dropped

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
