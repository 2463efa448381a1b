"""Log lines for failures that repeat: one line each, at most so often.

A health check polled every second against a database that does not exist
must not fill the log with a traceback a second: the operator wants one
line saying what fails, again now and then while it goes on, with how many
failures the quiet time hid.
"""

from __future__ import annotations

import threading
import time


class Throttled:
    """``warning(message, *args)`` logs at most once per ``interval`` seconds."""

    def __init__(self, logger, interval, *, clock=time.monotonic):
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next = None
        self._hidden = 0
        self._lock = threading.Lock()

    def warning(self, message, *args):
        now = self._clock()
        with self._lock:
            if self._next is not None and now < self._next:
                self._hidden += 1
                return
            hidden, self._hidden = self._hidden, 0
            self._next = now + self._interval
        if hidden:
            message += " (and %d more since the last line)"
            args = (*args, hidden)
        self._logger.warning(message, *args)
