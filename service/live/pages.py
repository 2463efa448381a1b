"""What a feed read answered: the encoded page and the kind of answer it was.

Nothing in a page depends on who asks: viewers at the same cursor get the
same bytes, so the process encodes each page once, and an HTTP cache in
front may hand one upstream answer to all of them. The :class:`Kind` lets
callers (cache headers, streams, metrics) act on what was answered without
decoding it; :func:`answer_kind` alone decides it, for the hub and the
feed alike. An empty answer also says when to come back
(:func:`idle_poll_after_ms`).

A page carries the content's room (closed, slow mode, pinned comment) as
its feed knew it, and its changes are comments and tombstones (which have
``is_comment`` true) and moderation events (``is_comment`` false: ``room``,
``ban``, ``unban``). Every page of a closed content asks a long pause
(:func:`pause_for`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field


class Kind(enum.Enum):
    """Why a feed read got the answer it got."""

    #: No cursor given: the newest comments and the cursor after them.
    LATEST = "latest"
    #: Changes after the cursor were there already: answered at once.
    CATCH_UP = "catch_up"
    #: Held, then woken by a change.
    WOKEN = "woken"
    #: Held until the wait ran out (or the server drained): no changes.
    TIMEOUT = "timeout"
    #: At the newest change with ``wait=0``: nothing new, not held.
    EMPTY = "empty"
    #: The hold budget was spent: no changes, come back after ``poll_after_ms``.
    SHED = "shed"
    #: Too far behind (or ahead of a replaced database): the latest page
    #: instead of history, with ``reset`` set.
    RESET = "reset"


def answer_kind(*, latest=False, must_reset=None, changes=False, held=False, wait=None,
                take_slot=None):
    """The kind of answer a feed read gets: the one place it is decided.

    The rules, in order: no cursor (``latest``): LATEST. The reset rule
    (``must_reset()``, asked only now): RESET. Changes past the cursor:
    CATCH_UP, or WOKEN if they end a hold (``held``). A hold that ends
    with none: TIMEOUT. ``wait`` 0: EMPTY. No hold slot (``take_slot()``,
    which takes one, asked only now): SHED. Else None: hold the read, and
    decide again when the hold ends.
    """
    if latest:
        return Kind.LATEST
    if must_reset is not None and must_reset():
        return Kind.RESET
    if changes:
        return Kind.WOKEN if held else Kind.CATCH_UP
    if held:
        return Kind.TIMEOUT
    if wait == 0:
        return Kind.EMPTY
    if take_slot is not None and not take_slot():
        return Kind.SHED
    return None


def open_room():
    """The room of a content nobody moderated (it has no row in the database)."""
    return {"closed": False, "slow_mode_seconds": 0, "pinned": None}


def pause_for(room, poll_after_ms, closed_poll_after_ms):
    """The pause a page asks for: ``poll_after_ms``, and at least
    ``closed_poll_after_ms`` while its ``room`` is closed (nothing will be
    posted; a moderator reopening it wakes the viewers still held)."""
    if room["closed"]:
        return max(poll_after_ms, closed_poll_after_ms)
    return poll_after_ms


def idle_poll_after_ms(settings):
    """The pause an empty answer that a cache in front may keep (a timeout,
    an empty read) asks of its clients: as long as the cache may keep it
    (``shared_cache_seconds``), so that they come back to a fresh hold, not
    to the copy. 0 without a shared cache."""
    return settings.shared_cache_seconds * 1000


@dataclass(frozen=True, slots=True)
class Page:
    """One feed answer; :attr:`body` is the JSON every viewer of it gets."""

    kind: Kind
    content_id: int
    #: The ``since`` to send next.
    cursor: int
    #: The changes in the body, ascending seq: comments and tombstones
    #: (``is_comment``), and moderation events.
    changes: tuple
    body: bytes
    poll_after_ms: int = 0
    #: The content's room as of this page (its feed's newest), JSON-ready.
    room: dict = field(default_factory=open_room, compare=False)
    #: The least pause this page asks while its room is closed; kept so that
    #: the page answered as another kind asks it too (:meth:`answer_as`).
    closed_poll_after_ms: int = field(default=0, compare=False)
    #: Other encodings of this page (gzip, lines, events), made on first
    #: use and kept with it, so viewers sharing the page share them too.
    #: Shared by :meth:`as_kind` copies; never part of equality.
    encodings: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def encode(cls, kind, content_id, changes, cursor, *, room=None, poll_after_ms=0,
               closed_poll_after_ms=0):
        """Build a page, encoding its JSON body once: the comments and
        tombstones, the events, the room (``room``, None for an open room)
        and the pause (:func:`pause_for`)."""
        changes = tuple(changes)
        room = open_room() if room is None else room
        poll_after_ms = pause_for(room, poll_after_ms, closed_poll_after_ms)
        body = json.dumps(
            {
                "content_id": content_id,
                "comments": [change.to_json() for change in changes if change.is_comment],
                "events": [change.to_json() for change in changes if not change.is_comment],
                "room": room,
                "cursor": cursor,
                "poll_after_ms": poll_after_ms,
                "reset": kind is Kind.RESET,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        return cls(kind, content_id, cursor, changes, body, poll_after_ms, room,
                   closed_poll_after_ms)

    @property
    def closed(self):
        """Whether the content was closed as of this page."""
        return bool(self.room["closed"])

    def encoded(self, name, encode):
        """``encode(self)``, made once per page under ``name`` and then kept.

        No lock: two threads racing make the same bytes and one is kept.
        """
        data = self.encodings.get(name)
        if data is None:
            data = self.encodings[name] = encode(self)
        return data

    def after_hold(self, idle_poll_after_ms=0):
        """This page as the end of a hold: woken if it has changes, else a
        timeout asking for a pause of ``idle_poll_after_ms``."""
        kind = answer_kind(changes=bool(self.changes), held=True)
        return self.answer_as(kind, idle_poll_after_ms)

    def idle(self, kind, poll_after_ms):
        """This empty page as ``kind``, asking for a pause of ``poll_after_ms``.
        A page that has changes after all (one just arrived) stays what it is."""
        return self if self.changes else self.answer_as(kind, poll_after_ms)

    def answer_as(self, kind, poll_after_ms=0):
        """This page answered as ``kind`` (:func:`answer_kind`'s); if it is
        empty, asking for a pause of ``poll_after_ms`` (at least the closed
        pause while its room is closed; encoded again only if that changes
        its body)."""
        if not self.changes:
            poll_after_ms = pause_for(self.room, poll_after_ms, self.closed_poll_after_ms)
        if self.changes or poll_after_ms == self.poll_after_ms:
            return self.as_kind(kind)
        return Page.encode(kind, self.content_id, (), self.cursor, room=self.room,
                           poll_after_ms=poll_after_ms,
                           closed_poll_after_ms=self.closed_poll_after_ms)

    def as_kind(self, kind):
        """The same bytes answered as another kind (a page cached as a
        catch-up is a woken answer when it ends a hold)."""
        return self if kind is self.kind else dataclasses.replace(self, kind=kind)
