"""Backoff with jitter, and one loop pass that must not end its thread."""

from __future__ import annotations

import logging
import random


class Backoff:
    """Pauses that double from ``low`` to ``high`` seconds, each scaled by a
    random 0.5–1.0: processes that failed together must not retry in step.

    ``failures`` counts consecutive failures; :meth:`failed` adds one and
    returns the pause to take, :meth:`succeeded` starts again from ``low``.
    """

    def __init__(self, low, high, *, rng=random.random):
        self.low = low
        self.high = high
        self._rng = rng
        self.failures = 0

    def failed(self):
        """Count a failure; return the seconds to wait before the next try."""
        self.failures += 1
        delay = min(self.high, self.low * 2 ** (self.failures - 1))
        return delay * (0.5 + self._rng() / 2)

    def succeeded(self):
        """Count a success: True if it ends a run of failures."""
        recovered = self.failures > 0
        self.failures = 0
        return recovered


def run_pass(work, logger: logging.Logger, what):
    """Run one pass of a background loop; log an unexpected error with its
    traceback and return False instead of raising, so one bad pass never
    ends the thread for good. True when the pass finished."""
    try:
        work()
    except Exception:
        logger.exception("%s pass failed", what)
        return False
    return True
