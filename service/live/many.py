"""Several feeds in one read: one long-poll (or stream) for many contents.

A page that follows a live event's side rooms, or a dashboard of streams,
asks for all of them in one request (``?feeds=42:17,43:5,44``) instead of
spending a connection per content. The read answers at once when any named
feed has something for its cursor (changes, a reset, or no cursor: its
latest page); else it holds with **one** hold slot, on one
:class:`threading.Event` that every named feed's waker may set, and answers
when the first of them does or the wait runs out.

The answer lists every named feed, in the query's (canonical, ascending)
order, each as the single read's own page (a feed with nothing new: an
empty page at its unchanged cursor), so a client builds its next request
from the answer alone and every viewer at the same cursors gets the same
bytes. Each feed's page is the one its feed keeps for that cursor; the
joined answer is kept too (:data:`ANSWERS_KEPT`), so a thousand viewers
woken together join and encode it once.

Exactly once per feed: each page is that feed's changes after its own
cursor, read after the wake; a change to another feed in the same instant
is in this answer or the next, never in both (its cursor moves with it).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from cachetools import LRUCache

from .pages import Kind, pause_for

#: Joined answers kept per process, by the pages they join: the viewers of
#: one set of feeds sit at a handful of cursor combinations between changes.
ANSWERS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class FeedsQuery:
    """A read of several feeds: ``cursors`` is ``((content_id, since), …)``
    in ascending content id, ``since`` None for a feed's latest page."""

    cursors: tuple
    limit: int = 50
    wait: float = 0


@dataclass(frozen=True, slots=True)
class FeedsPage:
    """One answer of a read of several feeds; :attr:`body` is its JSON."""

    kind: Kind
    #: One :class:`~service.live.pages.Page` per named feed, in the query's order.
    pages: tuple
    body: bytes
    poll_after_ms: int = 0
    #: Other encodings (gzip, lines), made once and kept, as a Page's.
    encodings: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def encode(cls, kind, pages, poll_after_ms):
        # Each page's body is already the single read's JSON: joined, not re-encoded.
        body = (b'{"feeds":[' + b",".join(page.body for page in pages)
                + b'],"poll_after_ms":' + str(poll_after_ms).encode() + b"}")
        return cls(kind, tuple(pages), body, poll_after_ms)

    @property
    def changes(self):
        """Every feed's changes (the metrics' deliveries)."""
        return tuple(change for page in self.pages for change in page.changes)

    @property
    def cursors(self):
        """The next request's ``feeds``: ``42:18,43:5``."""
        return format_cursors((page.content_id, page.cursor) for page in self.pages)

    def encoded(self, name, encode):
        """``encode(self)``, made once under ``name`` and kept (see Page.encoded)."""
        data = self.encodings.get(name)
        if data is None:
            data = self.encodings[name] = encode(self)
        return data


def format_cursors(cursors):
    """``((42, 18), (43, 5))`` as ``42:18,43:5`` (None: a bare ``44``)."""
    return ",".join(str(cid) if since is None else f"{cid}:{since}" for cid, since in cursors)


class ManyFeeds:
    """Answers :class:`FeedsQuery` values for a :class:`~service.live.hub.FeedHub`."""

    def __init__(self, hub):
        self._hub = hub
        self._answers = LRUCache(ANSWERS_KEPT)
        self._lock = threading.Lock()

    def read(self, query, disconnected=None, *, budgeted=True):
        """The :class:`FeedsPage` answering ``query``; held if nothing is new.

        ``budgeted=False``: the caller keeps a slot of its own (a stream).
        """
        hub = self._hub
        feeds = [hub.feed(content_id) for content_id, _ in query.cursors]
        sinces = [since for _, since in query.cursors]
        pages = self._at_once(feeds, sinces, query.limit)
        if pages is not None:
            kind = _kind_at_once(pages)
            answer = self._answer(kind, pages, 0)
        elif query.wait == 0:
            answer = self._answer(Kind.EMPTY, self._pages_after(feeds, sinces, query.limit),
                                  hub.idle_poll_after_ms)
        elif budgeted and not hub.budget.try_acquire():
            pages = [feed.page(Kind.SHED, since) for feed, since in zip(feeds, sinces, strict=True)]
            answer = self._answer(Kind.SHED, pages, hub.settings.shed_poll_after_ms)
        else:
            answer = self._hold(feeds, sinces, query, disconnected)
            if budgeted:
                hub.budget.settle(Counter({answer.kind: 1}))  # its slot, and the answer
            if answer.changes:
                hub.woken.append((time.time(), answer))  # no lock: see docs/design.md
            return answer
        if budgeted:
            hub.budget.count(answer.kind)
        return answer

    def _at_once(self, feeds, sinces, limit):
        """Every feed's page if any of them answers at once, else None."""
        hub = self._hub
        pages, ready = [], False
        for feed, since in zip(feeds, sinces, strict=True):
            if since is None:
                pages.append(feed.latest_page(limit))
                ready = True
            elif hub.must_reset(feed, since):
                pages.append(feed.latest_page(limit, Kind.RESET))
                ready = True
            elif since < feed.last_seq:
                pages.append(feed.page_after(since, limit))
                ready = True
            else:
                pages.append(None)  # nothing yet: its empty page, if the answer is now
        if not ready:
            return None
        return [page if page is not None else feed.page_after(since, limit)
                for page, feed, since in zip(pages, feeds, sinces, strict=True)]

    def _hold(self, feeds, sinces, query, disconnected):
        hub = self._hub
        event = threading.Event()
        deadline = hub.clock() + query.wait
        held = []
        for feed, since in zip(feeds, sinces, strict=True):
            waiter = feed.hold(since, query.limit, deadline, disconnected,
                               budgeted=False, event=event)
            if waiter is None:  # a change passed this cursor meanwhile
                break
            held.append((feed, waiter))
        else:
            # Each feed's poller answers its waiter on a change, at the
            # deadline or when the client goes: the first sets the event.
            event.wait(query.wait + hub.grace)
        for feed, waiter in held:
            feed.cancel(waiter)
        pages = self._pages_after(feeds, sinces, query.limit)
        changed = any(page.changes for page in pages)
        if changed:
            return self._answer(Kind.WOKEN, pages, 0)
        return self._answer(Kind.TIMEOUT, pages, hub.idle_poll_after_ms)

    @staticmethod
    def _pages_after(feeds, sinces, limit):
        return [feed.page_after(since, limit) for feed, since in zip(feeds, sinces, strict=True)]

    def _answer(self, kind, pages, poll_after_ms):
        """The joined answer, kept for the viewers that follow.

        The pause it asks: with changes from open feeds, the most those
        pages ask (a busy feed's pace, else 0): asking sooner would fetch
        the busy feed's next comment alone, and a quiet feed's next change
        waits at most that pace. Else the least any feed asks
        (``poll_after_ms``, or a closed feed's longer one), so a closed
        feed never slows the others.
        """
        changed = [page.poll_after_ms for page in pages if page.changes and not page.closed]
        if changed:
            pause = max(changed)
        else:
            pause = min(pause_for(page.room, poll_after_ms, page.closed_poll_after_ms)
                        for page in pages)
        # The key holds the pages themselves, so their ids are not reused
        # while the answer is kept.
        key = (kind, pause, tuple(id(page) for page in pages))
        with self._lock:
            kept = self._answers.get(key)
        if kept is not None:
            return kept[1]
        answer = FeedsPage.encode(kind, pages, pause)
        with self._lock:
            self._answers[key] = (pages, answer)
        return answer


def _kind_at_once(pages):
    """An answer given at once: a reset if any feed was (not for a cache
    to keep), latest if every feed was bare, else a catch-up."""
    kinds = {page.kind for page in pages}
    if Kind.RESET in kinds:
        return Kind.RESET
    if kinds == {Kind.LATEST}:
        return Kind.LATEST
    return Kind.CATCH_UP

