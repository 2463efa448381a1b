"""The schema as SQLAlchemy metadata: what the code reads and writes.

Databases get their tables from the migrations (:mod:`service.db.schema`:
``schema.sql`` or SQLite's baseline, then ``migrations/*.sql``), never
from here; ``tests/test_schema.py`` checks that the two agree.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

#: One row per content that has ever changed: the last seq handed out.
content_seqs = sa.Table(
    "content_seqs",
    metadata,
    sa.Column("content_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
)

#: One row per comment. A deletion keeps the row as a tombstone (body
#: NULL, deleted true) and moves it to a new seq, so "seq > cursor" finds it.
comments = sa.Table(
    "comments",
    metadata,
    # BIGSERIAL on PostgreSQL; SQLite only auto-increments INTEGER keys.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("content_id", sa.BigInteger, nullable=False),
    sa.Column("author_id", sa.BigInteger, nullable=False),
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    # Replies (version 2): the parent, a comment of the same content, and
    # its summary as it was when the reply was posted (author, first 80
    # characters), cleared when the parent is deleted. See db/replies.py.
    sa.Column("parent_id", sa.BigInteger, nullable=True),
    sa.Column("parent_author_id", sa.BigInteger, nullable=True),
    sa.Column("parent_excerpt", sa.Text, nullable=True),
    sa.Column("parent_deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    # The changes feed and the latest page both read by (content_id, seq).
    sa.Index("comments_content_seq", "content_id", "seq", unique=True),
    # A deletion finds the parent's replies by this.
    sa.Index("comments_parent", "parent_id"),
    # An author's comments in a content (version 3): slow mode, duplicates
    # and a ban's retraction read by this.
    sa.Index("comments_content_author", "content_id", "author_id", "created_at"),
)

#: One row per author who has posted: their posting allowance, as the
#: moment (microseconds since the epoch) their token bucket is full again.
#: See :mod:`service.db.limits`.
author_limits = sa.Table(
    "author_limits",
    metadata,
    sa.Column("author_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("full_at_us", sa.BigInteger, nullable=False),
)

#: One row per ``Idempotency-Key`` an author sent with a post that was
#: stored: what the post asked for and what it answered, so a retry gets
#: the same answer. See :mod:`service.db.idempotency`.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("author_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("content_id", sa.BigInteger, nullable=False),
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("comment_id", sa.BigInteger, nullable=False),
    # The comment's seq when it was posted: a later deletion moves it.
    sa.Column("seq", sa.BigInteger, nullable=False),
    # The comment's created_at, and the start of the key's retention.
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Expired keys are swept by age.
    sa.Index("idempotency_keys_created_at", "created_at"),
)

#: A content's room once a moderator changed it (version 3): closed to new
#: comments, slow mode (seconds, 0 off), the pinned comment. No row: open,
#: not slow, nothing pinned. See :mod:`service.db.rooms`.
rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("content_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("closed", sa.Boolean, nullable=False),
    sa.Column("slow_mode_seconds", sa.Integer, nullable=False),
    sa.Column("pinned_comment_id", sa.BigInteger, nullable=True),
)

#: One row per author banned from a content (version 3); ``until`` NULL is
#: for good, a past ``until`` is no ban. Lifting deletes the row.
bans = sa.Table(
    "bans",
    metadata,
    sa.Column("content_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("author_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("moderator_id", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # How many of the author's comments the ban turned into tombstones.
    sa.Column("retracted", sa.Integer, nullable=False),
)

#: A content's moderation changes (version 3): ban, unban, room; each at a
#: seq of the content's, beside its comments in the feed. ``data`` is the
#: event's own fields as a JSON object.
content_events = sa.Table(
    "content_events",
    metadata,
    sa.Column("content_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("moderator_id", sa.BigInteger, nullable=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

#: The database's schema version, one row (:mod:`service.db.schema`).
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)
