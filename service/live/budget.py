"""The hold budget: how many requests this process may hold at once.

Each held long-poll or open stream keeps a waitress thread; the budget,
below the thread count, keeps threads free for writes and catch-up reads.
Per process: ``--workers K`` gives each worker its own.
"""

from __future__ import annotations

import threading
from collections import Counter

from .pages import Kind


class HoldBudget:
    """Counts held requests against a limit below the thread count, and
    the answers given, by kind.

    An event stream keeps one slot for its whole life; streams are also
    counted against a cap of their own within the limit, so that they can
    never take the slots long-polls need.
    """

    def __init__(self, limit, stream_limit=0):
        self.limit = limit
        self.stream_limit = stream_limit
        self._held = 0
        self._streams = 0
        self._answers = Counter()
        #: Streams refused at the cap or with the budget spent (503).
        self.refused_streams = 0
        self._lock = threading.Lock()

    @property
    def held(self):
        return self._held

    def try_acquire(self):
        with self._lock:
            if self._held >= self.limit:
                return False
            self._held += 1
            return True

    def release(self, count=1):
        with self._lock:
            self._held -= count

    @property
    def streams(self):
        return self._streams

    def try_acquire_stream(self):
        """A slot for a stream's life: False beyond the stream cap or the budget."""
        with self._lock:
            if self._streams >= self.stream_limit or self._held >= self.limit:
                self.refused_streams += 1
                return False
            self._held += 1
            self._streams += 1
            return True

    def release_stream(self):
        with self._lock:
            self._held -= 1
            self._streams -= 1

    def settle(self, answered):
        """Free the slots of held viewers just answered and count the
        answers ({kind: count}), in one step for a whole batch."""
        with self._lock:
            self._held -= answered.total()
            self._answers.update(answered)

    def count(self, kind):
        """Count an answer given without a hold."""
        with self._lock:
            self._answers[kind] += 1

    def answers(self):
        """{kind value: answers given}, for every kind."""
        with self._lock:
            return {kind.value: self._answers[kind] for kind in Kind}
