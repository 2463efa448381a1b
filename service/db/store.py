"""The store: comments, each content's changes sequence and its feed.

:class:`Store` posts, reads and deletes comments, runs every change of a
content (``_change``: its seqs, its NOTIFY) and reads the feed of changes
(comments and moderation events merged by seq, :class:`~service.db.feedreads.FeedReads`'s).
Its moderation actions (rooms, bans) are
:class:`~service.db.rooms.ModerationStore`'s: the same methods on the
store, run by the same machinery.

Every change to a content (a new comment, a deletion, a moderation action)
takes the content's next ``seq`` from a counter row updated in the same
transaction. The row lock on that counter serialises the writers of one
content until they commit, so per content seq order is commit order: a
reader that has seen seq N can never later find a seq below N appear.
Writers of different contents lock different rows and never wait on each
other.

A post also answers to its content's moderation
(:mod:`service.db.moderation`), its author's limit
(:mod:`service.db.limits`) and, when it carries one, its idempotency key
(:mod:`service.db.idempotency`), in the same transaction: whatever is
refused or replayed stores nothing. The SQL of a change (its seq, its
NOTIFY, the one-statement post) is written once, in
:mod:`service.db.statements`, for every path.

The store returns plain :class:`Comment` values and knows nothing of HTTP.
Whatever the database raises (:data:`~service.db.engines.DATABASE_ERRORS`)
leaves it as :class:`~service.common.errors.StoreUnavailable`, so no layer
above sees SQLAlchemy's errors or a driver's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..common.errors import StoreUnavailable
from ..common.logs import Throttled
from . import idempotency, moderation, replies, rooms, schema, statements
from .engines import DATABASE_ERRORS, create_engine, raw_cursor, unavailable
from .feedreads import FeedReads
from .limits import RateLimited
from .rooms import UNCHANGED, ModerationStore
from .tables import comments
from .values import Ban, Comment, Event, Room, comment_from_row, utc

# The values the store answers with live in db/values.py, set_room's
# UNCHANGED in db/rooms.py; named here too.
__all__ = ["UNCHANGED", "Ban", "Comment", "Event", "Posted", "Room", "Store", "create_engine"]

logger = logging.getLogger(__name__)
#: Seconds between two log lines of a failing health check (a load
#: balancer polls it every few seconds; one line a minute says it all).
HEALTH_LOG_INTERVAL = 60.0

@dataclass(frozen=True, slots=True)
class Posted:
    """What a post answered: its comment, and whether it was a retry's replay."""

    comment: Comment
    replayed: bool = False


def utcnow():
    return datetime.now(UTC)


class Store(ModerationStore, FeedReads):
    """Reads and writes comments; every method is one short transaction.

    With a ``notify_channel`` (PostgreSQL only) every change also sends
    ``pg_notify(channel, "content_id:seq")`` in its transaction, delivered at
    commit: a hint that wakes other processes' pollers, never the data.
    """

    def __init__(self, engine, *, clock=utcnow, notify_channel=None, autocommit_engine=None):
        """``autocommit_engine``: a twin of ``engine`` in autocommit
        (PostgreSQL), for reads and one-statement posts; without one, they
        switch ``engine``'s connections to autocommit at each checkout."""
        self.engine = engine
        self._writer = engine.execution_options(write=True)
        # Reads are single statements (latest() is built to need no
        # snapshot): on PostgreSQL in autocommit, one round trip each
        # instead of BEGIN, SELECT, ROLLBACK. SQLite begins its own way.
        self._autocommit_engine = autocommit_engine
        self._reader = engine
        self._quick = engine.dialect.name == "postgresql"
        if self._quick:
            self._reader = autocommit_engine or engine.execution_options(
                isolation_level="AUTOCOMMIT")
        self._clock = clock
        if engine.dialect.name == "postgresql":
            self._insert = postgresql.insert
        else:
            self._insert = sqlite.insert
        self.notify_channel = notify_channel if engine.dialect.name == "postgresql" else None
        if self._quick:
            # {limited: the quick post's two texts}, in the driver's own terms.
            self._quick_texts = {
                limited: statements.quick_post(
                    engine.dialect, limited=limited, notifying=self.notify_channel is not None)
                for limited in (False, True)
            }
        self._key_sweeps = idempotency.SweepSchedule()
        # Health checks come every few seconds: one line a minute while it fails.
        self._health_failures = Throttled(logger, HEALTH_LOG_INTERVAL)
        #: Feed queries run (changes_since, current_seq), read by tests. Not
        #: locked: a count lost to two threads' race would not matter there.
        self.feed_queries = 0

    @classmethod
    def from_settings(cls, settings, **kwargs):
        if settings.notify:
            kwargs.setdefault("notify_channel", settings.notify_channel)

        def engine(pool_size, max_overflow, autocommit=False):
            return create_engine(
                settings.database_url, pool_size=pool_size, max_overflow=max_overflow,
                connect_timeout=settings.db_connect_timeout,
                statement_timeout=settings.db_statement_timeout, autocommit=autocommit,
            )

        if settings.is_sqlite:
            return cls(engine(settings.db_pool_size, settings.db_max_overflow), **kwargs)
        # Most work is autocommit (reads, posts without a key); transactions
        # (keyed posts, deletions, refusals) get a pool a quarter the size.
        return cls(engine(max(2, settings.db_pool_size // 4), settings.db_max_overflow // 4),
                   autocommit_engine=engine(settings.db_pool_size, settings.db_max_overflow,
                                            autocommit=True), **kwargs)

    @property
    def dialect(self):
        return self.engine.dialect.name

    def create_schema(self, *, on_step=None):
        """Create the schema, or upgrade it to the code's version
        (:func:`service.db.schema.migrate`); (version before, version after).
        Raises :class:`~service.db.schema.SchemaTooNew` for a newer database."""
        try:
            return schema.migrate(self._writer, on_step=on_step)
        except DATABASE_ERRORS as exc:
            raise unavailable(exc) from exc

    def schema_version(self):
        """The database's schema version (0: none, or from before versions)."""
        try:
            with self.engine.connect() as conn:
                return schema.current_version(conn)
        except DATABASE_ERRORS as exc:
            raise unavailable(exc) from exc

    def has_schema(self):
        """True when the database is at the code's schema version."""
        return self.schema_version() == schema.LATEST

    def check_schema(self):
        """Raise :class:`~service.db.schema.SchemaError` unless the database
        is at the code's version, saying what to do."""
        schema.check(self.schema_version())

    def dispose(self):
        self.engine.dispose()
        if self._autocommit_engine is not None:
            self._autocommit_engine.dispose()

    def is_healthy(self):
        """True when the database answers a trivial query."""
        try:
            self._run(self._reader, lambda conn: conn.execute(sa.text("SELECT 1")))
        except StoreUnavailable as exc:
            self._health_failures.warning("database health check failed: %s", exc)
            return False
        return True

    # -- writes ------------------------------------------------------------

    def add_comment(self, content_id, author_id, body):
        """Add a comment, with no limit and no key."""
        return self.post_comment(content_id, author_id, body).comment

    def post_comment(self, content_id, author_id, body, *, limit=None, key=None,
                     parent_id=None, duplicate_window=0, exempt_slow_mode=False):
        """Add a comment within the content's moderation and the author's
        ``limit``, or replay ``key``'s post.

        Returns :class:`Posted`. A post whose :class:`~service.db.idempotency.IdempotencyKey`
        is already recorded, live, for the same request answers that
        request's comment again, stored once and not counted by the limit
        (nor refused by any check: a replay is never a duplicate).
        ``duplicate_window``: seconds in which the same body from the same
        author is a :class:`~service.db.moderation.Duplicate` (0: off);
        ``exempt_slow_mode`` for a moderator.
        Raises :class:`~service.db.moderation.Closed`,
        :class:`~service.db.moderation.Banned`,
        :class:`~service.db.moderation.SlowMode`,
        :class:`~service.db.moderation.Duplicate` (checked in this order),
        :class:`~service.db.limits.RateLimited`,
        :class:`~service.db.idempotency.KeyReused`,
        :class:`~service.db.replies.ParentMissing` or
        :class:`~service.db.replies.ParentDeleted`; those store nothing;
        :class:`~service.common.errors.StoreUnavailable` if the database failed.
        """
        now = self._clock()
        checks = {"duplicate_window": duplicate_window, "exempt_slow_mode": exempt_slow_mode}
        if key is None and parent_id is None and self._quick:
            comment = self._quick_post(content_id, author_id, body, limit, now, **checks)
            if comment is not None:
                return Posted(comment)
            # Out of tokens: the usual path says for how long (or takes a
            # token that came back meanwhile).

        def post(conn):
            """The post's statements: (Posted, whether to commit)."""
            # The seq first: its row lock orders this post after every
            # change of the content before it, whose effects the checks see.
            seq = self._next_seq(conn, content_id)
            facts = moderation.post_facts(conn, content_id, author_id, body, now=now,
                                          duplicate_window=duplicate_window)
            refused = moderation.refusal(facts, now=now, exempt_slow_mode=exempt_slow_mode)
            if refused is None and limit is not None:
                retry_after = limit.take(conn, author_id, _micros(now))
                if retry_after:
                    refused = RateLimited(retry_after)
            if refused is not None:
                # A retry of a stored post is answered whatever refuses it now.
                row = None if key is None else idempotency.find(
                    conn, author_id, key, content_id, body, parent_id=parent_id,
                    since=key.cutoff(now))
                if row is None:
                    raise refused
                return _replay(row, author_id, body), False
            comment = self._insert_comment(conn, content_id, author_id, body, parent_id,
                                           seq=seq)
            if key is not None and not idempotency.record(conn, self._insert, key, comment, now):
                # Another post holds the key (it committed first, and the
                # upsert locked its record): answer with its comment, and
                # undo this one, limit and seq included.
                row = idempotency.find(conn, author_id, key, content_id, body,
                                       parent_id=parent_id)
                return _replay(row, author_id, body), False
            return Posted(comment), True

        posted = self._run(self._writer, post, commits=True)
        if key is not None and not posted.replayed and self._key_sweeps.claim(now):
            self._sweep_keys(key.cutoff(now))
        return posted

    def _quick_post(self, content_id, author_id, body, limit, now, *, duplicate_window,
                    exempt_slow_mode):
        """A keyless post in two round trips (:func:`service.db.statements.quick_post`);
        None if out of tokens. Raises the :class:`~service.db.moderation.Refused`.

        Not run again on a dead connection: the second round trip commits,
        so whether it took would be unknown.
        """
        first, second = self._quick_texts[limit is not None]
        values = moderation.check_parameters(content_id, author_id, body, now, duplicate_window)
        if limit is not None:
            values.update(limit.parameters(author_id, _micros(now)))
        try:
            with raw_cursor(self._autocommit_engine or self.engine) as cursor:
                cursor.execute(first, values)
                row = cursor.fetchone()
                facts = moderation.PostFacts(*row[:len(moderation.PostFacts._fields)])
                seq, comment_id, token = row[-3:]
                refused = moderation.refusal(facts, now=now, exempt_slow_mode=exempt_slow_mode)
                if refused is not None or not token:
                    cursor.execute("ROLLBACK")
                    if refused is not None:
                        raise refused
                    return None
                # Read once the seq is ours: creation times follow seqs.
                created_at = self._clock()
                values.update(id=comment_id, seq=seq, created_at=created_at)
                if self.notify_channel is not None:
                    values["channel"] = self.notify_channel
                cursor.execute(second, values)
        except DATABASE_ERRORS as exc:
            raise unavailable(exc) from exc
        return Comment(id=comment_id, content_id=content_id, author_id=author_id, body=body,
                       created_at=created_at, seq=seq, deleted=False)

    def _run(self, engine, work, *, commits=False):
        """``work(conn)`` in a transaction; its result.

        With ``commits``, ``work`` answers (result, commit?) and the
        transaction is committed or rolled back accordingly. A pooled
        connection found dead (the database restarted since it was last
        used) fails the statement, not the commit: the work is run once
        more on a fresh connection, nothing of it having been committed.
        A failed commit is never retried: whether it took is unknown.
        Any database error then raises
        :class:`~service.common.errors.StoreUnavailable`; what ``work``
        raises of its own (a refusal) passes through.
        """
        try:
            for attempt in (1, 2):
                with engine.connect() as conn:
                    txn = conn.begin()
                    try:
                        answer = work(conn)
                    except sa.exc.DBAPIError as exc:
                        if attempt == 1 and exc.connection_invalidated:
                            logger.info("a pooled database connection was dead; trying a new one")
                            continue
                        raise
                    if not commits:
                        txn.rollback()  # a no-op in autocommit
                        return answer
                    result, commit = answer
                    if commit:
                        txn.commit()
                    else:
                        txn.rollback()
                    return result
        except DATABASE_ERRORS as exc:
            raise unavailable(exc) from exc

    def _change(self, work):
        """``work(conn, changes)`` as a change of a content in a transaction
        (:class:`_Changes`: its seqs, the first taken before ``work`` runs);
        committed if it took a seq, with one NOTIFY of the last, else
        rolled back. Its result."""
        def run(conn):
            changes = _Changes(self, conn)
            result = work(conn, changes)
            if changes.last is None:
                return result, False
            self._notify(conn, changes.content_id, changes.last)
            return result, True
        return self._run(self._writer, run, commits=True)

    def _insert_comment(self, conn, content_id, author_id, body, parent_id=None, *, seq=None):
        """Insert a comment at ``seq`` (taken here if None: the caller read
        nothing that depends on the content's lock)."""
        if seq is None:
            seq = self._next_seq(conn, content_id)
        # Read after the seq is taken: its row lock orders the parent's
        # deletion too (db/replies.py).
        parent = {} if parent_id is None else replies.parent_summary(conn, content_id, parent_id)
        row = conn.execute(
            comments.insert()
            .values(
                content_id=content_id,
                author_id=author_id,
                body=body,
                # Read once the seq is ours: creation times follow seqs.
                created_at=self._clock(),
                seq=seq,
                deleted=False,
                **parent,
            )
            .returning(*comments.c)
        ).one()
        self._notify(conn, content_id, seq)
        return comment_from_row(row)

    def _sweep_keys(self, cutoff):
        try:
            with self._writer.begin() as conn:
                swept = idempotency.sweep(conn, cutoff)
        except DATABASE_ERRORS:
            # The post is stored; the next sweep will try again.
            logger.warning("sweeping expired idempotency keys failed", exc_info=True)
            return
        if swept == idempotency.KEY_SWEEP_BATCH:
            self._key_sweeps.again()

    def get_comment(self, content_id, comment_id):
        row = self._run(self._reader, lambda conn: conn.execute(
            sa.select(comments).where(
                comments.c.id == comment_id, comments.c.content_id == content_id
            )
        ).one_or_none())
        return None if row is None else comment_from_row(row)

    def delete_comment(self, content_id, comment_id):
        """Turn a comment into a tombstone at a new seq.

        Returns the tombstone, or None if there is no such comment. Deleting
        a tombstone again changes nothing and returns it as it is.
        """
        changes = self.remove_comment(content_id, comment_id)
        return None if changes is None else changes[0]

    def remove_comment(self, content_id, comment_id):
        """Turn a comment into a tombstone at a new seq, and unpin it if it
        was the pinned comment (a ``room`` event at the next seq, by nobody).

        Returns the changes made, the tombstone first (a tombstone already:
        only it, unchanged), or None if there is no such comment.
        """
        now = self._clock()

        def delete(conn, changes):
            changes.begin(content_id)
            row = conn.execute(
                sa.select(comments.c.deleted).where(
                    comments.c.id == comment_id, comments.c.content_id == content_id
                )
            ).one_or_none()
            if row is None:
                return None
            made = []
            if not row.deleted:
                rooms.tombstone(conn, comment_id, changes.take())
                made = self._unpin(conn, changes, {comment_id}, None, now)
            tombstone = conn.execute(
                sa.select(comments).where(comments.c.id == comment_id)).one()
            return [comment_from_row(tombstone), *made]

        return self._change(delete)

    def _next_seq(self, conn, content_id):
        # The upsert's row lock is held to commit: the next writer of this
        # content waits here, so seq order is commit order.
        return conn.execute(statements.NEXT_SEQ, {"content_id": content_id}).scalar_one()

    def _notify(self, conn, content_id, seq):
        if self.notify_channel is not None:
            conn.execute(statements.NOTIFY, {"channel": self.notify_channel,
                                             "content_id": content_id, "seq": seq})


class _Changes:
    """The seqs of one transaction's changes of a content. :meth:`begin`
    takes the first at once (the content's row lock, before anything is
    read); :meth:`take` hands it out, then takes one more per change. A
    transaction that took none changed nothing."""

    def __init__(self, store, conn):
        self._store, self._conn = store, conn
        self.content_id = None
        self._ready = None
        #: The last seq handed out.
        self.last = None

    def begin(self, content_id):
        self.content_id = content_id
        self._ready = self._store._next_seq(self._conn, content_id)

    def take(self):
        if self._ready is not None:
            seq, self._ready = self._ready, None
        else:
            seq = self._store._next_seq(self._conn, self.content_id)
        self.last = seq
        return seq


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(when):
    """Microseconds since the epoch, exactly (a float would round)."""
    return (when - _EPOCH) // timedelta(microseconds=1)


def _replay(row, author_id, body):
    """The first answer to a post, from its idempotency record.

    The body is the retry's own: the record's hash says it is the same.
    """
    comment = Comment(
        id=row.comment_id,
        content_id=row.content_id,
        author_id=author_id,
        body=body,
        created_at=utc(row.created_at),
        seq=row.seq,
        deleted=False,
        parent_id=row.parent_id,
        parent_author_id=row.parent_author_id,
        parent_excerpt=row.parent_excerpt,
        parent_deleted=bool(row.parent_deleted),
    )
    return Posted(comment, replayed=True)
