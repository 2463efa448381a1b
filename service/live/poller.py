"""One thread per watched content: asks the store for new changes, wakes viewers.

However many viewers hold on a content, its poller runs one query per
``interval`` (sooner when a write in this process, or a NOTIFY from
another, pokes it), so database load follows the number of watched contents
and processes, never viewers. Between passes it also wakes when a held
viewer's wait runs out, to answer its timeout on time (no query then). While its process hears NOTIFY, the hub
spaces the queries out (:meth:`Poller.set_query_interval`); the passes that
answer timed-out viewers keep ``interval``.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from ..common.errors import StoreUnavailable
from ..common.retry import Backoff, run_pass

logger = logging.getLogger(__name__)

#: Seconds a timeout may be answered late so that holds whose waits run
#: out within it are answered in one pass (a thousand viewers that arrived
#: over a second are a handful of passes, not a thousand).
TIMEOUT_SLACK = 0.02
#: First pause, in seconds, after a failed poll; it doubles up to the
#: ``poll_backoff_max`` setting. Short: most failures are one dropped
#: connection that the pool replaces at once.
BACKOFF_MIN = 0.1


class Poller:
    """Keeps one :class:`~service.live.feed.Feed` up to date with the store.

    ``poll_once()`` and ``tick()`` do one pass each, so tests drive the
    poller synchronously; ``start()`` runs them on a thread of its own until
    ``stop()``. Database errors never kill the thread: it logs, backs off
    with jitter from ``BACKOFF_MIN`` to ``backoff_max`` seconds, keeps its
    cursor, and keeps answering timed-out viewers from memory meanwhile
    (the store raises :class:`~service.common.errors.StoreUnavailable`);
    any other error ends the pass, not the thread. The hub that starts a
    poller stops and joins it.
    """

    def __init__(self, feed, store, *, interval, clock=time.monotonic, backoff_max=5.0,
                 batch=None, rng=random.random, on_query=None):
        self.feed = feed
        self._store = store
        self._interval = interval
        self._clock = clock
        self._backoff = Backoff(BACKOFF_MIN, backoff_max, rng=rng)
        self._batch = batch or feed.window_size
        self._wake = threading.Event()
        #: Seconds between queries; None queries on every pass.
        self._query_interval = None
        self._next_query = 0.0
        #: Set by wake(): the next pass queries, however soon.
        self._poked = False
        #: Set by deliver(): viewers a writer woke wait for this thread.
        self._delivering = False
        self._stopping = False
        self._thread = None
        self._retry_at = 0.0
        #: ``clock()`` when the store last answered (or the poller began):
        #: its age is what ``/healthz`` reports as staleness.
        self.last_ok = clock()
        #: ``on_query(seconds, failed)`` after each poll; called on this
        #: thread, one per content, so it may take a lock (metrics).
        self._on_query = on_query
        # A hold whose wait ends before this thread's next wake-up wakes it
        # to sleep again with that deadline in view.
        feed.on_sooner_deadline = self._wake.set

    @property
    def failures(self):
        """Consecutive failed polls; 0 when the store answers."""
        return self._backoff.failures

    def poll_once(self):
        """Fetch and publish what changed since the feed's cursor."""
        while True:
            changes = self._store.changes_since(
                self.feed.content_id, self.feed.last_seq, self._batch
            )
            self.feed.publish(changes)
            if len(changes) < self._batch:
                return

    def tick(self):
        """One pass: poll if due and not backing off, then answer expired holds."""
        self.feed.deliver_pending()
        now = self._clock()
        due = self._poked or self._query_interval is None or now >= self._next_query
        if due and now >= self._retry_at:
            # Cleared before the query, so a poke during it is not lost.
            self._poked = False
            self._next_query = now + (self._query_interval or 0.0)
            started = time.perf_counter()
            try:
                self.poll_once()
            except StoreUnavailable as exc:
                self._observe(started, True)
                delay = self._backoff.failed()
                self._retry_at = now + delay
                logger.warning("content %s: poll failed (%s); retrying in %.2f s",
                               self.feed.content_id, exc, delay)
            else:
                self._observe(started, False)
                if self._backoff.succeeded():
                    logger.info("content %s: polling again", self.feed.content_id)
                self.last_ok = self._clock()
        self.feed.expire(self._clock())

    def age(self, now):
        """Seconds since the store last answered this poller."""
        return max(0.0, now - self.last_ok)

    def _observe(self, started, failed):
        if self._on_query is not None:
            self._on_query(time.perf_counter() - started, failed)

    def wake(self):
        """Poll now: the content has just changed, here or elsewhere.

        A committed change also proves the database is back, so a poller
        backing off stops waiting out its pause (followers resume at once).
        """
        self._retry_at = 0.0
        self._poked = True
        self._wake.set()

    def set_query_interval(self, seconds):
        """Query every ``seconds`` (None: every pass), starting with one now."""
        self._query_interval = seconds
        self.wake()

    def deliver(self):
        """Answer the viewers a writer of this process has woken (no query)."""
        self._delivering = True
        self._wake.set()

    def start(self):
        self._thread = threading.Thread(
            target=self._run, name=f"livecomments-poller-{self.feed.content_id}", daemon=True
        )
        self._thread.start()

    def stop(self):
        """Ask the thread to finish; :meth:`join` waits for it."""
        self._stopping = True
        self._wake.set()

    def join(self, timeout=None):
        """Wait for the thread to end; True if it has (or never started)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self):
        while not self._stopping:
            # Cleared before the pass, so a poke during it is not lost.
            self._wake.clear()
            run_pass(self.tick, logger, f"content {self.feed.content_id}: poller")
            wait = self._interval
            if self.failures:
                wait = max(0.0, min(wait, self._retry_at - self._clock()))
            pass_due = time.monotonic() + wait
            while True:
                timeout = pass_due - time.monotonic()
                held_until = self.feed.next_deadline()
                if held_until is not None:
                    timeout = min(timeout, held_until - self._clock() + TIMEOUT_SLACK)
                if self._wake.wait(max(0.0, timeout)):
                    if self._poked or self._stopping:
                        break  # a pass is due now
                    self._wake.clear()
                    if self._poked or self._stopping:
                        break  # came as the event was cleared
                    if self._delivering:
                        # Woken for a delivery: answer, then sleep out the interval.
                        self._delivering = False
                        self.feed.deliver_pending()
                    # Else a hold's deadline came sooner: sleep again with it in view.
                elif time.monotonic() >= pass_due:
                    break
                else:
                    # A held viewer's wait ran out: its timeout is answered
                    # now, not at the next pass (which also queries).
                    self.feed.expire(self._clock())
        self.feed.close()
