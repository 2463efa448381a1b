"""The feed's reads: a content's cursor, its changes after a cursor
(comments, tombstones and moderation events merged by seq, in one query
built once), and its latest live comments. :class:`FeedReads` is a part of
:class:`~service.db.store.Store`, which provides ``_run``, ``_reader`` and
the ``feed_queries`` count."""

from __future__ import annotations

import sqlalchemy as sa

from . import rooms
from .tables import comments, content_events, content_seqs
from .values import comment_from_row


class FeedReads:
    """The reads a feed makes: each one short read on the store's reader."""

    def current_seq(self, content_id):
        self.feed_queries += 1
        return self._run(self._reader, lambda conn: self._current_seq(conn, content_id))

    def changes_since(self, content_id, since, limit):
        """Up to ``limit`` changes with seq above ``since``, oldest first:
        comments and tombstones (:class:`~service.db.values.Comment`) and
        moderation events (:class:`~service.db.values.Event`), merged by seq."""
        self.feed_queries += 1
        rows = self._run(self._reader, lambda conn: conn.execute(
            _CHANGES, {"content_id": content_id, "since": since, "limit": limit}).all())
        return [comment_from_row(row) if row.is_comment else rooms.event_from_row(row)
                for row in rows]

    def latest(self, content_id, limit):
        """The newest ``limit`` live comments, oldest first, and the cursor after them."""
        def read(conn):
            # Read the cursor first and bound the page by it: a change
            # committed between the two reads then lands after the cursor.
            cursor = self._current_seq(conn, content_id)
            rows = conn.execute(
                sa.select(comments)
                .where(
                    comments.c.content_id == content_id,
                    comments.c.seq <= cursor,
                    comments.c.deleted.is_(False),
                )
                .order_by(comments.c.seq.desc())
                .limit(limit)
            ).all()
            return rows, cursor

        rows, cursor = self._run(self._reader, read)
        return [comment_from_row(row) for row in reversed(rows)], cursor

    def _current_seq(self, conn, content_id):
        seq = conn.execute(
            sa.select(content_seqs.c.last_seq).where(content_seqs.c.content_id == content_id)
        ).scalar_one_or_none()
        return seq or 0


def _typed_null(column):
    return sa.cast(sa.null(), column.type).label(column.name)


def _changes_query():
    """Comments and events of a content with seq above ``:since``, the
    first ``:limit`` by seq (``:content_id``): one UNION ALL of the two
    tables' own first ``:limit`` (each read by its (content_id, seq) index).
    Built once: building and keying it cost more than running it."""
    c, e = comments, content_events
    content_id, since = sa.bindparam("content_id"), sa.bindparam("since")
    limit = sa.bindparam("limit", type_=sa.Integer)
    comment_columns = [col for col in c.c if col.name != "content_id"]
    event_only = [e.c.type, e.c.moderator_id, e.c.data]
    from_comments = (
        sa.select(sa.literal_column("1").label("is_comment"), c.c.content_id, *comment_columns,
                  *[_typed_null(col) for col in event_only])
        .where(c.c.content_id == content_id, c.c.seq > since)
        .order_by(c.c.seq).limit(limit).subquery()
    )
    from_events = (
        sa.select(sa.literal_column("0").label("is_comment"), e.c.content_id,
                  *[e.c[col.name] if col.name in e.c else _typed_null(col)
                    for col in comment_columns],
                  *event_only)
        .where(e.c.content_id == content_id, e.c.seq > since)
        .order_by(e.c.seq).limit(limit).subquery()
    )
    merged = sa.union_all(sa.select(from_comments), sa.select(from_events)).subquery()
    return sa.select(merged).order_by(merged.c.seq).limit(limit)


_CHANGES = _changes_query()
