"""One content's recent changes in memory, and the viewers held on them.

The wake path is built on facts measured in this process model: a
thousand woken threads that each re-take a shared lock drain at about 200
a second, so

* each held viewer waits on an :class:`threading.Event` of its own (the
  predicate loop is the Event's), not on one shared Condition;
* the waker (the content's poller thread) encodes each distinct page once
  and hands the same bytes to every viewer at that cursor;
* the waker frees the viewers' hold slots in one step; a woken viewer
  takes no shared lock on its way out.

Timeouts and vanished clients are answered by the poller too, so a thousand
viewers that arrived together and time out together are one batch as well.
"""

from __future__ import annotations

import bisect
import threading

from cachetools import LRUCache

from .pages import encode_page

#: Distinct encoded pages kept per content between two changes.
PAGE_CACHE_SIZE = 256


class Waiter:
    """A viewer held on a feed until :attr:`body` is set and :attr:`event` fires."""

    __slots__ = ("since", "limit", "deadline", "disconnected", "event", "body")

    def __init__(self, since, limit, deadline, disconnected=None):
        self.since = since
        self.limit = limit
        self.deadline = deadline
        self.disconnected = disconnected
        self.event = threading.Event()
        #: The answer; None after a wake means "not in memory, read the store".
        self.body = None


class Feed:
    """A window of a content's latest changes and the viewers waiting past it.

    The window holds every change with seq in ``(floor, last_seq]`` as the
    store has it now: a comment later deleted is replaced by its tombstone,
    so a moderated body is not served again from memory. Only the feed's
    poller calls :meth:`publish` and :meth:`expire`.
    """

    def __init__(self, content_id, changes, floor, *, window_size, release):
        """``changes``: every change with seq above ``floor``, ascending."""
        self.content_id = content_id
        self.window_size = window_size
        self._release = release
        self._lock = threading.Lock()
        # Writers of this process wait on it for the poller to pass their
        # change (read-your-writes); viewers never do.
        self._advanced = threading.Condition(self._lock)
        self._window = list(changes)
        self._floor = floor
        self.last_seq = self._window[-1].seq if self._window else floor
        self._trim()
        #: (since, limit) -> waiters at that cursor.
        self._waiters = {}
        self._pages = LRUCache(PAGE_CACHE_SIZE)

    @property
    def held(self):
        with self._lock:
            return sum(len(group) for group in self._waiters.values())

    # -- request threads ---------------------------------------------------

    def page_after(self, since, limit):
        """Encoded changes after ``since``, or None if they left the window."""
        key = (since, limit)
        with self._lock:
            body = self._pages.get(key)
            if body is not None:
                return body
            if since < self._floor:
                return None
            version = self.last_seq
            start = bisect.bisect_right(self._window, since, key=_seq)
            changes = self._window[start:start + limit]
        cursor = changes[-1].seq if changes else since
        body = encode_page(self.content_id, changes, cursor)
        self._remember(version, key, body)
        return body

    def latest_page(self, limit, *, reset=False):
        """The newest ``limit`` live comments, or None if the window lacks them."""
        key = ("latest", limit, reset)
        with self._lock:
            body = self._pages.get(key)
            if body is not None:
                return body
            version = self.last_seq
            live = []
            for change in reversed(self._window):
                if not change.deleted:
                    live.append(change)
                    if len(live) == limit:
                        break
            if len(live) < limit and self._floor > 0:
                return None
        body = encode_page(self.content_id, live[::-1], version, reset=reset)
        self._remember(version, key, body)
        return body

    def remember_page(self, key, body, version):
        """Cache a page read from the store until the next change.

        ``version`` is :attr:`last_seq` from before the read: a page that a
        change published meanwhile may have overtaken (a deletion, say) is
        not kept.
        """
        self._remember(version, key, body)

    def wait_for(self, seq, timeout):
        """Wait until the feed has published ``seq``; False on timeout."""
        with self._advanced:
            return self._advanced.wait_for(lambda: self.last_seq >= seq, timeout)

    def hold(self, since, limit, deadline, disconnected=None):
        """Register a viewer at ``since``; None if a change already passed it."""
        with self._lock:
            if self.last_seq > since:
                return None
            waiter = Waiter(since, limit, deadline, disconnected)
            self._waiters.setdefault((since, limit), []).append(waiter)
            return waiter

    def cancel(self, waiter):
        """Take a waiter back; False if a waker has already taken it."""
        with self._lock:
            group = self._waiters.get((waiter.since, waiter.limit))
            if group is None or waiter not in group:
                return False
            group.remove(waiter)
            if not group:
                del self._waiters[(waiter.since, waiter.limit)]
            return True

    # -- the poller --------------------------------------------------------

    def publish(self, changes):
        """Add changes (ascending seq, all after ``last_seq``) and wake viewers."""
        if not changes:
            return 0
        with self._lock:
            for change in changes:
                if change.deleted:
                    self._window = [c for c in self._window if c.id != change.id]
                self._window.append(change)
            self.last_seq = changes[-1].seq
            self._advanced.notify_all()
            self._trim()
            self._pages.clear()
            ready = [key for key in self._waiters if key[0] < self.last_seq]
            groups = [(key, self._waiters.pop(key)) for key in ready]
        return self._deliver(groups)

    def expire(self, now):
        """Answer viewers whose hold ran out or whose client went away."""
        with self._lock:
            if not self._waiters:
                return 0
            snapshot = [w for group in self._waiters.values() for w in group]
        leaving = [
            w for w in snapshot
            if w.deadline <= now or (w.disconnected is not None and w.disconnected())
        ]
        if not leaving:
            return 0
        leaving = set(leaving)
        groups = []
        with self._lock:
            # One pass per cursor: a thousand viewers timing out together
            # must not cost a thousand list searches under the lock.
            for key in {(w.since, w.limit) for w in leaving}:
                group = self._waiters.get(key)
                if group is None:
                    continue  # a publish has answered them meanwhile
                gone = [w for w in group if w in leaving]
                kept = [w for w in group if w not in leaving]
                if kept:
                    self._waiters[key] = kept
                else:
                    del self._waiters[key]
                if gone:
                    groups.append((key, gone))
        return self._deliver(groups)

    def close(self):
        """Answer every held viewer now (the feed is going away)."""
        with self._lock:
            groups = list(self._waiters.items())
            self._waiters.clear()
        self._deliver(groups)

    def _deliver(self, groups):
        delivered = 0
        for (since, limit), waiters in groups:
            body = self.page_after(since, limit)
            for waiter in waiters:
                waiter.body = body
            delivered += len(waiters)
        if delivered:
            self._release(delivered)
        for _, waiters in groups:
            for waiter in waiters:
                waiter.event.set()
        return delivered

    def _trim(self):
        excess = len(self._window) - self.window_size
        if excess > 0:
            self._floor = self._window[excess - 1].seq
            del self._window[:excess]

    def _remember(self, version, key, body):
        with self._lock:
            if self.last_seq == version:
                self._pages[key] = body


def _seq(change):
    return change.seq
