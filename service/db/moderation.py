"""Moderation in the database: rooms, bans, the post's checks and the events.

Every moderation action is a change of its content: it takes the content's
next seq (:data:`~service.db.statements.NEXT_SEQ`) in its transaction,
records an :class:`~service.db.values.Event` in ``content_events`` at that
seq, and sends one NOTIFY with its last seq, like a comment. The seq row's
lock is taken *first* (a post's and an action's alike), so everything each
one reads afterwards (the room, the bans, the author's comments) is what
the one before it committed: a post after a ban's commit sees the ban, a
ban's retraction sees every comment committed before it, and the two never
interleave. Whatever is refused rolls back, seq included.

A post is checked, after the seq is taken and before its token and its
insert, in this order (:func:`refusal`): a closed content
(:class:`Closed`), a ban in force (:class:`Banned`), slow mode
(:class:`SlowMode`; moderators exempt), the same body posted by the same
author within the duplicate window (:class:`Duplicate`). One statement
reads all four (:data:`POST_CHECKS`).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlalchemy as sa

from . import replies
from .tables import bans, comments, content_events, rooms
from .values import BAN, DEFAULT_ROOM, ROOM, Ban, Event, Room, comment_from_row, rfc3339, utc


class Refused(Exception):
    """A post the content's moderation refuses; nothing was stored."""


class Closed(Refused):
    """The content is closed: it takes no more comments."""


class Banned(Refused):
    """The author is banned from the content, ``until`` a time (UTC) or
    for good (None); ``until_text``: the same as the API writes it (RFC
    3339, or None); ``retry_after``: whole seconds until a timed ban ends."""

    def __init__(self, until, retry_after=None):
        super().__init__("banned" if until is None else f"banned until {until}")
        self.until = until
        self.until_text = rfc3339(until)
        self.retry_after = retry_after


class SlowMode(Refused):
    """The author's previous comment in this content is too recent;
    ``retry_after``: whole seconds (at least 1) until they may post."""

    def __init__(self, retry_after):
        super().__init__(f"slow mode: retry after {retry_after} s")
        self.retry_after = retry_after


class Duplicate(Refused):
    """The author posted the same body to this content within the window."""


class InvalidPin(Exception):
    """The comment to pin is none of this content's (``reason`` "missing") or
    a tombstone ("deleted"); nothing was changed."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _whole_seconds(delta):
    """A timedelta as whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(delta.total_seconds()))


def _in_force(content_id, author_id, now):
    b = bans
    return sa.and_(b.c.content_id == content_id, b.c.author_id == author_id,
                   sa.or_(b.c.until.is_(None), b.c.until > now))


#: What a post's checks read, as a SQL select list (``:content_id``,
#: ``:author_id``, ``:body``, ``:now``, and ``:duplicate_since``: NULL when
#: the duplicate window is off). Run after the post took its seq: the
#: transaction's path runs it alone (:func:`post_facts`), the quick post
#: inside its first round trip (:func:`service.db.statements.quick_post`);
#: :func:`refusal` judges it. Portable SQL, read by the indexes: the
#: rooms' and bans' keys and ``comments (content_id, author_id, created_at)``.
POST_CHECKS = """\
    (SELECT closed FROM rooms WHERE content_id = :content_id) AS closed,
    (SELECT slow_mode_seconds FROM rooms WHERE content_id = :content_id) AS slow_mode_seconds,
    EXISTS (SELECT 1 FROM bans WHERE content_id = :content_id AND author_id = :author_id
            AND (until IS NULL OR until > :now)) AS banned,
    (SELECT until FROM bans WHERE content_id = :content_id AND author_id = :author_id) AS until,
    (SELECT max(created_at) FROM comments
     WHERE content_id = :content_id AND author_id = :author_id) AS last_at,
    EXISTS (SELECT 1 FROM comments WHERE content_id = :content_id AND author_id = :author_id
            AND created_at > :duplicate_since AND body = :body) AS duplicate"""

_STAMP = sa.DateTime(timezone=True)
_POST_CHECKS = sa.text(f"SELECT\n{POST_CHECKS}").bindparams(
    sa.bindparam("now", type_=_STAMP), sa.bindparam("duplicate_since", type_=_STAMP),
).columns(until=_STAMP, last_at=_STAMP)


class PostFacts(NamedTuple):
    """What :data:`POST_CHECKS` read, in its order."""

    closed: bool | None
    slow_mode_seconds: int | None
    banned: bool
    until: datetime | None
    last_at: datetime | None
    duplicate: bool


def check_parameters(content_id, author_id, body, now, duplicate_window):
    """:data:`POST_CHECKS`' parameters."""
    since = now - timedelta(seconds=duplicate_window) if duplicate_window else None
    return {"content_id": content_id, "author_id": author_id, "body": body, "now": now,
            "duplicate_since": since}


def post_facts(conn, content_id, author_id, body, *, now, duplicate_window=0):
    """Read :data:`POST_CHECKS` in ``conn``'s transaction (after its seq is taken)."""
    row = conn.execute(_POST_CHECKS, check_parameters(
        content_id, author_id, body, now, duplicate_window)).one()
    return PostFacts(*row)


def refusal(facts, *, now, exempt_slow_mode=False):
    """The :class:`Refused` a post meets, judged from its
    :class:`PostFacts` in the spec's order (closed, banned, slow mode,
    duplicate), or None. Moderators are ``exempt_slow_mode``."""
    if facts.closed:
        return Closed()
    if facts.banned:
        until = utc(facts.until)
        return Banned(until, None if until is None else _whole_seconds(until - now))
    slow = facts.slow_mode_seconds
    if slow and not exempt_slow_mode and facts.last_at is not None:
        ready = utc(facts.last_at) + timedelta(seconds=slow)
        if ready > now:
            return SlowMode(_whole_seconds(ready - now))
    if facts.duplicate:
        return Duplicate()
    return None


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
