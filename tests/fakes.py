"""Fakes and helpers for the hold's unit tests: a fake store (plain Python,
the same semantics as ``service.db.store.Store`` for the calls the hold makes),
a fake clock, and builders of feeds and hubs over them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from conftest import make_settings

from service.common.errors import StoreUnavailable
from service.db.store import Comment
from service.live.feed import Feed
from service.live.hub import FeedHub, FeedQuery
from service.live.pages import Page

CONTENT = 7


class WallClock:
    """A settable wall clock for the store, ``seconds`` after ``start``."""

    def __init__(self, start=datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)):
        self.start = start
        self.seconds = 0.0

    def __call__(self):
        return self.start + timedelta(seconds=self.seconds)


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class FakeStore:
    """The store calls the hold makes, in memory, with the real semantics:
    every change takes the content's next seq, a deletion moves the
    comment to a new seq as a tombstone. ``fail`` makes reads raise."""

    def __init__(self):
        self.rows = {}  # comment id -> Comment
        self.seqs = {}  # content id -> last seq
        self.fail = None
        self.calls = {"changes_since": 0, "current_seq": 0, "latest": 0}
        #: Called inside changes_since after its rows are read (races).
        self.during_read = None

    def add(self, body, content_id=CONTENT):
        seq = self.seqs[content_id] = self.seqs.get(content_id, 0) + 1
        comment = Comment(
            id=len(self.rows) + 1, content_id=content_id, author_id=1, body=body,
            created_at=datetime(2026, 1, 1, tzinfo=UTC), seq=seq, deleted=False,
        )
        self.rows[comment.id] = comment
        return comment

    def delete(self, comment_id):
        old = self.rows[comment_id]
        seq = self.seqs[old.content_id] = self.seqs[old.content_id] + 1
        tombstone = Comment(
            id=old.id, content_id=old.content_id, author_id=old.author_id, body=None,
            created_at=old.created_at, seq=seq, deleted=True,
        )
        self.rows[comment_id] = tombstone
        return tombstone

    def _read(self, name):
        self.calls[name] += 1
        if self.fail is not None:
            raise self.fail

    def _ordered(self, content_id):
        return sorted(
            (c for c in self.rows.values() if c.content_id == content_id), key=lambda c: c.seq
        )

    def changes_since(self, content_id, since, limit):
        self._read("changes_since")
        rows = [c for c in self._ordered(content_id) if c.seq > since][:limit]
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            hook()
        return rows

    def current_seq(self, content_id):
        self._read("current_seq")
        return self.seqs.get(content_id, 0)

    def latest(self, content_id, limit):
        self._read("latest")
        live = [c for c in self._ordered(content_id) if not c.deleted]
        return live[-limit:], self.seqs.get(content_id, 0)

    def reads(self):
        return sum(self.calls.values())


def db_error():
    """What the store raises when the database does not answer."""
    return StoreUnavailable("server closed the connection unexpectedly")


def comment(seq, body=None, *, id=None, deleted=False):
    return Comment(
        id=seq if id is None else id, content_id=CONTENT, author_id=1,
        body=None if deleted else (body or f"comment {seq}"),
        created_at=datetime(2026, 1, 1, tzinfo=UTC), seq=seq, deleted=deleted,
    )


class Releases:
    """Records each call of a feed's ``settle`` (the hold budget): the
    slots freed per call, and the answers by kind."""

    def __init__(self):
        self.calls = []
        self.kinds = []

    def __call__(self, answered):
        self.calls.append(answered.total())
        self.kinds.append({kind.value: n for kind, n in answered.items()})


def make_feed(changes=(), floor=0, window_size=100, store=None):
    """A feed over ``changes``; its store holds them too, unless one is given."""
    if store is None:
        store = FakeStore()
        for change in changes:
            store.rows[change.id] = change
            store.seqs[CONTENT] = max(store.seqs.get(CONTENT, 0), change.seq)
    releases = Releases()
    feed = Feed(CONTENT, list(changes), floor, window_size=window_size, settle=releases,
                store=store)
    return feed, releases


def page(answer):
    """The decoded JSON of a Page (or of its body)."""
    return json.loads(answer.body if isinstance(answer, Page) else answer)


def seqs(answer):
    return [c["seq"] for c in page(answer)["comments"]]


def loaded(store, window_size=100):
    changes = store.changes_since(CONTENT, 0, window_size)
    return make_feed(changes, floor=0, window_size=window_size, store=store)


def query(since=None, wait=20, limit=50, content_id=CONTENT):
    return FeedQuery(content_id, since=since, limit=limit, wait=wait)


def hub_for(store, clock=None, start_threads=False, **settings):
    values = {"poll_interval": 0.5, "max_wait": 5, "default_wait": 5, "feed_ttl": 10}
    values.update(settings)
    hub = FeedHub(store, make_settings(**values), clock=clock or FakeClock(),
                  start_threads=start_threads)
    hub.start()
    return hub
