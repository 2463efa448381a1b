"""The moderation actions: each content's room and its bans, and their events.

:class:`ModerationStore` is the part of :class:`~service.db.store.Store`
that moderates (``room``, ``set_room``, ``ban``, ``lift_ban``, ``bans``);
the store inherits it, and the functions below are their SQL.

Every moderation action is a change of its content: it takes the content's
next seq (:data:`~service.db.statements.NEXT_SEQ`) first, in its
transaction (the store's ``_change``), records an
:class:`~service.db.values.Event` in ``content_events`` at that seq, and
sends one NOTIFY with its last seq, like a comment. The seq row's lock
orders it with the content's posts and other actions: a ban's retraction
sees every comment committed before it, and a post after the ban's commit
sees the ban (:mod:`service.db.moderation`). Nothing is written when
nothing changes.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import sqlalchemy as sa

from . import replies
from .moderation import InvalidPin
from .tables import bans, comments, content_events, rooms
from .values import BAN, DEFAULT_ROOM, ROOM, UNBAN, Ban, Event, Room, comment_from_row, rfc3339, utc

#: ``set_room``'s "leave the pinned comment as it is" (None unpins).
UNCHANGED = object()


class ModerationStore:
    """The store's moderation: every method is one short transaction.

    A mixin of :class:`~service.db.store.Store`, run by its machinery:
    ``_clock``, ``_insert``, ``_reader``, ``_run`` (a read) and ``_change``
    (a change of a content: its seqs and its NOTIFY).
    """

    def _unpin(self, conn, changes, comment_ids, moderator_id, now):
        """Unpin the content's pinned comment if it is one of ``comment_ids``
        (being deleted): the room event made, in a list (none if not)."""
        room = read_room(conn, changes.content_id)
        if room.pinned_comment_id not in comment_ids:
            return []
        room = dataclasses.replace(room, pinned=None)
        write_room(conn, self._insert, changes.content_id, room)
        return [room_event(conn, changes.content_id, changes.take(), moderator_id, room, now)]

    def room(self, content_id):
        """The content's :class:`~service.db.values.Room` (the default one if
        nobody moderated it)."""
        return self._run(self._reader, lambda conn: read_room(conn, content_id))

    def set_room(self, content_id, moderator_id, *, slow_mode_seconds=None, closed=None,
                 pinned_comment_id=UNCHANGED):
        """Change the content's room: what is not None (for the pin: not
        :data:`UNCHANGED`; None unpins). Returns ``(room, event)``: the room
        now, and the ``room`` event at a new seq, or None if nothing changed
        (then nothing was written). Raises
        :class:`~service.db.moderation.InvalidPin` for a comment that is not
        a live one of this content."""
        now = self._clock()

        def change(conn, changes):
            changes.begin(content_id)
            room = read_room(conn, content_id)
            new = room
            if slow_mode_seconds is not None:
                new = dataclasses.replace(new, slow_mode_seconds=slow_mode_seconds)
            if closed is not None:
                new = dataclasses.replace(new, closed=closed)
            if pinned_comment_id is not UNCHANGED and pinned_comment_id != room.pinned_comment_id:
                pinned = None if pinned_comment_id is None else pinnable(
                    conn, content_id, pinned_comment_id)
                new = dataclasses.replace(new, pinned=pinned)
            if new == room:
                return room, None
            write_room(conn, self._insert, content_id, new)
            return new, room_event(conn, content_id, changes.take(), moderator_id, new, now)

        return self._change(change)

    def ban(self, content_id, author_id, *, seconds=None, retract=False, reason=None,
            moderator_id):
        """Ban the author from posting to the content for ``seconds`` (None:
        for good), replacing any ban of theirs there; with ``retract``, turn
        each of their live comments in the content into a tombstone first,
        each at a new seq in ascending id order (unpinning the pinned one:
        a ``room`` event after them). Then the ``ban`` event; one
        transaction, one NOTIFY. Returns the :class:`~service.db.values.Ban`
        (``retracted``: how many tombstones; ``seq``: the ban event's)."""
        now = self._clock()
        until = None if seconds is None else now + timedelta(seconds=seconds)

        def change(conn, changes):
            changes.begin(content_id)
            retracted = []
            if retract:
                retracted = live_comment_ids(conn, content_id, author_id)
                for comment_id in retracted:
                    tombstone(conn, comment_id, changes.take())
                self._unpin(conn, changes, set(retracted), moderator_id, now)
            ban = Ban(content_id=content_id, author_id=author_id, until=until, reason=reason,
                      moderator_id=moderator_id, created_at=now, retracted=len(retracted))
            write_ban(conn, self._insert, ban)
            event = ban_event(conn, content_id, changes.take(), ban, now)
            return dataclasses.replace(ban, seq=event.seq)

        return self._change(change)

    def lift_ban(self, content_id, author_id, moderator_id):
        """Lift the author's ban in force on the content: the ``unban``
        :class:`~service.db.values.Event` at a new seq, or None if there was
        no ban in force (nothing written)."""
        now = self._clock()

        def change(conn, changes):
            changes.begin(content_id)
            if not delete_ban(conn, content_id, author_id, now):
                return None
            return add_event(conn, content_id, changes.take(), UNBAN, moderator_id,
                             {"author_id": author_id}, now)

        return self._change(change)

    def bans(self, content_id):
        """The content's bans in force (:class:`~service.db.values.Ban`), by author id."""
        now = self._clock()
        return self._run(self._reader, lambda conn: bans_in_force(conn, content_id, now))


# -- rooms --------------------------------------------------------------------


def read_room(conn, content_id):
    """The content's :class:`~service.db.values.Room` (with its pinned comment)."""
    r, c = rooms, comments
    row = conn.execute(
        sa.select(r.c.closed, r.c.slow_mode_seconds, r.c.pinned_comment_id,
                  *[col.label(f"c_{col.name}") for col in c.c])
        .select_from(r.outerjoin(c, c.c.id == r.c.pinned_comment_id))
        .where(r.c.content_id == content_id)
    ).one_or_none()
    if row is None:
        return DEFAULT_ROOM
    pinned = None
    if row.pinned_comment_id is not None and row.c_id is not None:
        pinned = comment_from_row(_Prefixed(row, "c_"))
    return Room(closed=bool(row.closed), slow_mode_seconds=row.slow_mode_seconds, pinned=pinned)


class _Prefixed:
    """A row's ``prefix``-named columns as attributes without it."""

    def __init__(self, row, prefix):
        self._row, self._prefix = row, prefix

    def __getattr__(self, name):
        return getattr(self._row, self._prefix + name)


def pinnable(conn, content_id, comment_id):
    """The live comment ``comment_id`` of ``content_id``, to pin; raises :class:`InvalidPin`."""
    row = conn.execute(sa.select(comments).where(
        comments.c.id == comment_id, comments.c.content_id == content_id)).one_or_none()
    if row is None:
        raise InvalidPin("missing")
    if row.deleted:
        raise InvalidPin("deleted")
    return comment_from_row(row)


def write_room(conn, insert, content_id, room):
    """Store ``room`` as the content's (its row made when first moderated)."""
    values = {"closed": room.closed, "slow_mode_seconds": room.slow_mode_seconds,
              "pinned_comment_id": room.pinned_comment_id}
    stmt = insert(rooms).values(content_id=content_id, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[rooms.c.content_id], set_=values))


# -- bans ---------------------------------------------------------------------


def _in_force(content_id, author_id, now):
    b = bans
    return sa.and_(b.c.content_id == content_id, b.c.author_id == author_id,
                   sa.or_(b.c.until.is_(None), b.c.until > now))


def ban_from_row(row, *, seq=None):
    return Ban(content_id=row.content_id, author_id=row.author_id, until=utc(row.until),
               reason=row.reason, moderator_id=row.moderator_id, created_at=utc(row.created_at),
               retracted=row.retracted, seq=seq)


def write_ban(conn, insert, ban):
    """Store ``ban``, replacing the author's ban of the content if any."""
    values = {"until": ban.until, "reason": ban.reason, "moderator_id": ban.moderator_id,
              "created_at": ban.created_at, "retracted": ban.retracted}
    stmt = insert(bans).values(content_id=ban.content_id, author_id=ban.author_id, **values)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=[bans.c.content_id, bans.c.author_id], set_=values))


def delete_ban(conn, content_id, author_id, now):
    """Delete the author's ban of the content if in force; True if there was one."""
    return conn.execute(
        bans.delete().where(_in_force(content_id, author_id, now))
    ).rowcount > 0


def bans_in_force(conn, content_id, now):
    """The content's bans in force, by author id."""
    b = bans
    rows = conn.execute(
        sa.select(b).where(b.c.content_id == content_id,
                           sa.or_(b.c.until.is_(None), b.c.until > now))
        .order_by(b.c.author_id)
    ).all()
    return [ban_from_row(row) for row in rows]


def live_comment_ids(conn, content_id, author_id):
    """The ids of the author's live comments in the content, ascending: a retraction's."""
    c = comments
    return conn.execute(
        sa.select(c.c.id).where(c.c.content_id == content_id, c.c.author_id == author_id,
                                c.c.deleted.is_(False))
        .order_by(c.c.id)
    ).scalars().all()


def tombstone(conn, comment_id, seq):
    """Turn a comment into a tombstone at ``seq`` and clear its replies' quotes."""
    conn.execute(comments.update().where(comments.c.id == comment_id)
                 .values(body=None, deleted=True, seq=seq))
    replies.scrub(conn, comment_id)


# -- events -------------------------------------------------------------------


def add_event(conn, content_id, seq, type_, moderator_id, data, now):
    """Record an event of the content's feed at ``seq``; the :class:`~service.db.values.Event`."""
    conn.execute(content_events.insert().values(
        content_id=content_id, seq=seq, type=type_, moderator_id=moderator_id,
        data=json.dumps(data, separators=(",", ":")), created_at=now))
    return Event(seq=seq, content_id=content_id, type=type_, moderator_id=moderator_id,
                 data=data, created_at=now)


def room_event(conn, content_id, seq, moderator_id, room, now):
    return add_event(conn, content_id, seq, ROOM, moderator_id, {"room": room.to_json()}, now)


def ban_event(conn, content_id, seq, ban, now):
    data = {"author_id": ban.author_id, "until": rfc3339(ban.until), "reason": ban.reason,
            "retracted": ban.retracted}
    return add_event(conn, content_id, seq, BAN, ban.moderator_id, data, now)


def event_from_row(row):
    """An :class:`~service.db.values.Event` from a row with ``content_events``' columns."""
    return Event(seq=row.seq, content_id=row.content_id, type=row.type,
                 moderator_id=row.moderator_id, data=json.loads(row.data),
                 created_at=utc(row.created_at))
