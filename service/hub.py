"""The long-poll: which feed answers, from memory or the store, now or held.

:class:`FeedHub` owns this process's feeds and their pollers (a poller per
watched content, stopped when its feed expires) and the hold budget shared
by every held request.
"""

from __future__ import annotations

import logging
import threading
import time

from cachetools import TTLCache

from .feed import Feed
from .pages import encode_page, read_page
from .poller import Poller

logger = logging.getLogger(__name__)


#: Longest a write waits for its poller to publish it (read-your-writes).
WRITE_VISIBLE_TIMEOUT = 1.0


class HoldBudget:
    """Counts held requests against a limit below the thread count."""

    def __init__(self, limit):
        self.limit = limit
        self._held = 0
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


class _PollerCache(TTLCache):
    """content id -> Poller; a poller leaving the cache is told to stop."""

    def __init__(self, *args, on_evict, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_evict = on_evict

    def expire(self, time=None):
        expired = super().expire(time)
        for _, poller in expired:
            self._on_evict(poller)
        return expired

    def popitem(self):
        key, poller = super().popitem()
        self._on_evict(poller)
        return key, poller

    def clear(self):
        # cachetools >= 6 clears without popitem(), which would leave the
        # pollers running: pop them one by one so each is told to stop.
        while True:
            try:
                self.popitem()
            except KeyError:
                return


class FeedHub:
    """Answers feed reads for one process; see ``read``."""

    def __init__(self, store, settings, *, clock=time.monotonic, start_pollers=True):
        self._store = store
        self._settings = settings
        self._clock = clock
        self._start_pollers = start_pollers
        self.budget = HoldBudget(settings.hold_budget)
        # A viewer whose poller is late (stuck on the database) stops
        # waiting for it this long after its deadline and answers itself.
        self._grace = max(1.0, 2 * settings.poll_interval)
        self._lock = threading.Lock()
        self._retired = []
        self._pollers = _PollerCache(
            settings.max_feeds, settings.feed_ttl, timer=clock, on_evict=self._retire
        )

    # -- feeds and pollers -------------------------------------------------

    def feed(self, content_id):
        """The content's feed, loaded and polled from its first viewer on."""
        poller = self._touch(content_id)
        if poller is not None:
            return poller.feed
        feed = self._load(content_id)  # store I/O, outside the lock
        with self._lock:
            poller = self._pollers.get(content_id)
            if poller is None:
                poller = Poller(
                    feed, self._store, interval=self._settings.poll_interval,
                    clock=self._clock, on_tick=self.expire_feeds,
                )
                if self._start_pollers:
                    poller.start()
            self._pollers[content_id] = poller
            return poller.feed

    def pollers(self):
        with self._lock:
            return list(self._pollers.values())

    def notify(self, content_id, seq):
        """This process committed change ``seq``: its poller should look now.

        Returns once the feed has it (or after a second), so a writer that
        reads right after its 201 or 204 sees its own change.
        """
        with self._lock:
            poller = self._pollers.get(content_id)
        if poller is not None:
            poller.wake()
            poller.feed.wait_for(seq, WRITE_VISIBLE_TIMEOUT)

    def expire_feeds(self):
        with self._lock:
            self._pollers.expire()

    def status(self):
        return {"held": self.budget.held, "hold_budget": self.budget.limit,
                "feeds": len(self._pollers)}

    def close(self, timeout=5.0):
        """Stop every poller, answer held viewers, and join the threads."""
        with self._lock:
            self._pollers.clear()
            pollers, self._retired = self._retired, []
        deadline = time.monotonic() + timeout
        for poller in pollers:
            poller.stop()
        for poller in pollers:
            if not poller.join(max(0.0, deadline - time.monotonic())):
                logger.warning("poller of content %s did not stop", poller.feed.content_id)

    def _touch(self, content_id):
        with self._lock:
            poller = self._pollers.get(content_id)
            if poller is not None:
                self._pollers[content_id] = poller  # renews its time to live
            return poller

    def _retire(self, poller):
        poller.stop()
        self._retired = [p for p in self._retired if not p.join(0)]
        self._retired.append(poller)

    def _load(self, content_id):
        window = self._settings.feed_window
        floor = max(0, self._store.current_seq(content_id) - window)
        changes = self._store.changes_since(content_id, floor, window)
        return Feed(content_id, changes, floor, window_size=window, release=self.budget.release)

    # -- reads -------------------------------------------------------------

    def read(self, query, disconnected=None):
        """Answer a feed read; hold it if there is nothing new yet."""
        feed = self.feed(query.content_id)
        since, limit = query.since, query.limit
        if since is None:
            return self._latest(feed, limit)
        last = feed.last_seq
        if since > last:
            # Ahead of this process: another may have seen newer changes
            # already. Ahead of the database: it was replaced; start over.
            if since > self._store.current_seq(feed.content_id):
                return self._latest(feed, limit, reset=True)
        elif last - since > self._settings.reset_after:
            # A device back from hours offline wants now, not everything.
            return self._latest(feed, limit, reset=True)
        elif since < last:
            return self._page_after(feed, since, limit)
        if query.wait == 0:
            return feed.page_after(since, limit)
        return self._hold(feed, since, limit, query.wait, disconnected)

    def _hold(self, feed, since, limit, wait, disconnected):
        if not self.budget.try_acquire():
            # Queueing for a thread would stall writes behind holds:
            # tell the client when to come back instead.
            return encode_page(
                feed.content_id, [], since, poll_after_ms=self._settings.shed_poll_after_ms
            )
        waiter = feed.hold(since, limit, self._clock() + wait, disconnected)
        if waiter is None:
            self.budget.release()
            return self._page_after(feed, since, limit)
        if not waiter.event.wait(wait + self._grace):
            if feed.cancel(waiter):
                self.budget.release()
            else:
                waiter.event.wait(self._grace)  # a waker has it in hand
        return waiter.body or self._page_after(feed, since, limit)

    def _page_after(self, feed, since, limit):
        version = feed.last_seq
        body = feed.page_after(since, limit)
        if body is None:  # older than the window: one store read
            body = read_page(
                self._store, feed.content_id, since, limit,
                reset_after=self._settings.reset_after,
            )
            feed.remember_page((since, limit), body, version)
        return body

    def _latest(self, feed, limit, reset=False):
        version = feed.last_seq
        body = feed.latest_page(limit, reset=reset)
        if body is None:
            comments, cursor = self._store.latest(feed.content_id, limit)
            body = encode_page(feed.content_id, comments, cursor, reset=reset)
            feed.remember_page(("latest", limit, reset), body, version)
        return body
