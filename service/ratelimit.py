"""Per-author posting limit: at most N posts in any S seconds."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from cachetools import TTLCache

#: Authors remembered at once. An author's log is forgotten one window
#: after their last post, so only that many authors posting within one
#: window could overflow it (and the oldest would then be forgotten early).
MAX_AUTHORS = 100_000


class RateLimiter:
    """A sliding-window log per key; idle keys are forgotten after the window."""

    def __init__(self, limit, window, *, clock=time.monotonic, max_keys=MAX_AUTHORS):
        self._limit = limit
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._events = TTLCache(max_keys, ttl=window, timer=clock)

    def hit(self, key):
        """Record an event for ``key``; return 0 if allowed, else seconds to wait."""
        now = self._clock()
        with self._lock:
            events = self._events.get(key)
            if events is None:
                events = deque()
            while events and events[0] <= now - self._window:
                events.popleft()
            if len(events) >= self._limit:
                return max(1, math.ceil(events[0] + self._window - now))
            events.append(now)
            # Re-inserting refreshes the key's time to live.
            self._events[key] = events
            return 0
