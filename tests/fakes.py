"""Fakes and helpers for the hold's unit tests: a fake store (plain Python,
the same semantics as ``service.db.store.Store`` for the calls the hold makes,
moderation events and rooms included), a fake clock, and builders of feeds
and hubs over them."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from conftest import make_settings

from service.common.errors import StoreUnavailable
from service.db.values import BAN, ROOM, UNBAN, Comment, Event, Room
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


AT = datetime(2026, 1, 1, tzinfo=UTC)


def open_room():
    return Room().to_json()


def room_event(seq, *, closed=False, slow_mode_seconds=0, pinned=None, moderator_id=9,
               content_id=CONTENT):
    """A ``room`` event at ``seq`` carrying the whole new room."""
    room = Room(closed, slow_mode_seconds, pinned).to_json()
    return Event(seq, content_id, ROOM, moderator_id, {"room": room}, AT)


def ban_event(seq, author_id, *, until=None, moderator_id=9, content_id=CONTENT):
    return Event(seq, content_id, BAN, moderator_id,
                 {"author_id": author_id, "until": until, "reason": None, "retracted": 0}, AT)


def unban_event(seq, author_id, *, moderator_id=9, content_id=CONTENT):
    return Event(seq, content_id, UNBAN, moderator_id, {"author_id": author_id}, AT)


class FakeStore:
    """The store calls the hold makes, in memory, with the real semantics:
    every change takes the content's next seq, a deletion moves the
    comment to a new seq as a tombstone, a moderation event takes a seq of
    its own and a room change replaces the room. ``fail`` makes reads raise."""

    def __init__(self):
        self.rows = {}  # comment id -> Comment
        self.events = []  # Event, ascending seq
        self.rooms = {}  # content id -> Room (none: never moderated)
        self.seqs = {}  # content id -> last seq
        self.fail = None
        self.calls = {"changes_since": 0, "current_seq": 0, "latest": 0, "room": 0}
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

    def _next_seq(self, content_id):
        seq = self.seqs[content_id] = self.seqs.get(content_id, 0) + 1
        return seq

    def set_room(self, content_id=CONTENT, **changes):
        """A moderator's room change (``closed``, ``slow_mode_seconds``,
        ``pinned``): the new room, and its event."""
        room = self.rooms[content_id] = replace(self.rooms.get(content_id, Room()), **changes)
        return self._event(room_event(self._next_seq(content_id), content_id=content_id,
                                      closed=room.closed, pinned=room.pinned,
                                      slow_mode_seconds=room.slow_mode_seconds))

    def ban(self, author_id, content_id=CONTENT, until=None):
        return self._event(ban_event(self._next_seq(content_id), author_id, until=until,
                                     content_id=content_id))

    def unban(self, author_id, content_id=CONTENT):
        return self._event(unban_event(self._next_seq(content_id), author_id,
                                       content_id=content_id))

    def _event(self, event):
        self.events.append(event)
        return event

    def room(self, content_id):
        self._read("room")
        return self.rooms.get(content_id, Room())

    def _read(self, name):
        self.calls[name] += 1
        if self.fail is not None:
            raise self.fail

    def _ordered(self, content_id):
        return sorted(
            (c for c in self.rows.values() if c.content_id == content_id), key=lambda c: c.seq
        )

    def changes_since(self, content_id, since, limit):
        """Comments, tombstones and events after ``since``, merged in seq order."""
        self._read("changes_since")
        merged = self._ordered(content_id) + [
            e for e in self.events if e.content_id == content_id
        ]
        rows = sorted((c for c in merged if c.seq > since), key=lambda c: c.seq)[:limit]
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


def make_feed(changes=(), floor=0, window_size=100, store=None, *, room=None,
              closed_poll_after_ms=0, idle_poll_after_ms=0):
    """A feed over ``changes``; its store holds them too, unless one is given."""
    if store is None:
        store = FakeStore()
        for change in changes:
            if change.is_comment:
                store.rows[change.id] = change
            else:
                store.events.append(change)
            store.seqs[CONTENT] = max(store.seqs.get(CONTENT, 0), change.seq)
    releases = Releases()
    feed = Feed(CONTENT, list(changes), floor, window_size=window_size, settle=releases,
                store=store, room=room, closed_poll_after_ms=closed_poll_after_ms,
                idle_poll_after_ms=idle_poll_after_ms)
    return feed, releases


def page(answer):
    """The decoded JSON of a Page (or of its body)."""
    return json.loads(answer.body if isinstance(answer, Page) else answer)


def seqs(answer):
    return [c["seq"] for c in page(answer)["comments"]]


def event_seqs(answer):
    return [(e["seq"], e["type"]) for e in page(answer)["events"]]


def body(comments=(), cursor=0, *, events=(), room=None, poll_after_ms=0, reset=False):
    """A page's whole decoded JSON, for exact comparisons."""
    return {"content_id": CONTENT, "comments": list(comments), "events": list(events),
            "room": open_room() if room is None else room, "cursor": cursor,
            "poll_after_ms": poll_after_ms, "reset": reset}


def loaded(store, window_size=100):
    changes = store.changes_since(CONTENT, 0, window_size)
    return make_feed(changes, floor=0, window_size=window_size, store=store,
                     room=store.room(CONTENT).to_json())


def query(since=None, wait=20, limit=50, content_id=CONTENT):
    return FeedQuery(content_id, since=since, limit=limit, wait=wait)


def hub_for(store, clock=None, start_threads=False, **settings):
    values = {"poll_interval": 0.5, "max_wait": 5, "default_wait": 5, "feed_ttl": 10}
    values.update(settings)
    hub = FeedHub(store, make_settings(**values), clock=clock or FakeClock(),
                  start_threads=start_threads)
    hub.start()
    return hub
