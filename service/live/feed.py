"""One content's recent changes in memory, and the viewers held on them.

The wake path is built on facts measured in this process model (see
``docs/design.md``): a thousand woken threads that each re-take a shared
lock drain at about 200 a second, so

* each held viewer waits on an :class:`threading.Event` of its own (the
  predicate loop is the Event's), not on one shared Condition;
* the waker (the content's poller thread, also for the changes a writer
  of this process put in the feed) encodes each distinct page once and
  hands the same bytes to every viewer at that cursor;
* the waker frees the viewers' hold slots in one step; a woken viewer
  takes no shared lock on its way out.

Timeouts and vanished clients are answered by the poller too, so a thousand
viewers that arrived together and time out together are one batch as well.

The feed also keeps the pages it has encoded, until the next change: the
keys and their versioning live here alone, so a page read from the store
that a change overtook (a deletion, say) is never kept.

Beside its window the feed keeps the content's room (closed, slow mode,
pinned comment): loaded with the feed, then replaced by each ``room`` event
that passes, so every page carries the room as of its feed state. Events
(``is_comment`` false) are changes like comments: each has its seq, wakes
the viewers behind it and is answered in the pages' ``events``.
"""

from __future__ import annotations

import bisect
import heapq
import threading
import time
from collections import Counter, deque

from cachetools import LRUCache

from .pages import Kind, Page, answer_kind, open_room

#: A feed is busy while changes have arrived at this many moments within
#: :data:`BUSY_WINDOW` seconds (each publish is one: a ban retracting forty
#: comments is one burst, answered once): 5 a second is a chat scrolling
#: faster than one reads, where a pause between answers costs nothing.
BUSY_WAKES = 5
BUSY_WINDOW = 1.0
#: Distinct encoded pages kept per content between two changes. Viewers
#: of one content sit at a handful of cursors (the newest, and a few pages
#: of catch-up); 256 covers every limit at several cursors.
PAGE_CACHE_SIZE = 256


class Waiter:
    """A viewer held on a feed until :attr:`page` is set and :attr:`event` fires."""

    __slots__ = ("since", "limit", "deadline", "disconnected", "budgeted", "event", "page")

    def __init__(self, since, limit, deadline, disconnected=None, budgeted=True, event=None):
        self.since = since
        self.limit = limit
        self.deadline = deadline
        self.disconnected = disconnected
        #: False for a stream's inner hold: its slot is the stream's, kept
        #: for the stream's life, so the waker neither frees nor counts it.
        self.budgeted = budgeted
        #: Set when answered. A read of several feeds holds one waiter on
        #: each, sharing one event: the first feed to answer wakes it.
        self.event = threading.Event() if event is None else event
        #: The answer (a :class:`~service.live.pages.Page`); None after a wake
        #: means "not in memory: read it with :meth:`Feed.page_after`".
        self.page = None


class Feed:
    """A window of a content's latest changes and the viewers waiting past it.

    The window holds every change with seq in ``(floor, last_seq]`` as the
    store has it now: a comment later deleted is replaced by its tombstone,
    so a moderated body is not served again from memory, and a ``room``
    event by the next one (the room it carries is whole). The feed's poller
    calls :meth:`publish` and :meth:`expire`; a writer of this process calls
    :meth:`publish_next` with the change it has just committed; ``store``
    answers the reads that reach below the window.
    """

    def __init__(self, content_id, changes, floor, *, window_size, settle, store,
                 idle_poll_after_ms=0, room=None, closed_poll_after_ms=0, busy_pace_ms=0,
                 clock=time.monotonic):
        """``changes``: every change with seq above ``floor``, ascending.

        ``settle({kind: count})`` is called once per batch of answered
        viewers: it frees their hold slots and counts the answers. A hold
        that ends empty asks its viewers to pause ``idle_poll_after_ms``.
        ``room``: the content's room (JSON-ready; None: never moderated),
        read no later than ``changes`` (a ``room`` event among them wins);
        while it is closed every page asks ``closed_poll_after_ms``. While
        the feed is busy (:data:`BUSY_WAKES` within :data:`BUSY_WINDOW`
        by ``clock``) every page with changes asks ``busy_pace_ms``.
        """
        self.content_id = content_id
        self.window_size = window_size
        self._settle = settle
        self._store = store
        self._idle_poll_after_ms = idle_poll_after_ms
        self._closed_poll_after_ms = closed_poll_after_ms
        self._busy_pace_ms = busy_pace_ms
        self._clock = clock
        #: When the latest changes arrived (``clock()``, one per publish),
        #: the newest last.
        self._arrivals = deque(maxlen=BUSY_WAKES)
        self._lock = threading.Lock()
        # Writers of this process wait on it for the poller to pass their
        # change (read-your-writes); viewers never do.
        self._advanced = threading.Condition(self._lock)
        #: The content's room as of ``last_seq`` (JSON-ready; replaced, never
        #: changed in place). Read with ``last_seq`` under the lock.
        self.room = open_room() if room is None else room
        self._window = []
        for change in changes:
            self._put(change)
        self._floor = floor
        self.last_seq = self._window[-1].seq if self._window else floor
        self._trim()
        #: (since, limit) -> the waiters at that cursor, as a dict used as an
        #: ordered set: a reader of several feeds woken by one takes its
        #: waiters back from the others, and a thousand such readers at one
        #: cursor must not cost a thousand list searches under the lock.
        self._waiters = {}
        #: A heap of the held viewers' deadlines (some of viewers answered
        #: since: popped once past), so the poller wakes when one runs out.
        self._deadlines = []
        #: Called (by a hold, no lock held) when a deadline comes sooner than
        #: any before it: the poller's, to shorten the sleep it is in.
        self.on_sooner_deadline = None
        #: page key -> Page, for the current ``last_seq`` only.
        self._pages = LRUCache(PAGE_CACHE_SIZE)
        #: Waiter groups a writer's publish_next took, for the poller to wake.
        self._pending = []

    @classmethod
    def load(cls, store, content_id, *, window_size, settle, idle_poll_after_ms=0,
             closed_poll_after_ms=0, busy_pace_ms=0, clock=time.monotonic):
        """A feed holding the content's latest ``window_size`` changes, and its room.

        The room is read before the changes: a room change committed in
        between is among them (or the poller's next query), so the feed's
        room is never ahead of its changes, at most behind until it passes.
        """
        floor = max(0, store.current_seq(content_id) - window_size)
        room = store.room(content_id).to_json()
        changes = store.changes_since(content_id, floor, window_size)
        return cls(content_id, changes, floor, window_size=window_size, settle=settle,
                   store=store, idle_poll_after_ms=idle_poll_after_ms, room=room,
                   closed_poll_after_ms=closed_poll_after_ms, busy_pace_ms=busy_pace_ms,
                   clock=clock)

    @property
    def held(self):
        with self._lock:
            return sum(len(group) for group in self._waiters.values())

    @property
    def closed(self):
        """Whether the content is closed, as this feed knows it."""
        return bool(self.room["closed"])

    def page(self, kind, cursor, *, poll_after_ms=0):
        """An empty page at ``cursor`` (a shed answer, say), with the room."""
        return self._encode(kind, (), cursor, self.room, poll_after_ms)

    def _encode(self, kind, changes, cursor, room, poll_after_ms=0):
        if changes:
            poll_after_ms = max(poll_after_ms, self.pace_ms())
        return Page.encode(kind, self.content_id, changes, cursor, room=room,
                           poll_after_ms=poll_after_ms,
                           closed_poll_after_ms=self._closed_poll_after_ms)

    def pace_ms(self):
        """The pause a page with changes asks now: ``busy_pace_ms`` while
        the feed is busy, else 0. Pages are encoded once per feed state,
        so every viewer of one page is asked the same."""
        arrivals = self._arrivals
        if self._busy_pace_ms and len(arrivals) == arrivals.maxlen:
            try:
                if self._clock() - arrivals[0] < BUSY_WINDOW:
                    return self._busy_pace_ms
            except IndexError:  # emptied meanwhile: not busy
                pass
        return 0

    # -- request threads ---------------------------------------------------

    def page_after(self, since, limit):
        """The next ``limit`` changes after ``since`` (a catch-up page).

        From memory within the window; below it, one store read, kept for
        the viewers behind this one.
        """
        with self._lock:
            version, room = self.last_seq, self.room
        page = self._window_page(since, limit)
        if page is None:
            changes = self._store.changes_since(self.content_id, since, limit)
            cursor = changes[-1].seq if changes else since
            page = self._encode(Kind.CATCH_UP, changes, cursor, room)
            self._remember(version, (since, limit), page)
        return page

    def latest_page(self, limit, kind=Kind.LATEST):
        """The newest ``limit`` live comments (no events: the room says what
        they amount to), as a latest or a reset page (``kind``, as
        :func:`~service.live.pages.answer_kind` decided)."""
        key = (kind, limit)
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                return page
            version, room = self.last_seq, self.room
            live = []
            for change in reversed(self._window):
                if change.is_comment and not change.deleted:
                    live.append(change)
                    if len(live) == limit:
                        break
            complete = len(live) == limit or self._floor == 0
        if complete:
            page = self._encode(kind, live[::-1], version, room)
        else:  # the window has fewer live comments than asked: the store has them
            comments, cursor = self._store.latest(self.content_id, limit)
            page = self._encode(kind, comments, cursor, room)
        self._remember(version, key, page)
        return page

    def wait_for(self, seq, timeout):
        """Wait until the feed has published ``seq``; False on timeout."""
        with self._advanced:
            return self._advanced.wait_for(lambda: self.last_seq >= seq, timeout)

    def hold(self, since, limit, deadline, disconnected=None, *, budgeted=True, event=None):
        """Register a viewer at ``since``; None if a change already passed it.
        ``event``: the one a read of several feeds shares (see :class:`Waiter`)."""
        with self._lock:
            if self.last_seq > since:
                return None
            waiter = Waiter(since, limit, deadline, disconnected, budgeted, event)
            self._waiters.setdefault((since, limit), {})[waiter] = None
            heapq.heappush(self._deadlines, deadline)
            sooner = self._deadlines[0] == deadline
        if sooner and self.on_sooner_deadline is not None:
            self.on_sooner_deadline()
        return waiter

    def next_deadline(self):
        """The earliest deadline of a held viewer, or None: when the
        poller must pass by to answer a timeout on time."""
        with self._lock:
            if not self._waiters:
                self._deadlines.clear()
                return None
            return self._deadlines[0] if self._deadlines else None

    def cancel(self, waiter):
        """Take a waiter back; False if a waker has already taken it."""
        with self._lock:
            group = self._waiters.get((waiter.since, waiter.limit))
            if group is None or group.pop(waiter, False) is not None:
                return False
            if not group:
                del self._waiters[(waiter.since, waiter.limit)]
            return True

    # -- the poller --------------------------------------------------------

    def publish(self, changes):
        """Add changes (ascending seq: every change after the ``last_seq`` the
        store was asked from) and wake viewers. Changes a writer has published
        meanwhile are skipped."""
        if not changes:
            return 0
        with self._lock:
            changes = [change for change in changes if change.seq > self.last_seq]
            if not changes:
                return 0
            groups = self._add(changes)
        return self._deliver(groups)

    def publish_next(self, change):
        """Add a change this process has just committed, if it is the next
        one (``last_seq + 1``); True once the feed has it. The viewers it
        wakes are the poller's to answer (:meth:`deliver_pending`), so that
        a write to a content a thousand watch is not answered after them.

        Seq order is commit order, so every change before it is committed
        and, with ``last_seq`` just below it, already here: nothing can be
        skipped. A change further ahead is left to the poller.
        """
        with self._lock:
            if change.seq <= self.last_seq:
                return True
            if change.seq != self.last_seq + 1:
                return False
            self._pending.extend(self._add([change]))
        return True

    def deliver_pending(self):
        """Answer the viewers a writer's :meth:`publish_next` woke (the poller)."""
        with self._lock:
            if not self._pending:
                return 0
            groups, self._pending = self._pending, []
        return self._deliver(groups)

    def _add(self, changes):
        """Put ``changes`` in the window (lock held); the waiter groups to wake."""
        for change in changes:
            self._put(change)
        self._arrivals.append(self._clock())
        self.last_seq = changes[-1].seq
        self._advanced.notify_all()
        self._trim()
        self._pages.clear()
        ready = [key for key in self._waiters if key[0] < self.last_seq]
        return [(key, self._waiters.pop(key)) for key in ready]

    def expire(self, now):
        """Answer viewers whose hold ran out or whose client went away."""
        with self._lock:
            while self._deadlines and self._deadlines[0] <= now:
                heapq.heappop(self._deadlines)
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
                kept = {w: None for w in group if w not in leaving}
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
            groups = list(self._waiters.items()) + self._pending
            self._waiters.clear()
            self._pending = []
        self._deliver(groups)

    def _deliver(self, groups):
        answered = Counter()
        for (since, limit), waiters in groups:
            # Memory only: the poller never waits on the store for a viewer.
            page = self._window_page(since, limit)
            if page is not None:
                page = page.after_hold(self._idle_poll_after_ms)
                kind = page.kind
            else:
                # Not in memory, so read by the woken viewer: a change did
                # pass its cursor, and it counts as that hold's end.
                kind = answer_kind(changes=True, held=True)
            for waiter in waiters:
                waiter.page = page
            budgeted = sum(1 for waiter in waiters if waiter.budgeted)
            if budgeted:
                answered[kind] += budgeted
        if answered:
            self._settle(answered)
        delivered = 0
        for _, waiters in groups:
            delivered += len(waiters)
            for waiter in waiters:
                waiter.event.set()
        return delivered

    def _put(self, change):
        """Append ``change`` to the window (lock held, or the constructor's):
        it replaces what it supersedes, and a room event replaces the room."""
        if change.is_comment:
            if change.deleted:  # a tombstone: the body is gone from memory too
                self._window = [c for c in self._window
                                if not (c.is_comment and c.id == change.id)]
        elif change.type == "room":  # whole: the newest says all the older did
            self._window = [c for c in self._window if c.is_comment or c.type != "room"]
            self.room = change.data["room"]
        self._window.append(change)

    def _window_page(self, since, limit):
        """The catch-up page from memory, or None if it left the window."""
        key = (since, limit)
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                return page
            if since < self._floor:
                return None
            version, room = self.last_seq, self.room
            start = bisect.bisect_right(self._window, since, key=_seq)
            changes = self._window[start:start + limit]
        cursor = changes[-1].seq if changes else since
        page = self._encode(Kind.CATCH_UP, changes, cursor, room)
        self._remember(version, key, page)
        return page

    def _trim(self):
        excess = len(self._window) - self.window_size
        if excess > 0:
            self._floor = self._window[excess - 1].seq
            del self._window[:excess]

    def _remember(self, version, key, page):
        # A page built from a state a change has since overtaken is not kept.
        with self._lock:
            if self.last_seq == version:
                self._pages[key] = page


def _seq(change):
    return change.seq
