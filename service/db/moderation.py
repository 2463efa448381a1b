"""Moderation's refusals and a post's checks against its content's moderation.

The errors the web layer maps to a status live here: a post's refusals
(:class:`Refused`) and a pin's (:class:`InvalidPin`); the moderation
actions themselves (rooms, bans, their events) are :mod:`service.db.rooms`.

A post takes its content's seq (:data:`~service.db.statements.NEXT_SEQ`)
*first*, like every moderation action, so what its checks read afterwards
(the room, the bans, the author's comments) is what the change before it
committed: a post after a ban's commit sees the ban, a ban's retraction
sees every comment committed before it, and the two never interleave.
Whatever is refused rolls back, seq included.

A post is checked, after the seq is taken and before its token and its
insert, in this order (:func:`refusal`): a closed content
(:class:`Closed`), a ban in force (:class:`Banned`), slow mode
(:class:`SlowMode`; moderators exempt), the same body posted by the same
author within the duplicate window (:class:`Duplicate`). One statement
reads all four (:data:`POST_CHECKS`).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlalchemy as sa

from .values import rfc3339, utc


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
