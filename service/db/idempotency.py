"""Retries without duplicates: the ``Idempotency-Key`` request header
(IETF httpapi draft "The Idempotency-Key HTTP Header Field").

A post that carries a key records it in the comment's own transaction:
what the post asked for (its content and a hash of its body) and what it
answered (the comment's id, seq and time). A retry with the same key by
the same author within the retention time finds the record, on whatever
process or host it lands, and gets the first answer again; the same key
with another request is refused. Concurrent duplicates race on the
record's primary key: the database holds the later one until the first
commits, and it then finds the first one's record.

Expired records are ignored, replaced when their key comes back, and
swept a batch at a time by the post that finds a sweep due.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from .tables import comments, idempotency_keys

#: Seconds between two sweeps of expired keys by one process. Each keyed
#: post checks; one in this long pays for a sweep.
KEY_SWEEP_INTERVAL = 60
#: Most expired keys one sweep deletes, so that no post pays for a long
#: backlog; a full batch makes the next keyed post sweep again.
KEY_SWEEP_BATCH = 1000


class KeyReused(Exception):
    """The key was already used, by this author, for a different request."""


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A post's key and how long its answer is kept for retries."""

    value: str
    ttl: float

    def cutoff(self, now):
        """Records made at or before this are expired."""
        return now - timedelta(seconds=self.ttl)


def request_hash(body, parent_id=None):
    """What a post asked for, hashed: its body, and its parent if a reply
    (a body has no NUL, so the two never read alike; a post that is no
    reply hashes as it did before replies)."""
    if parent_id is not None:
        body = f"parent {parent_id}\x00{body}"
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def record(conn, insert, key, comment, now):
    """Record ``key`` as answered by ``comment``, in ``conn``'s transaction.

    False if a live record already holds the key: a duplicate, or a reuse.
    An expired record is replaced.
    """
    return conn.execute(_record_statement(insert), {
        "author_id": comment.author_id,
        "key": key.value,
        "content_id": comment.content_id,
        "request_hash": request_hash(comment.body, comment.parent_id),
        "comment_id": comment.id,
        "seq": comment.seq,
        "created_at": comment.created_at,
        "cutoff": key.cutoff(now),
    }).first() is not None


@functools.cache
def _record_statement(insert):
    """The upsert that records a key, built once per dialect: building a
    statement costs more than running it."""
    t = idempotency_keys
    answer = ["content_id", "request_hash", "comment_id", "seq", "created_at"]
    stmt = insert(t).values({name: sa.bindparam(name) for name in ["author_id", "key", *answer]})
    return stmt.on_conflict_do_update(
        index_elements=[t.c.author_id, t.c.key],
        set_={name: stmt.excluded[name] for name in answer},
        where=t.c.created_at <= sa.bindparam("cutoff", type_=t.c.created_at.type),
    ).returning(t.c.author_id)


def find(conn, author_id, key, content_id, body, *, parent_id=None, since=None):
    """The record that answers this request, or None if there is none; with
    the comment's parent columns (its reply summary, as stored now).

    Only records made after ``since`` count, when given. Raises
    :class:`KeyReused` if the record is for a different request.
    """
    t = idempotency_keys
    c = comments
    query = (
        sa.select(t, c.c.parent_id, c.c.parent_author_id, c.c.parent_excerpt, c.c.parent_deleted)
        .select_from(t.outerjoin(c, c.c.id == t.c.comment_id))
        .where(t.c.author_id == author_id, t.c.key == key.value)
    )
    if since is not None:
        query = query.where(t.c.created_at > since)
    row = conn.execute(query).one_or_none()
    if row is not None and (row.content_id, row.request_hash) != (content_id, request_hash(body, parent_id)):
        raise KeyReused(key.value)
    return row


def sweep(conn, cutoff):
    """Delete up to :data:`KEY_SWEEP_BATCH` records made at or before ``cutoff``; say how many."""
    t = idempotency_keys
    expired = sa.select(t.c.author_id, t.c.key).where(t.c.created_at <= cutoff)
    return conn.execute(
        t.delete().where(
            sa.tuple_(t.c.author_id, t.c.key).in_(expired.limit(KEY_SWEEP_BATCH)),
            # Checked again on the row itself: PostgreSQL re-reads a row a
            # concurrent post has just renewed, but not the batch's query.
            t.c.created_at <= cutoff,
        )
    ).rowcount


class SweepSchedule:
    """When this process next sweeps expired keys; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = None

    def claim(self, now):
        """True (once) when a sweep is due at ``now``; the caller then sweeps."""
        with self._lock:
            if self._next is not None and now < self._next:
                return False
            self._next = now + timedelta(seconds=KEY_SWEEP_INTERVAL)
            return True

    def again(self):
        """Make the next keyed post sweep again (a full batch left more behind)."""
        with self._lock:
            self._next = None
