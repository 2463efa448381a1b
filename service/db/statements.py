"""The SQL of a change, each rule written once for every path that runs it.

Every change takes its content's next seq (:func:`next_seq`) *first*: the
seq row's lock orders the content's writers, and what a writer reads after
it (a post's checks, :data:`~service.db.moderation.POST_CHECKS`; a ban's
comments to retract) is what the writer before it committed. With a
NOTIFY channel a change sends ``content_id:seq`` (:func:`notify`); a post
with a limit takes a token from its author's bucket
(:data:`~service.db.limits.TAKE_TOKEN`). The store runs these texts one by
one in a transaction (SQLite; keyed posts, replies, deletions, moderation
and refusals on PostgreSQL), and a keyless post on PostgreSQL as two round
trips built from the very same texts (:func:`quick_post`).

Until moderation, a keyless post was one statement (limit, seq and
comment chained by data-modifying CTEs): one round trip. A post's checks
cannot be in that statement: a statement reads one snapshot, taken before
it waits for the seq row's lock, so it would miss a ban (or a closing, or
the author's previous comment) committed by the writer it waited for. The
checks therefore read in a statement of their own after the seq upsert,
and the post is judged between the two round trips; both run on the
driver's cursor with no SQLAlchemy in between.
"""

from __future__ import annotations

import sqlalchemy as sa

from .limits import TAKE_TOKEN
from .moderation import POST_CHECKS


def next_seq(rows="VALUES (:content_id, 1)"):
    """The upsert that takes a content's next seq, answering ``last_seq``;
    the content's row comes from ``rows`` (SQL: ``VALUES``, or a
    ``SELECT``). Its row lock is held to commit: the next writer of the
    content waits on it, so seq order is commit order."""
    return (f"INSERT INTO content_seqs (content_id, last_seq) {rows}\n"
            "ON CONFLICT (content_id) DO UPDATE SET last_seq = content_seqs.last_seq + 1\n"
            "RETURNING last_seq")


def notify(content_id, seq):
    """``pg_notify`` of a change of ``content_id`` (SQL) to ``seq`` (SQL), on
    the channel ``:channel``: the payload ``content_id:seq``, which tells
    a process whose feed has the seq already that it need not query.
    :class:`~service.db.listener.Listener` reads it."""
    return f"pg_notify(:channel, CAST({content_id} AS text) || ':' || CAST({seq} AS text))"


#: A change's next seq, on its own (``:content_id``).
NEXT_SEQ = sa.text(next_seq())
#: A change's NOTIFY, on its own (``:channel``, ``:content_id``, ``:seq``).
NOTIFY = sa.text(f"SELECT {notify(':content_id', ':seq')}")

#: The comment of a quick post, at the id and seq its first step took.
_INSERT_COMMENT = """\
INSERT INTO comments (id, content_id, author_id, body, created_at, seq, deleted)
VALUES (:id, :content_id, :author_id, :body, :created_at, :seq, false)"""


def quick_post(dialect, *, limited, notifying):
    """A keyless post on PostgreSQL in two round trips, as the two SQL
    texts (``first``, ``second``) to run on one DBAPI cursor in autocommit,
    in ``dialect``'s own parameter style. Built once per store.

    ``first`` begins a transaction, takes the content's next seq (its row
    lock first, like every change) and then, in a statement of its own and
    so in a snapshot taken after the lock, reads the post's checks
    (:data:`~service.db.moderation.POST_CHECKS`: ``content_id``,
    ``author_id``, ``body``, ``now``, ``duplicate_since``), takes a token
    when ``limited`` (:data:`~service.db.limits.TAKE_TOKEN`'s parameters)
    and draws the comment's id. It answers one row: the checks' columns,
    then ``seq``, ``id`` and ``token`` (whether a token was taken; true
    when not ``limited``). The caller judges the checks
    (:func:`~service.db.moderation.refusal`) and sends ``ROLLBACK`` to
    refuse, which undoes the seq and the token; or ``second``: the insert
    (``id``, ``content_id``, ``author_id``, ``body``, ``created_at``,
    ``seq``), with ``notifying`` its NOTIFY (``channel``), and ``COMMIT``.
    """
    checks = f"SELECT {POST_CHECKS},\n"
    if limited:
        checks = f"WITH taken AS (\n{TAKE_TOKEN}\n)\n{checks}"
        token = "EXISTS (SELECT 1 FROM taken)"
    else:
        token = "true"
    first = (f"BEGIN;\n{next_seq()};\n{checks}"
             "    (SELECT last_seq FROM content_seqs WHERE content_id = :content_id) AS seq,\n"
             "    nextval(pg_get_serial_sequence('comments', 'id')) AS id,\n"
             f"    {token} AS token")
    second = f"{_INSERT_COMMENT};\n"
    if notifying:
        second += f"SELECT {notify(':content_id', ':seq')};\n"
    second += "COMMIT"
    return tuple(str(sa.text(sql).compile(dialect=dialect)) for sql in (first, second))
