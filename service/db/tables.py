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

#: The database's schema version, one row (:mod:`service.db.schema`).
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)
