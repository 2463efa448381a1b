"""What the store answers with: plain values, each with its ``to_json()``.

A content's feed is a sequence of changes in seq order: comments (a new
comment, or a tombstone) and moderation events (ban, unban, room). Both
carry ``seq``; ``is_comment`` (a class attribute) tells them apart, so the
live layer needs neither this module nor ``isinstance``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime


def utc(when):
    """A datetime read from the database, in UTC (SQLite keeps no zone; the store writes UTC)."""
    if when is None:
        return None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def rfc3339(when):
    """``when`` as the API writes times: RFC 3339 in UTC, microseconds, ``Z``; None stays None."""
    return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Comment:
    id: int
    content_id: int
    author_id: int
    body: str | None
    created_at: datetime
    seq: int
    deleted: bool
    #: A reply's parent and its summary (:mod:`service.db.replies`).
    parent_id: int | None = None
    parent_author_id: int | None = None
    parent_excerpt: str | None = None
    parent_deleted: bool = False

    #: A comment or a tombstone, not a moderation event (:class:`Event`).
    is_comment = True

    def to_json(self):
        return {
            "id": self.id,
            "content_id": self.content_id,
            "author_id": self.author_id,
            "body": self.body,
            "created_at": rfc3339(self.created_at),
            "seq": self.seq,
            "deleted": self.deleted,
            "parent_id": self.parent_id,
            "parent": None if self.parent_id is None else {
                "id": self.parent_id,
                "author_id": self.parent_author_id,
                "excerpt": self.parent_excerpt,
                "deleted": self.parent_deleted,
            },
        }


def comment_from_row(row):
    """A :class:`Comment` from a row of ``comments`` (any select of all its columns)."""
    return Comment(
        id=row.id,
        content_id=row.content_id,
        author_id=row.author_id,
        body=row.body,
        created_at=utc(row.created_at),
        seq=row.seq,
        deleted=bool(row.deleted),
        parent_id=row.parent_id,
        parent_author_id=row.parent_author_id,
        parent_excerpt=row.parent_excerpt,
        parent_deleted=bool(row.parent_deleted),
    )


#: The types of moderation event in a feed.
BAN, UNBAN, ROOM = "ban", "unban", "room"


@dataclass(frozen=True, slots=True)
class Event:
    """A moderation change of a content's feed, at a seq of its own.

    ``data`` holds the type's own fields: a ban's ``author_id``, ``until``,
    ``reason``, ``retracted``; an unban's ``author_id``; a room change's
    ``room`` (the whole new room, as JSON). ``moderator_id`` is None for a
    room change nobody asked for (the pinned comment was deleted).
    """

    seq: int
    content_id: int
    type: str
    moderator_id: int | None
    data: dict = dataclasses.field(hash=False)
    created_at: datetime = None

    #: A moderation event, not a comment.
    is_comment = False

    def to_json(self):
        return {"seq": self.seq, "type": self.type, **self.data,
                "moderator_id": self.moderator_id, "at": rfc3339(self.created_at)}


@dataclass(frozen=True, slots=True)
class Room:
    """A content's room: closed to new comments, slow mode (seconds between
    one author's comments, 0 off), and the pinned comment (a live
    :class:`Comment`, or None). :data:`DEFAULT_ROOM` is every content's
    until a moderator changes it."""

    closed: bool = False
    slow_mode_seconds: int = 0
    pinned: Comment | None = None

    @property
    def pinned_comment_id(self):
        return None if self.pinned is None else self.pinned.id

    def to_json(self):
        return {"closed": self.closed, "slow_mode_seconds": self.slow_mode_seconds,
                "pinned": None if self.pinned is None else self.pinned.to_json()}


#: The room of a content nobody moderated (it has no row).
DEFAULT_ROOM = Room()


@dataclass(frozen=True, slots=True)
class Ban:
    """An author banned from posting to a content, ``until`` a time or for
    good (None). ``retracted``: comments the ban turned into tombstones;
    ``seq``: the ban event's (the last change the ban made), when just made."""

    content_id: int
    author_id: int
    until: datetime | None
    reason: str | None
    moderator_id: int
    created_at: datetime
    retracted: int = 0
    seq: int | None = None

    def to_json(self):
        return {"content_id": self.content_id, "author_id": self.author_id,
                "until": rfc3339(self.until), "reason": self.reason,
                "moderator_id": self.moderator_id, "created_at": rfc3339(self.created_at),
                "retracted": self.retracted}
