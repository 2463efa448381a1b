"""The long-poll: which feed answers, from memory or the store, now or held.

:class:`FeedHub` owns this process's feeds and their pollers (a poller per
watched content), the sweeper thread that retires the feeds nobody watches,
and the hold budget shared by every held request. It answers
:class:`FeedQuery` values with :class:`~service.live.pages.Page` values and
knows nothing of HTTP.

A closed content is read like any other: a long-poll at its newest change
is held (a moderator reopening it wakes it, as the change closing it woke
the viewers held then); only its pages ask a long pause
(``closed_poll_after_ms``), so its clients stop asking meanwhile.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from cachetools import TTLCache

from ..common.retry import run_pass
from .budget import HoldBudget
from .feed import Feed
from .many import ManyFeeds
from .pages import Kind, answer_kind, idle_poll_after_ms
from .poller import Poller

logger = logging.getLogger(__name__)

#: Seconds between the sweeper's passes. An unwatched feed (and its
#: poller) outlives its time to live by at most this; a pass is cheap.
SWEEP_INTERVAL = 1.0
#: Seconds between two renewals of a watched feed's time to live: a read
#: of 50 feeds renewing each one every time spent half its time there, and
#: a feed's life (a minute or more) does not need it finer.
TOUCH_INTERVAL = 1.0
#: Delivery samples kept for the metrics thread to drain (about a second's
#: worth at the most a process delivers); beyond it the oldest are dropped.
WOKEN_SAMPLES = 100_000
#: Stale pollers ``/healthz`` names (the oldest): one stuck database
#: connection shows; 10,000 feeds on a dead database do not make a huge answer.
STALE_LISTED = 20


class Draining(Exception):
    """The hub is closed: the server is stopping and holds nothing new."""


@dataclass(frozen=True, slots=True)
class FeedQuery:
    """A feed read: changes of ``content_id`` after ``since`` (None: the
    latest page), at most ``limit``, held up to ``wait`` seconds."""

    content_id: int
    since: int | None = None
    limit: int = 50
    wait: float = 0


class _Loading:
    """One feed load under way, for the viewers waiting on it."""

    __slots__ = ("_done", "_feed", "_error")

    def __init__(self):
        self._done = threading.Event()
        self._feed = self._error = None

    def done(self, feed):
        self._feed = feed
        self._done.set()

    def fail(self, error):
        self._error = error
        self._done.set()

    def result(self):
        """The loaded feed; raises what the load raised (a 503, say)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._feed


class _PollerCache(TTLCache):
    """content id -> Poller; a poller leaving the cache is handed to ``on_evict``."""

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
        # pollers running: pop them one by one so each is handed over.
        while True:
            try:
                self.popitem()
            except KeyError:
                return


class FeedHub:
    """Answers feed reads for one process; see :meth:`read`.

    Lifecycle: :meth:`start` starts the sweeper; the hub starts a poller
    per watched content; :meth:`close` stops and joins them all. Tests pass
    ``start_threads=False`` and drive :meth:`expire_feeds` and the pollers'
    ``tick()`` themselves.
    """

    def __init__(self, store, settings, *, clock=time.monotonic, start_threads=True):
        self._store = store
        self._settings = settings
        self._clock = clock
        self.settings, self.clock = settings, clock  # for the reads of several feeds
        self._start_threads = start_threads
        self.budget = HoldBudget(settings.hold_budget, settings.max_streams)
        # A viewer whose poller is late (stuck on the database) stops
        # waiting for it this long after its deadline and answers itself.
        self.grace = max(1.0, 2 * settings.poll_interval)
        # An empty answer a cache in front may keep asks its clients to
        # pause while it does (0 without one).
        self.idle_poll_after_ms = idle_poll_after_ms(settings)
        self._many = ManyFeeds(self)
        self._lock = threading.Lock()
        self._closed = False
        #: Pollers told to stop and not joined yet; the sweeper joins them.
        self._retiring = []
        #: content id -> the one load of its feed under way (see feed()).
        self._loading = {}
        self._pollers = _PollerCache(
            settings.max_watched, settings.feed_ttl, timer=clock, on_evict=self._retire
        )
        self._stop_sweeping = threading.Event()
        self._sweeper = None
        #: (time.time(), page) for each hold a change ended, appended by the
        #: woken thread (a deque append takes no lock the others wait on)
        #: and drained by the metrics thread.
        self.woken = deque(maxlen=WOKEN_SAMPLES)
        #: ``on_query(seconds, failed)`` after each poller query (metrics).
        self.on_query = None
        #: NOTIFYs heard; counted by the one listener thread alone.
        self.notify_wakes = 0
        #: Whether this process hears NOTIFY: None (no listener), False, True.
        self._listening = None

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        """Start the sweeper (a no-op for hubs built without threads)."""
        if self._start_threads and self._sweeper is None:
            self._sweeper = threading.Thread(
                target=self._sweep, name="livecomments-sweeper", daemon=True
            )
            self._sweeper.start()

    def close(self, timeout=5.0):
        """Refuse new reads, answer held viewers, stop and join every thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pollers.clear()
            retiring, self._retiring = self._retiring, []
        self._stop_sweeping.set()
        deadline = time.monotonic() + timeout
        if self._sweeper is not None:
            self._sweeper.join(timeout)
        for poller in _join_all(retiring, deadline):
            logger.warning("poller of content %s did not stop", poller.feed.content_id)
        for poller in retiring:
            poller.feed.close()  # held viewers of never-started pollers too

    @property
    def closed(self):
        return self._closed

    def expire_feeds(self):
        """Retire the feeds nobody asked for within their time to live."""
        with self._lock:
            self._pollers.expire()
            retiring, self._retiring = self._retiring, []
        unfinished = _join_all(retiring, time.monotonic() + SWEEP_INTERVAL)
        if unfinished:
            with self._lock:
                self._retiring.extend(unfinished)  # joined on a later pass

    def _sweep(self):
        while not self._stop_sweeping.wait(SWEEP_INTERVAL):
            run_pass(self.expire_feeds, logger, "sweeper")

    def _retire(self, poller):
        # Called with the lock held, by the cache: signal only, join later.
        poller.stop()
        self._retiring.append(poller)

    # -- feeds and pollers -------------------------------------------------

    def feed(self, content_id):
        """The content's feed, loaded and polled from its first viewer on.

        One load per content at a time: the first viewers of a popular
        content arrive together, and each loading its own copy would spend
        a database connection apiece (a thousand at once outrun the
        server's connection limit). The rest wait for that one load and
        share its feed, or its error.
        """
        poller = self._touch(content_id)
        if poller is not None:
            return poller.feed
        with self._lock:
            loading = self._loading.get(content_id)
            leader = loading is None
            if leader:
                loading = self._loading[content_id] = _Loading()
        if not leader:
            return loading.result()
        try:
            feed = Feed.load(self._store, content_id, window_size=self._settings.feed_window,
                             settle=self.budget.settle,  # store I/O, outside the lock
                             idle_poll_after_ms=self.idle_poll_after_ms,
                             closed_poll_after_ms=self._settings.closed_poll_after_ms,
                             busy_pace_ms=self._settings.busy_pace_ms, clock=self._clock)
            feed = self._watch(content_id, feed)
        except BaseException as exc:
            loading.fail(exc)
            raise
        else:
            loading.done(feed)
            return feed
        finally:
            with self._lock:
                del self._loading[content_id]

    def _watch(self, content_id, feed):
        """Keep a loaded feed, polled; the feed kept (another may have won)."""
        with self._lock:
            if self._closed:
                raise Draining()
            poller = self._pollers.get(content_id)
            if poller is None:
                poller = Poller(
                    feed, self._store, interval=self._settings.poll_interval,
                    clock=self._clock, backoff_max=self._settings.poll_backoff_max,
                    on_query=self._observe_query,
                )
                # Its first pass queries anyway: a NOTIFY that came while the
                # feed loaded, before the poller was here to be woken, is not lost.
                poller.set_query_interval(self._query_interval())
                if self._start_threads:
                    poller.start()
            poller.touched = self._clock()
            self._pollers[content_id] = poller
            return poller.feed

    def pollers(self):
        with self._lock:
            return list(self._pollers.values())

    def running_pollers(self):
        """Pollers whose thread may still run: the feeds' and the retiring."""
        with self._lock:
            return len(self._pollers) + len(self._retiring)

    def _observe_query(self, seconds, failed):
        if self.on_query is not None:
            self.on_query(seconds, failed)

    def wake(self, content_id):
        """Have the content's poller (if any) query now, backoff or not: a
        change it must fetch itself (a replayed post's, say, which may have
        been deleted since). A NOTIFY goes to :meth:`notified`, a change
        this process committed to :meth:`publish_own`."""
        with self._lock:
            poller = self._pollers.get(content_id)
        if poller is not None:
            poller.wake()

    def notified(self, content_id, seq=None):
        """A NOTIFY said the content changed, to ``seq`` if it says (the
        listener's thread); a feed that has it already (this process's own
        write) does not query for it."""
        self.notify_wakes += 1
        with self._lock:
            poller = self._pollers.get(content_id)
        if poller is not None and (seq is None or poller.feed.last_seq < seq):
            poller.wake()

    def publish_own(self, content_id, change):
        """This process has just committed ``change``: its feed (if any) has
        it at once when it is the next change, with no database round trip,
        and the poller wakes its viewers; else the poller fetches it.
        Returns once the writer's next read would show it (read-your-writes):
        True, or False after ``write_visible_timeout``.
        """
        with self._lock:
            poller = self._pollers.get(content_id)
        if poller is None:
            return True
        if poller.feed.publish_next(change):
            if poller.failures:
                poller.wake()  # a committed write proves the database is back
            else:
                poller.deliver()  # the fan-out is the poller's: this POST answers now
            return True
        poller.wake()
        return poller.feed.wait_for(change.seq, self._settings.write_visible_timeout)

    def listening(self, up):
        """The NOTIFY listener connected (``up``) or lost its connection.

        While it is connected, pollers query only every
        ``notify_poll_interval`` (a NOTIFY wakes them sooner); otherwise
        every ``poll_interval``. Either way every poller queries once now:
        notifications sent while the listener was away are lost.
        """
        with self._lock:
            self._listening = up
            interval = self._query_interval()
            pollers = list(self._pollers.values())
        for poller in pollers:
            poller.set_query_interval(interval)

    def _query_interval(self):
        # None: on every pass of poll_interval. Called with the lock held.
        return self._settings.notify_poll_interval if self._listening else None

    def wait_visible(self, content_id, seq):
        """Wait until this process's feed has change ``seq`` (read-your-writes).

        True once it has, or if nobody here watches the content; False
        after ``write_visible_timeout``.
        """
        with self._lock:
            poller = self._pollers.get(content_id)
        if poller is None:
            return True
        return poller.feed.wait_for(seq, self._settings.write_visible_timeout)

    def status(self):
        notify = {None: "off", False: "down", True: "listening"}[self._listening]
        return {"held": self.budget.held, "hold_budget": self.budget.limit,
                "streams": self.budget.streams, "max_streams": self.budget.stream_limit,
                "feeds": len(self._pollers), "notify": notify, "answers": self.budget.answers(),
                "pollers": self.staleness()}

    def staleness(self):
        """How long since the store answered the pollers: the oldest age,
        and the oldest :data:`STALE_LISTED` pollers past ``stale_after``."""
        now, limit = self._clock(), self._settings.stale_after
        ages = [(poller.age(now), poller.feed.content_id) for poller in self.pollers()]
        stale = [(age, content_id) for age, content_id in ages if age > limit]
        return {"count": len(ages), "stale_after": limit, "stale_count": len(stale),
                "max_age": round(max((age for age, _ in ages), default=0.0), 3),
                "stale": {str(content_id): round(age, 3)
                          for age, content_id in heapq.nlargest(STALE_LISTED, stale)}}

    def _touch(self, content_id):
        with self._lock:
            if self._closed:
                raise Draining()
            poller = self._pollers.get(content_id)
            if poller is not None:
                now = self._clock()
                if now - poller.touched >= TOUCH_INTERVAL:
                    poller.touched = now
                    self._pollers[content_id] = poller  # renews its time to live
            return poller

    # -- reads -------------------------------------------------------------

    def read(self, query, disconnected=None, *, budgeted=True):
        """Answer a :class:`FeedQuery` with a :class:`Page`; hold it if
        there is nothing new yet. Raises :class:`Draining` once closed.

        ``budgeted=False`` is for a caller that already keeps a hold slot
        for its whole life (an event stream): its holds take no slot and
        are not counted as answers.
        """
        page, counted = self._read(query, disconnected, budgeted)
        if budgeted and not counted:
            self.budget.count(page.kind)
        return page

    def read_many(self, query, disconnected=None, *, budgeted=True):
        """Answer a :class:`~service.live.many.FeedsQuery` (several feeds,
        one hold slot) with a :class:`~service.live.many.FeedsPage`."""
        return self._many.read(query, disconnected, budgeted=budgeted)

    def _read(self, query, disconnected, budgeted=True):
        """The answer, and whether its feed's waker has counted it already."""
        feed = self.feed(query.content_id)
        since, limit = query.since, query.limit
        kind = answer_kind(
            latest=since is None,
            must_reset=lambda: self.must_reset(feed, since),
            changes=since is not None and since < feed.last_seq,
            wait=query.wait,
            # A stream keeps its own slot for its whole life.
            take_slot=self.budget.try_acquire if budgeted else None,
        )
        if kind is None:  # held, with a slot taken (if budgeted)
            return self._hold(feed, since, limit, query.wait, disconnected, budgeted)
        if kind is Kind.LATEST or kind is Kind.RESET:
            return feed.latest_page(limit, kind), False
        if kind is Kind.SHED:
            # Queueing for a thread would stall writes behind holds:
            # tell the client when to come back instead.
            shed = feed.page(Kind.SHED, since,
                             poll_after_ms=self._settings.shed_poll_after_ms)
            return shed, False
        page = feed.page_after(since, limit)
        if kind is Kind.EMPTY:
            # A change may have come since: the page read decides.
            kind = answer_kind(changes=bool(page.changes), wait=query.wait)
            page = page.answer_as(kind, self.idle_poll_after_ms)
        return page, False

    def must_reset(self, feed, since):
        """The reset rule: the one place that decides a client starts over."""
        last = feed.last_seq
        if since > last:
            # Ahead of this process: another may have seen newer changes
            # already. Ahead of the database: it was replaced; start over.
            return since > self._store.current_seq(feed.content_id)
        # A device back from hours offline wants now, not everything.
        return last - since > self._settings.reset_after

    def _hold(self, feed, since, limit, wait, disconnected, budgeted):
        waiter = feed.hold(since, limit, self._clock() + wait, disconnected, budgeted=budgeted)
        if waiter is None:  # a change passed the cursor meanwhile
            if budgeted:
                self.budget.release()
            return feed.page_after(since, limit), False
        counted = True  # by the waker, with the slot it freed
        if not waiter.event.wait(wait + self.grace):
            if feed.cancel(waiter):
                if budgeted:
                    self.budget.release()
                counted = False
            else:
                waiter.event.wait(self.grace)  # a waker has it in hand
        page = waiter.page
        if page is None:
            page = feed.page_after(since, limit).after_hold(self.idle_poll_after_ms)
        if page.changes:
            self.woken.append((time.time(), page))  # no lock: see docs/design.md
        return page, counted


def _join_all(pollers, deadline):
    """Join ``pollers`` by ``deadline``; return those still running."""
    return [p for p in pollers if not p.join(max(0.0, deadline - time.monotonic()))]
